"""GradientDynamicsMonitor on a step whose gradient is not finite (what the GradScaler skips under 16-mixed),
simulated on the CPU: an inf gradient injected before the monitor reads it, and the step turned into a no-op after."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback
from test_dynamics_callback import RecordGradNorms
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import GradientDynamicsMonitor
from lightning_startwell.models import MLP

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(96, 1, 8, 8, generator=G), torch.randint(0, 10, (96,), generator=G)
INF_STEP = 3


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.1)


class InfGradient(Callback):
    """At INF_STEP, one gradient entry becomes inf (listed before the monitor: it reads the inf)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == INF_STEP:
            next(pl_module.parameters()).grad[0, 0] = math.inf


class SkippedStep(MLP):
    """Zeroes the gradients of INF_STEP after every callback read them: plain SGD then leaves the weights alone, as the
    GradScaler does when it skips a step (the step still counts in global_step)."""

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.global_step == INF_STEP:
            for p in self.parameters():
                p.grad.zero_()


def dynamics(root):
    scalars = read_scalars(root / "lightning_logs")
    return {k.rpartition("/")[2]: dict(v) for k, v in scalars.items() if k.startswith("startwell/dynamics/")}


def test_epoch_mean_leaves_out_a_non_finite_step_and_counts_it(tmp_path):
    recorder = RecordGradNorms()
    monitor = GradientDynamicsMonitor(num_batches=2, every_n_epochs=1)
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)  # 6 steps an epoch
    with pytest.warns(UserWarning, match="non-finite gradient"):
        make_trainer(tmp_path, [InfGradient(), recorder, monitor], max_epochs=2).fit(
            SkippedStep(optimizer=plain_sgd), loader
        )
    values = dynamics(tmp_path)
    assert math.isinf(recorder.norms[INF_STEP])
    finite = [recorder.norms[s] for s in range(6) if s != INF_STEP]
    assert values["grad_norm"][6] == pytest.approx(sum(finite) / 5, rel=1e-5)
    assert values["grad_norm"][12] == pytest.approx(sum(recorder.norms[s] for s in range(6, 12)) / 6, rel=1e-5)
    assert values["grad_norm_skipped"] == {6: 1.0, 12: 0.0}


def test_step_cadence_logs_no_norm_for_a_non_finite_step(tmp_path):
    recorder = RecordGradNorms()
    monitor = GradientDynamicsMonitor(every_n_steps=1, measure_directions=False)
    loader = DataLoader(TensorDataset(X, Y), batch_size=16)
    with pytest.warns(UserWarning, match="non-finite gradient"):
        make_trainer(tmp_path, [InfGradient(), recorder, monitor], max_steps=5).fit(
            SkippedStep(optimizer=plain_sgd), loader
        )
    values = dynamics(tmp_path)
    assert sorted(values["grad_norm"]) == [0, 1, 2, 4]
    for step in (0, 1, 2, 4):
        assert values["grad_norm"][step] == pytest.approx(recorder.norms[step], rel=1e-5)
    assert values["grad_norm_skipped"] == {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
