"""Half precision: every callback trains under ``bf16-true`` and ``bf16-mixed`` on CPU, and the Fisher trace of a model
in bfloat16 stays close to the float64 trace of the same (bfloat16-rounded) weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import gaussian_loader, make_trainer, read_scalars
from lightning_startwell import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
    fisher_trace,
)
from test_fisher import naive_fisher

# Relative error of a bfloat16 Fisher trace against the float64 trace of the same weights and inputs. bfloat16 keeps 8
# significant bits (rounding 2^-9 = 0.2% per operation); measured on these models (8 or 16 inputs, both methods): at most
# 2.3e-4 on the total and 1.5e-3 on a layer's share (of layers carrying > 0.1% of the total). Tolerances: ~7x that.
BF16_TOTAL_RTOL = 2e-3
BF16_LAYER_RTOL = 1e-2


def every_callback() -> list:
    return [
        InitScheme("lsuv"),  # LSUV and the forward ratios both run the model on a training batch
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.1, mode="early", cutoff_steps=3),
        StochasticDepthSchedule(drop_rate=0.4),
        FisherTraceMonitor(num_samples=16, every_n_steps=2),
        DeficitInjector("noise", start_epoch=0, end_epoch=1, noise_std=0.1),
    ]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
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
