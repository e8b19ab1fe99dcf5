"""No host synchronisation in a per-step path: 20 training steps with every callback attached, while any read-back to
the host, host-to-device copy or tensor built from Python data in the library's per-step code fails the test.

A CPU run cannot see a GPU stall, so the guard looks at the calls that cause one. Between ``on_train_batch_start`` and
``on_train_batch_end`` of steps 1-19 (step 0 sets things up), ``Tensor.item`` / ``__float__`` / ``__int__`` /
``__bool__`` / ``tolist`` / ``numpy`` / ``cpu``, ``Tensor.to`` / ``cuda`` with a device, and ``torch.tensor`` /
``torch.as_tensor`` of Python data are recorded when a frame of ``lightning_startwell`` (other than the demo model's own
``training_step`` in ``models.py``) is on the stack. Allowed: the once-per-measurement read-out of the values to log
(``variances_by_name``). The Fisher monitor measures at epoch ends here, outside the window: a measurement reads its
result back by design.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader, make_trainer

import lightning_startwell
from lightning_startwell import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.drop_path import DropPath, DropPathHooks, ResidualBlock

PACKAGE = str(Path(lightning_startwell.__file__).parent)
NOT_PER_STEP = (str(Path(PACKAGE) / "models.py"),)
READOUT = {"variances_by_name"}
READS_BACK = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


class HostSyncGuard:
    def __init__(self) -> None:
        self.active = False
        self.found: list[str] = []

    def record(self, what: str) -> None:
        if not self.active:
            return
        stack = traceback.extract_stack()[:-2]
        package = [f for f in stack if f.filename.startswith(PACKAGE)]
        if package and package[-1].filename.startswith(NOT_PER_STEP):
            return  # the demo model's own code, even when a library wrapper (the signal monitor's) is further up
        ours = [f for f in package if not f.filename.startswith(NOT_PER_STEP)]
        if ours and not any(f.name in READOUT for f in stack):
            self.found.append(f"{what} in {Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})")

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READS_BACK:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", original, lambda *a, **k: True))
        for name in ("to", "cuda"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}(device)", original, _moves))
        for name in ("tensor", "as_tensor"):
            original = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._wrap(f"torch.{name}(Python data)", original, _from_python))

    def _wrap(self, what, original, applies):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):
            if self.active and applies(*args, **kwargs):
                self.record(what)
            return original(*args, **kwargs)

        return wrapper


def _moves(tensor, *args, **kwargs) -> bool:
    """Whether a ``to``/``cuda`` call names a device (on a CPU-only run, a move to the accelerator)."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int)) for a in args) or not args and not kwargs


def _from_python(data, *args, **kwargs) -> bool:
    return not isinstance(data, torch.Tensor)


class Window(pl.Callback):
    """Opens (first in the list) or closes (last) the guarded window of steps 1-19."""

    def __init__(self, guard: HostSyncGuard, opens: bool) -> None:
        self.guard, self.opens = guard, opens

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.opens and trainer.global_step >= 1:
            self.guard.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.opens:
            self.guard.active = False


def every_callback() -> list[pl.Callback]:
    return [
        InitScheme("lsuv"),
        SignalPropagationMonitor(every_n_steps=5),
        DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=10),  # a new rate at every step
        StochasticDepthSchedule(drop_rate=0.2),
        FisherTraceMonitor(num_samples=16, every_n_epochs=1),
        GradientDynamicsMonitor(every_n_epochs=1),  # a gradient norm summed at every step, read at the epoch end
        DeficitInjector("label_permutation", start_epoch=0, end_epoch=5),  # one injector per trainer
    ]


def test_twenty_steps_with_every_callback_make_no_host_sync(tmp_path, monkeypatch):
    guard = HostSyncGuard()
    guard.patch(monkeypatch)
    callbacks = [Window(guard, opens=True), *every_callback(), Window(guard, opens=False)]
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks, max_steps=20, max_epochs=-1)
    trainer.fit(ResNet(num_blocks=2, width=8, dropout=0.1), gaussian_loader(num=64, batch_size=8))
    assert trainer.global_step == 20
    assert guard.found == [], sorted(set(guard.found))


def test_the_guard_catches_a_sync_in_a_per_step_hook(tmp_path, monkeypatch):
    """The guard is not vacuous: the rates written from a new CPU tensor at every step are reported."""
    guard = HostSyncGuard()
    guard.patch(monkeypatch)

    def always_copy(self, rates):
        self.rates.copy_(torch.tensor(rates, dtype=self.rates.dtype))

    monkeypatch.setattr(DropPathHooks, "set_rates", always_copy)
    callbacks = [Window(guard, opens=True), StochasticDepthSchedule(drop_rate=0.2), Window(guard, opens=False)]
    make_trainer(tmp_path, callbacks, max_steps=3).fit(ResNet(num_blocks=2, width=8), gaussian_loader())
    assert guard.found and all("torch.tensor" in f and "always_copy" not in f for f in guard.found)


def test_rates_are_written_only_when_they_change():
    model = ResNet(num_blocks=2, width=8)
    hooks = DropPathHooks(model, [ResidualBlock("blocks.0.branch", ("blocks.0.branch",))])
    hooks.set_rates([0.2])
    version = hooks.rates._version
    hooks.set_rates([0.2])
    assert hooks.rates._version == version
    hooks.set_rates([0.3])
    assert hooks.rates._version == version + 1 and hooks.rates.tolist() == pytest.approx([0.3])


def test_drop_path_module_builds_no_tensor_per_forward(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called in DropPath.forward")

    monkeypatch.setattr(torch, "tensor", refuse)
    x = torch.ones(1000, 4)
    kept = (DropPath(0.25).train()(x)[:, 0] != 0).float().mean().item()
    assert kept == pytest.approx(0.75, abs=0.07)
