"""Every collective input of the library's callbacks lives on the module's device: NCCL's rule (it takes CUDA tensors
only), checked on gloo, which takes any tensor and so cannot see the mistake by itself.

In each ``ddp_spawn`` worker, a TorchFunctionMode active inside the library callbacks' hooks marks every tensor that a
factory builds without a ``device`` (a host tensor on a GPU machine) and everything computed from one; a move that
names a device (``.to(device)``, ``.to(other_tensor)``, ``.cuda()``) makes a new, unmarked tensor. Every
``torch.distributed`` collective called inside those hooks asserts that none of its tensors is marked and that each is
on the module's device. Not caught: a tensor placed on the CPU by name (``device="cpu"``), which is the module's device
in a CPU run.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from conftest import ddp_spawn_flake, gaussian_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode
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
)

FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}
IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")
HOOKS = ("setup", "on_fit_start", "on_train_start", "on_train_batch_start", "on_before_backward", "on_after_backward",
         "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end", "on_validation_epoch_end",
         "on_train_end", "on_fit_end")


def is_host(t: object) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_startwell_host", False)


def in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))


def names_a_device(func, args, kwargs) -> bool:
    if func is torch.Tensor.cuda:
        return True
    places = [*args[1:], kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool) for a in places
               if a is not None)


class HostTensorTracker(TorchFunctionMode):
    """Marks the tensors a device-less factory builds, and what is computed from them (module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = kwargs.get("device") is None
        elif func in MOVES and names_a_device(func, args, kwargs):
            host = False
            if out is args[0]:  # already there (always, on CPU): a new tensor, as a move to a GPU would give
                out = out.view_as(out)
        elif in_place(func):  # the result is the first argument, marked or not as it was
            host = False
        else:
            host = any(is_host(t) for t in tree_leaves((args, kwargs)))
        if host:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    t._startwell_host = True
        return out


class NcclLikeCheck(Callback):
    """In each worker: track host tensors inside the library callbacks' hooks, and check every collective's tensors.
    Listed first, so its ``setup`` runs before theirs."""

    def setup(self, trainer, pl_module, stage):
        self.checked = {name: 0 for name in COLLECTIVES}
        self.tracking = False
        for name in COLLECTIVES:
            setattr(dist, name, self._checked(name, getattr(dist, name), pl_module))
        for callback in trainer.callbacks:
            if type(callback).__module__.startswith("lightning_startwell."):
                for hook in HOOKS:
                    setattr(callback, hook, self._tracked(getattr(callback, hook)))

    def _tracked(self, hook):
        @functools.wraps(hook)
        def tracked(*args, **kwargs):
            if self.tracking:
                return hook(*args, **kwargs)
            self.tracking = True
            try:
                with HostTensorTracker():
                    return hook(*args, **kwargs)
            finally:
                self.tracking = False

        return tracked

    def _checked(self, name, collective, pl_module):
        @functools.wraps(collective)
        def checked(*args, **kwargs):
            if self.tracking:
                tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                assert tensors, f"{name} with no tensor"
                for t in tensors:
                    assert not is_host(t), f"{name} given a host tensor (shape {tuple(t.shape)})"
                    assert t.device == pl_module.device, f"{name} given a tensor on {t.device}"
                self.checked[name] += 1
            return collective(*args, **kwargs)

        return checked

    def on_fit_end(self, trainer, pl_module):
        counts = torch.tensor([self.checked["all_reduce"], self.checked["broadcast"]])
        assert counts[0] >= 8, self.checked  # signal, Fisher, dynamics and LSUV all reduce; InitScheme broadcasts
        assert counts[1] >= 1, self.checked


def every_callback():
    return [
        NcclLikeCheck(),
        InitScheme("lsuv", seed=0),
        SignalPropagationMonitor(every_n_steps=3),
        DropoutSchedule(p=0.1, mode="early", cutoff_steps=6),
        StochasticDepthSchedule(drop_rate=0.3),
        FisherTraceMonitor(num_samples=16, every_n_steps=4),
        GradientDynamicsMonitor(every_n_steps=4, num_batches=2),
        DeficitInjector("label_permutation", start_epoch=0, end_epoch=1),
    ]


@pytest.mark.slow
@ddp_spawn_flake
def test_every_collective_input_is_on_the_module_device(tmp_path):
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, every_callback(), devices=2, strategy="ddp_spawn", max_steps=12, logger=False)
    trainer.fit(ResNet(num_blocks=2, width=8, dropout=0.1), gaussian_loader(num=256))


def test_the_tracker_marks_device_less_factories_and_what_follows_them():
    with HostTensorTracker():
        host = torch.zeros(3)
        placed = torch.zeros(3, device="cpu")
        derived = (host * 2).sum()
        moved = host.to(placed.device)
        cast = host.to(torch.float64)
        placed.add_(host)
        placed[0] = host[1]
        stacked = torch.stack([placed, host])
    assert is_host(host) and is_host(derived) and is_host(cast) and is_host(stacked)
    assert not is_host(placed) and not is_host(moved)


def test_the_check_catches_a_host_tensor_in_a_reduction():
    """A callback that builds its count without ``device`` fails the check (no process group needed: the collective
    is a stand-in that must not be reached)."""
    check = NcclLikeCheck()
    check.tracking = True
    reached = []
    module = torch.nn.Linear(2, 2)
    module.device = torch.device("cpu")
    all_reduce = check._checked("all_reduce", lambda t: reached.append(t), module)
    check.checked = {"all_reduce": 0}
    with HostTensorTracker():
        count = torch.tensor([3.0])
    with pytest.raises(AssertionError, match=r"all_reduce given a host tensor \(shape \(1,\)\)"):
        all_reduce(count)
    assert reached == []
    all_reduce(torch.tensor([3.0], device=module.device))
    assert len(reached) == 1
