"""Sharded strategies (FSDP, DeepSpeed, ModelParallel): each callback runs or refuses at fit start, before anything
changes, with an error naming the strategy (docs/accelerators.md, "Sharded strategies").

FSDP needs an accelerator: on the CPU a subclass of Lightning's ``FSDPStrategy`` (the Trainer checks the class exactly)
reaches the callbacks' ``setup``, which runs before the model is wrapped, and fails there. ModelParallelStrategy sets up
on gloo. DeepSpeed is not installed: its strategy is an instance made without ``__init__``, and the callbacks' setup is
called with a stand-in trainer."""

from __future__ import annotations

import os
import types

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from lightning_startwell.callbacks import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.callbacks._strategy import sharded_strategy
from lightning_startwell.models import MLP, ResNet


class CPUFSDP(FSDPStrategy):
    """Lightning's FSDP strategy, past the Trainer's GPU check."""


def stand_in(cls):
    return cls.__new__(cls)  # an instance of the class, without its __init__ (DeepSpeed's needs the package)


def mlp():
    return MLP(depth=2, width=16, dropout=0.1)


def resnet():
    return ResNet(num_blocks=2, width=8)


# (callback, model, the strategies it refuses)
ALL = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
CASES = {
    "init": (lambda: InitScheme("he_normal", seed=0), mlp, ALL),
    "fisher": (lambda: FisherTraceMonitor(num_samples=16, batch_size=8), mlp, ALL),
    "dynamics": (lambda: GradientDynamicsMonitor(num_batches=2), mlp, ALL),
    "signal": (lambda: SignalPropagationMonitor(every_n_steps=1), mlp, ALL),
    "depth": (lambda: StochasticDepthSchedule(0.2), resnet, ("FSDPStrategy", "ModelParallelStrategy")),
    "dropout": (lambda: DropoutSchedule(0.2, mode="standard"), mlp, ()),
    "dropout-exclude": (lambda: DropoutSchedule(0.2, mode="standard", exclude=["net.3"]), mlp, ("FSDPStrategy",)),
    "dropout-attributes": (lambda: DropoutSchedule(0.2, mode="standard", attributes=["*.p"]), mlp, ("FSDPStrategy",)),
    "blur": (lambda: DeficitInjector("blur", size=4), mlp, ()),
    "noise": (lambda: DeficitInjector("noise"), mlp, ("ModelParallelStrategy",)),
    "deprivation": (lambda: DeficitInjector("deprivation"), mlp, ("ModelParallelStrategy",)),
}
STAND_INS = {
    "FSDPStrategy": lambda: stand_in(FSDPStrategy),
    "DeepSpeedStrategy": lambda: stand_in(DeepSpeedStrategy),
    "ModelParallelStrategy": lambda: ModelParallelStrategy(),
}


def state(model: torch.nn.Module) -> dict:
    """What a callback could change before training: parameters and buffers, dropout rates, hooks."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "rates": {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["rates"] == after["rates"] and before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k


@pytest.fixture
def process_group_cleaned():
    """The strategies below start a one-process gloo group and set the rendezvous variables: undone afterwards."""
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_at_fit_start_by_a_real_trainer(tmp_path, process_group_cleaned, case, strategy):
    make_callback, make_model, refused = CASES[case]
    if strategy not in refused:
        pytest.skip("supported: checked by the stand-in test below (a real fit needs an accelerator)")
    model = make_model()
    before = state(model)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        strategy=CPUFSDP() if strategy == "FSDPStrategy" else ModelParallelStrategy(), callbacks=[make_callback()],
    )
    with pytest.raises(ValueError, match=f"does not support `strategy`=.*{strategy}") as error:
        trainer.fit(model, gaussian_loader())
    assert "ddp" in str(error.value).lower()  # what to do instead
    assert_same(before, state(model))
    assert trainer.global_step == 0


@pytest.mark.parametrize("strategy", sorted(STAND_INS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_callback_refuses_or_accepts_each_strategy(case, strategy):
    make_callback, make_model, refused = CASES[case]
    trainer = types.SimpleNamespace(strategy=STAND_INS[strategy]())
    callback, model = make_callback(), make_model()
    before = state(model)
    if strategy in refused:
        with pytest.raises(ValueError, match=f"does not support `strategy`={strategy}"):
            callback.setup(trainer, model, "fit")
    else:
        callback.setup(trainer, model, "fit")
    callback.setup(trainer, model, "validate")  # only a fit is refused
    assert_same(before, state(model))


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_parallel_and_single_device_are_not_refused(case):
    make_callback, make_model, _ = CASES[case]
    for strategy in (DDPStrategy(), SingleDeviceStrategy(torch.device("cpu"))):
        make_callback().setup(types.SimpleNamespace(strategy=strategy), make_model(), "fit")


def test_detection_by_class_and_by_name():
    assert sharded_strategy(CPUFSDP()) == "FSDPStrategy"  # a subclass counts as its base
    assert sharded_strategy(DDPStrategy()) is None
    assert sharded_strategy(None) is None

    class DeepSpeedStrategy:  # e.g. a strategy of another package, by the same name
        pass

    class Custom(DeepSpeedStrategy):
        pass

    assert sharded_strategy(Custom()) == "DeepSpeedStrategy"
