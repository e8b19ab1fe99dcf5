"""Precision: every callback trains under ``bf16-true``, ``bf16-mixed`` and ``16-true`` on CPU; the Fisher trace of a
model in bfloat16 stays close to the float64 trace of the same (bfloat16-rounded) weights; the monitors run without any
float64 tensor where the device has none (forced on CPU); drop path keeps the right fraction in bfloat16; backward
variances are unscaled under a GradScaler (a stub: no scaler runs on CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import gaussian_loader, make_trainer, read_scalars
from test_fisher import naive_fisher
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_startwell import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
    fisher_trace,
)

# Relative error of a bfloat16 Fisher trace against the float64 trace of the same weights and inputs. bfloat16 keeps 8
# significant bits (rounding 2^-9 = 0.2% per operation); measured on these models (8 or 16 inputs, both methods): at
# most 2.3e-4 on the total and 1.5e-3 on a layer's share (of layers carrying > 0.1% of the total). Tolerances: ~7x that.
BF16_TOTAL_RTOL = 2e-3
BF16_LAYER_RTOL = 1e-2


def every_callback() -> list:
    return [
        InitScheme("lsuv"),  # LSUV and the forward ratios both run the model on a training batch
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.1, mode="early", cutoff_steps=3),
        StochasticDepthSchedule(drop_rate=0.4),
        FisherTraceMonitor(num_samples=16, every_n_steps=2),
        GradientDynamicsMonitor(every_n_steps=2),
        DeficitInjector("noise", start_epoch=0, end_epoch=1, noise_std=0.1),
    ]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-true"])
def test_every_callback_trains_in_half_precision(tmp_path, precision):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, every_callback(), precision=precision, max_steps=4)
    trainer.fit(ResNet(num_blocks=2, width=8, dropout=0.1), gaussian_loader())
    scalars = read_scalars(tmp_path)
    for prefix in ("startwell/init/forward_ratio/", "startwell/signal/forward/", "startwell/signal/backward/"):
        values = [v for tag, points in scalars.items() if tag.startswith(prefix) for _, v in points]
        assert values and all(math.isfinite(v) and v > 0 for v in values), prefix
    traces = [v for _, v in scalars["startwell/fisher/trace"]]
    assert len(traces) == 3 and all(math.isfinite(v) and v > 0 for v in traces)


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    resnet = ResNet(num_blocks=2, width=8)
    resnet.train()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            resnet(torch.randn(32, 1, 8, 8))
    return {"mlp": mlp, "resnet": resnet.eval()}


@pytest.mark.parametrize("name", ["mlp", "resnet"])
@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_fisher_of_a_bfloat16_model_is_close_to_float64(name, method):
    model = _models()[name].to(torch.bfloat16)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = naive_fisher(model, x.bfloat16(), "exact")  # the same rounded weights and inputs, in float64
    measured = fisher_trace(model, x, fisher="exact", method=method)  # float32 inputs: cast to the model's dtype
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # measured in place, no float32 copy
    total = sum(reference.values())
    assert measured.total == pytest.approx(total, rel=BF16_TOTAL_RTOL)
    for layer, value in reference.items():
        assert measured.per_layer[layer] == pytest.approx(value, rel=BF16_LAYER_RTOL, abs=1e-3 * total), layer


def test_fisher_sums_of_a_bfloat16_model_are_float64():
    from lightning_startwell.fisher import fisher_trace_sums

    model = copy.deepcopy(_models()["mlp"]).to(torch.bfloat16)
    sums, count = fisher_trace_sums(model, torch.randn(8, 1, 8, 8), fisher="exact")
    assert count == 8 and {s.dtype for s in sums.values()} == {torch.float64}


# --- Devices without float64 (Apple MPS): forced on CPU -------------------------------------------------------------


class NoFloat64(TorchDispatchMode):
    """Fails on any operation that makes a float64 tensor, as a device without float64 would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
        assert not made, f"{func} made a float64 tensor on a device without float64"
        return out


