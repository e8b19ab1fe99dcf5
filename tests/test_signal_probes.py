"""SignalPropagationMonitor records the training step's own forward and backward only: another callback's probe
passes (GradientDynamicsMonitor's probe gradients, FisherTraceMonitor's trace), listed before or after it, change
nothing; the values equal those of the monitor alone and a float64 computation on the training batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gaussian_loader, make_trainer, read_scalars

from lightning_startwell.callbacks import FisherTraceMonitor, GradientDynamicsMonitor, SignalPropagationMonitor
from lightning_startwell.models import MLP

LAYERS = ("net.1", "net.4", "net.7")


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # the weights stay those of the start: every step sees the same network


def signal_values(root, others, before):
    torch.manual_seed(0)
    model = MLP(depth=2, width=16, optimizer=frozen_sgd)
    monitor = SignalPropagationMonitor(every_n_steps=1, log_images=False)
    callbacks = [*others, monitor] if before else [monitor, *others]
    make_trainer(root, callbacks, max_steps=2).fit(model, gaussian_loader(num=64, batch_size=16))
    scalars = read_scalars(root / "lightning_logs")
    values = {
        f"{direction}/{name}": dict(scalars[f"startwell/signal/{direction}/{name}"])
        for direction in ("forward", "backward")
        for name in LAYERS
    }
    return model, values


def float64_variances(model, step):
    """Var[z^l] and Var[dL/dz^l] of the three Linear layers on the training batch of ``step``, in float64."""
    x, y = list(gaussian_loader(num=64, batch_size=16))[step]
    h = x.flatten(1).double().requires_grad_()
    outputs = []
    for i, name in enumerate(LAYERS):
        layer = model.get_submodule(name)
        z = h @ layer.weight.detach().double().T + layer.bias.detach().double()
        z.retain_grad()
        outputs.append(z)
        h = z.clamp_min(0) if i < 2 else z
    F.cross_entropy(outputs[-1], y).backward()
    expected = {f"forward/{n}": z.var().item() for n, z in zip(LAYERS, outputs, strict=True)}
    expected.update({f"backward/{n}": z.grad.var().item() for n, z in zip(LAYERS, outputs, strict=True)})
    return expected


def probes():
    return {
        "dynamics": lambda: [GradientDynamicsMonitor(num_batches=2, batch_size=16, every_n_steps=1)],
        "fisher": lambda: [FisherTraceMonitor(num_samples=16, batch_size=16, every_n_steps=1, log_images=False)],
        "both": lambda: [
            GradientDynamicsMonitor(num_batches=2, batch_size=16, every_n_steps=1),
            FisherTraceMonitor(num_samples=16, batch_size=16, every_n_steps=1, log_images=False),
        ],
    }


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    return signal_values(tmp_path_factory.mktemp("alone"), [], before=False)


def test_alone_equals_a_float64_computation_on_the_training_batch(alone):
    model, values = alone
    for step in (0, 1):
        expected = float64_variances(model, step)
        for tag, value in expected.items():
            assert values[tag][step] == pytest.approx(value, rel=1e-4), (tag, step)


@pytest.mark.parametrize("before", [False, True], ids=["listed_after", "listed_before"])
@pytest.mark.parametrize("others", list(probes()))
def test_other_callbacks_probes_are_not_recorded(tmp_path, alone, others, before):
    model, values = signal_values(tmp_path, probes()[others](), before)
    for tag, by_step in alone[1].items():
        assert values[tag] == pytest.approx(by_step, rel=1e-5), tag
    for step in (0, 1):
        for tag, value in float64_variances(model, step).items():
            assert values[tag][step] == pytest.approx(value, rel=1e-4), (tag, step)