@pytest.fixture
def cpu_without_float64(monkeypatch):
    import lightning_startwell._precision as precision

    monkeypatch.setattr(precision, "NO_FLOAT64_DEVICES", {"cpu"})
    assert precision.accumulation_dtype("cpu") == torch.float32


def test_accumulation_dtype_is_float64_where_supported():
    from lightning_startwell._precision import accumulation_dtype

    assert accumulation_dtype("cpu") == torch.float64
    assert accumulation_dtype(torch.device("mps")) == torch.float32


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_fisher_without_float64(cpu_without_float64, method):
    model = _models()["resnet"]
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = naive_fisher(model, x, "exact")
    with NoFloat64():
        measured = fisher_trace(model, x, fisher="exact", method=method)
    assert measured.per_layer == pytest.approx(reference, rel=1e-4, abs=1e-9)


def test_signal_moments_and_init_without_float64(cpu_without_float64):
    from lightning_startwell.init import forward_variances, init_weights, weight_layers
    from lightning_startwell.propagation import SignalRecorder

    model = _models()["mlp"]
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    layers = weight_layers(model)
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            outputs[name] = output.detach().double()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    model(x)
    for h in handles:
        h.remove()
    with NoFloat64():
        with SignalRecorder(layers) as recorder:
            model(x).logsumexp(-1).sum().backward()
        forward, _ = recorder.variances()
        ratios = forward_variances(model, x, layers)
        init_weights(model, "lsuv", lsuv_inputs=x, generator=torch.Generator().manual_seed(0))
    for name, out in outputs.items():
        assert forward[name] == pytest.approx(out.var().item(), rel=1e-5)
        assert ratios[name] == pytest.approx(out.var().item(), rel=1e-5)


# --- Stochastic depth in bfloat16 ------------------------------------------------------------------------------------


def test_drop_path_keeps_the_right_fraction_in_bfloat16():
    from lightning_startwell.drop_path import drop_path

    torch.manual_seed(0)
    n = 2**20
    kept = (drop_path(torch.ones(n, 1, dtype=torch.bfloat16), torch.tensor(0.1)) != 0).double().mean().item()
    assert kept == pytest.approx(0.9, abs=5 * math.sqrt(0.09 / n))  # 5 standard errors: 0.0015; bf16 draws gave 0.898


# --- GradScaler (16-mixed on CUDA): backward moments unscaled ---------------------------------------------------------

SCALE = 2.0**16


class ScaledLoss(ResNet):
    """Multiplies its loss by SCALE, as Lightning's 16-mixed does before backward."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * SCALE


class StubScaler:
    def is_enabled(self) -> bool:
        return True

    def _get_scale_async(self) -> torch.Tensor:
        return torch.tensor(SCALE)


def test_unscale_backward_equals_the_moments_of_the_true_gradients():
    from lightning_startwell.propagation import moments, unscale_backward, variance_from_moments

    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    stacked = torch.stack([moments(g), moments(g * SCALE)])[None]  # forward row untouched, backward row scaled
    unscaled = unscale_backward(stacked, torch.tensor(SCALE))
    assert torch.allclose(unscaled[0, 1], moments(g), rtol=1e-12)
    assert torch.equal(unscaled[0, 0], moments(g))
    assert variance_from_moments(unscaled)[0, 1].item() == pytest.approx(g.double().var().item(), rel=1e-12)


def test_signal_monitor_divides_backward_variances_by_the_loss_scale(tmp_path):
    logged = {}
    for name, model_class, scaler in (("plain", ResNet, None), ("scaled", ScaledLoss, StubScaler())):
        torch.manual_seed(0)
        root = tmp_path / name
        trainer = make_trainer(root, [SignalPropagationMonitor(every_n_steps=1, log_images=False)], max_steps=1)
        trainer.precision_plugin.scaler = scaler
        trainer.fit(model_class(num_blocks=2, width=8), gaussian_loader())
        logged[name] = {k: v[0][1] for k, v in read_scalars(root).items() if k.startswith("startwell/signal/")}
    assert any(k.startswith("startwell/signal/backward/") for k in logged["plain"])
    assert logged["scaled"] == pytest.approx(logged["plain"], rel=1e-5)
