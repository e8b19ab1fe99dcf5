"""WeightDecaySchedule under a real Trainer (the update SGD applies at every step, restore, resume, refusals, CLI), and
``cutoff_signal="critical_period"`` of the three schedules (the switch at the step the monitor declares)."""

from __future__ import annotations

import sys
import types
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from conftest import QUICKSTART, gaussian_loader, make_trainer, read_images, read_scalars
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_fisher_callback import StopAt
from test_schedule_callbacks import _same_batches
from torch import nn
from torch.nn import functional as F

from lightning_startwell.callbacks import DropoutSchedule, StochasticDepthSchedule, WeightDecaySchedule
from lightning_startwell.cli import main
from lightning_startwell.models import MLP, ResNet

LR, WD = 0.1, 1e-2


class TwoGroups(pl.LightningModule):
    """A linear classifier whose weight is in a group with weight decay ``WD`` and whose bias is in one with 0."""

    def __init__(self, optimizer: str = "sgd", weight_decay: float = WD) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        linear = self.net[1]
        groups = [
            {"params": [linear.weight], "weight_decay": self.weight_decay},
            {"params": [linear.bias], "weight_decay": 0.0},
        ]
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=LR)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(groups, lr=LR)
        return torch.optim.SGD(groups, lr=LR, momentum=0.0)


class RecordUpdates(Callback):
    """Parameters and gradients just before every optimizer step, and parameters after it."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = list(pl_module.parameters())
        self.records.append({
            "step": trainer.global_step,
            "before": [p.detach().double().clone() for p in params],
            "grads": [p.grad.detach().double().clone() for p in params],
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.records:  # with accumulation, a micro-batch without a step leaves the parameters as they were
            self.records[-1]["after"] = [p.detach().double().clone() for p in pl_module.parameters()]


def _expected_wd(step: int, mode: str, cutoff: int) -> float:
    """The weight decay of the first group at ``step``, written out independently of the library."""
    on = step < cutoff if mode == "early" else step >= cutoff
    return WD if on else 0.0


def _weight_decays(trainer: pl.Trainer) -> list[float]:
    return [group["weight_decay"] for group in trainer.optimizers[0].param_groups]


@pytest.mark.parametrize("mode", ["early", "late"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sgd_update_at_every_step_has_the_scheduled_weight_decay(tmp_path, mode, accumulate):
    record = RecordUpdates()
    steps, cutoff = 12 // accumulate, 5 // accumulate  # 4 batches an epoch, 3 epochs
    trainer = make_trainer(
        tmp_path, [WeightDecaySchedule(mode=mode, cutoff_steps=cutoff), record], max_epochs=3,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(TwoGroups(), gaussian_loader(num=64, batch_size=16))
    assert [r["step"] for r in record.records] == list(range(steps))
    for r in record.records:
        wd = _expected_wd(r["step"], mode, cutoff)
        (w0, b0), (gw, gb), (w1, b1) = r["before"], r["grads"], r["after"]
        torch.testing.assert_close(w1, w0 - LR * (gw + wd * w0), rtol=0, atol=1e-7)  # weight: scheduled decay
        torch.testing.assert_close(b1, b0 - LR * gb, rtol=0, atol=1e-7)  # bias: its group has 0, left alone
        # the decay term is far above the tolerance: a wrong schedule fails the line above
        assert wd == 0 or (LR * wd * w0).abs().max() > 1e-5
    logged = read_scalars(tmp_path / "lightning_logs")
    expected = [_expected_wd(step, mode, cutoff) for step in range(steps)]
    assert [s for s, _ in logged["startwell/weight_decay/group_0"]] == list(range(steps))
    np.testing.assert_allclose([v for _, v in logged["startwell/weight_decay/group_0"]], expected, atol=1e-9)
    np.testing.assert_allclose([v for _, v in logged["startwell/weight_decay/factor"]], np.array(expected) / WD)
    assert "startwell/weight_decay/group_1" not in logged  # weight decay 0: not driven
    assert _weight_decays(trainer) == [WD, 0.0]  # put back after fit


@pytest.mark.parametrize("mode", ["early", "late"])
def test_adamw_decoupled_decay_follows_the_schedule(tmp_path, mode):
    # The fit against a plain loop over the same batches in which the group's weight decay is set by hand.
    loader = gaussian_loader(num=96, batch_size=16)  # 6 steps
    torch.manual_seed(0)
    model = TwoGroups("adamw")
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def loop(weight_decay_at):
        reference = TwoGroups("adamw")
        reference.load_state_dict(initial)
        optimizer = reference.configure_optimizers()
        for step, (x, y) in enumerate(loader):
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step)
            optimizer.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            optimizer.step()
        return reference.net[1].weight.detach()

    make_trainer(tmp_path, [WeightDecaySchedule(mode=mode, cutoff_steps=3)], max_epochs=1).fit(model, loader)
    weight = model.net[1].weight.detach()
    torch.testing.assert_close(weight, loop(lambda step: _expected_wd(step, mode, 3)), rtol=0, atol=1e-6)
    # the decoupled shrink, lr wd |w| = 1e-3 |w| a step, is far above that tolerance: constant decay differs
    assert (weight - loop(lambda step: WD)).abs().max() > 1e-5


def test_weight_decay_is_restored_when_fit_fails(tmp_path):
    class Fail(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 7:
                assert _weight_decays(trainer) == [0.0, 0.0]  # early, past the cutoff: off
                raise RuntimeError("boom")

    trainer = make_trainer(tmp_path, [WeightDecaySchedule(mode="early", cutoff_steps=5), Fail()], max_epochs=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TwoGroups(), gaussian_loader(num=64, batch_size=16))
    assert _weight_decays(trainer) == [WD, 0.0]


def test_mid_epoch_resume_continues_the_schedule_and_the_training(tmp_path):
    # late, cutoff 8, interrupted at step 5: the checkpoint's optimizer state holds weight decay 0 (off then); the
    # resumed run must still turn the group's own WD on at step 8.
    def run(root, ckpt_path=None, extra=()):
        torch.manual_seed(0)
        model = TwoGroups()
        trainer = make_trainer(
            root, [WeightDecaySchedule(mode="late", cutoff_steps=8), *extra], max_steps=14, max_epochs=-1
        )
        trainer.fit(model, _same_batches(), ckpt_path=ckpt_path)
        return model, trainer, read_scalars(root / "lightning_logs")

    full_model, _, full = run(tmp_path / "full")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "first", extra=[checkpoint, StopAt(5)])
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=5.ckpt", weights_only=False)
    assert [g["weight_decay"] for g in saved["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]
    resumed_model, trainer, resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    tag = "startwell/weight_decay/group_0"
    assert [s for s, _ in resumed[tag]] == list(range(5, 14))
    assert dict(resumed[tag]) == pytest.approx(dict(full[tag][5:]))
    assert [v for _, v in full[tag]] == pytest.approx([_expected_wd(s, "late", 8) for s in range(14)])
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert _weight_decays(trainer) == [WD, 0.0]


class FailIfTrained(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("training started")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"mode": "standard"}, "`mode`"),
        ({"mode": "middle"}, "`mode`"),
        ({"cutoff_steps": -1}, "cutoff_steps"),
        ({"cutoff_fraction": 1.5}, "cutoff_fraction"),
        ({"cutoff_epochs": 2, "cutoff_steps": 5}, "cutoff_epochs"),
        ({"cutoff_signal": "fisher"}, "cutoff_signal"),
        ({"cutoff_signal": "critical_period", "cutoff_epochs": 3, "cutoff_steps": 5}, "cutoff_epochs"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        WeightDecaySchedule(**kwargs)


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (TwoGroups("lbfgs"), "has no `weight_decay`"),
        (TwoGroups(weight_decay=0.0), "nothing to schedule"),
    ],
)
def test_optimizers_without_weight_decay_are_refused_before_training(tmp_path, model, named):
    trainer = make_trainer(tmp_path, [WeightDecaySchedule(cutoff_steps=2), FailIfTrained()], max_steps=4)
    with pytest.raises(ValueError, match=named):
        trainer.fit(model, gaussian_loader())
    before = [g.get("weight_decay") for g in model.configure_optimizers().param_groups]
    assert [g.get("weight_decay") for g in trainer.optimizers[0].param_groups] == before  # nothing applied


def test_fast_dev_run_applies_the_schedule_without_a_warning(tmp_path):
    record = RecordUpdates()
    trainer = make_trainer(tmp_path, [WeightDecaySchedule(mode="late", cutoff_epochs=50), record], fast_dev_run=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TwoGroups(), gaussian_loader())
    assert not [w for w in caught if "WeightDecaySchedule" in str(w.message)]
    (r,) = record.records  # late, before the cutoff: no decay
    torch.testing.assert_close(r["after"][0], r["before"][0] - LR * r["grads"][0], rtol=0, atol=1e-7)
    assert _weight_decays(trainer) == [WD, 0.0]


@pytest.mark.parametrize(("mode", "never"), [("early", "reaches 0"), ("late", "turns on")])
def test_a_cutoff_past_the_end_of_the_run_warns_and_trains(tmp_path, mode, never):
    trainer = make_trainer(tmp_path, [WeightDecaySchedule(mode=mode, cutoff_epochs=50)], max_steps=3)
    with pytest.warns(UserWarning, match=f"`cutoff_epochs`=50.*never {never}"):
        trainer.fit(TwoGroups(), gaussian_loader())
    assert trainer.global_step == 3


class TwoOptimizers(TwoGroups):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()

    def configure_optimizers(self):
        return super().configure_optimizers(), torch.optim.Adam(self.head.parameters(), lr=LR, weight_decay=3e-3)


def test_every_optimizer_is_driven(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, *args):
            self.seen.append([g["weight_decay"] for o in trainer.optimizers for g in o.param_groups])

    record = Record()
    trainer = make_trainer(tmp_path, [WeightDecaySchedule(mode="early", cutoff_steps=2), record], max_steps=4)
    trainer.fit(TwoOptimizers(), gaussian_loader())
    # manual optimization: global_step counts the steps of every optimizer, 2 a batch: only batch 0 is before step 2
    assert record.seen[0] == [WD, 0.0, 3e-3]
    assert all(seen == [0.0, 0.0, 0.0] for seen in record.seen[1:])
    logged = read_scalars(tmp_path / "lightning_logs")
    assert {"startwell/weight_decay/group_0", "startwell/weight_decay/group_2"} <= set(logged)
    assert [g["weight_decay"] for o in trainer.optimizers for g in o.param_groups] == [WD, 0.0, 3e-3]


def test_lightning_cli_yaml(tmp_path):
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning_startwell.WeightDecaySchedule", "init_args": {"mode": "early", "cutoff_steps": 3}}
    ]
    config["model"] = {
        "class_path": "lightning_startwell.MLP",
        "init_args": {"depth": 1, "width": 16, "optimizer": {"class_path": "torch.optim.AdamW",
                                                               "init_args": {"lr": 0.01, "weight_decay": 0.05}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.max_steps=6", "--trainer.log_every_n_steps=1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar=false"])
    logged = read_scalars(tmp_path / "lightning_logs")
    assert [v for _, v in logged["startwell/weight_decay/factor"]] == [1, 1, 1, 0, 0, 0]


# ---- cutoff_signal="critical_period" -------------------------------------------------------------------------------


def _resnet() -> ResNet:
    """A small ResNet with dropout, residual blocks and an SGD with weight decay: every schedule has something."""
    return ResNet(num_blocks=2, width=4, dropout=0.2, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=WD))


class StandInMonitor(Callback):
    """Declares the critical period ended at the first step >= ``declare_at`` (``end_step``, as the monitor does)."""

    def __init__(self, declare_at=None) -> None:
        self.declare_at = declare_at
        self.end_step = None

    def on_train_batch_end(self, trainer, *args):
        if self.end_step is None and self.declare_at is not None and trainer.global_step >= self.declare_at:
            self.end_step = trainer.global_step


@pytest.fixture
def stand_in_monitor(monkeypatch):
    """``find_critical_period_monitor`` finds the stand-in."""
    try:
        from lightning_startwell.callbacks import critical_period
    except ImportError:  # the monitor's module not there yet
        critical_period = types.ModuleType("lightning_startwell.callbacks.critical_period")
        monkeypatch.setitem(sys.modules, critical_period.__name__, critical_period)

    def find(trainer):
        return next((cb for cb in trainer.callbacks if isinstance(cb, StandInMonitor)), None)

    monkeypatch.setattr(critical_period, "find_critical_period_monitor", find, raising=False)


@pytest.mark.parametrize(
    ("make", "tag", "before", "after"),
    [
        (lambda: DropoutSchedule(p=0.3, mode="early", shape="constant", cutoff_signal="critical_period"),
         "startwell/dropout/rate", 0.3, 0.0),
        (lambda: DropoutSchedule(p=0.3, mode="late", shape="constant", cutoff_signal="critical_period"),
         "startwell/dropout/rate", 0.0, 0.3),
        (lambda: StochasticDepthSchedule(drop_rate=0.4, mode="early", cutoff_signal="critical_period"),
         "startwell/depth/drop_rate", 0.4, 0.0),
        (lambda: StochasticDepthSchedule(drop_rate=0.4, mode="late", cutoff_signal="critical_period"),
         "startwell/depth/drop_rate", 0.0, 0.4),
        (lambda: WeightDecaySchedule(mode="early", cutoff_signal="critical_period"),
         "startwell/weight_decay/factor", 1.0, 0.0),
        (lambda: WeightDecaySchedule(mode="late", cutoff_signal="critical_period"),
         "startwell/weight_decay/factor", 0.0, 1.0),
    ],
)
@pytest.mark.parametrize("declare_at", [6, None])
def test_schedules_switch_at_the_step_the_monitor_declares(tmp_path, stand_in_monitor, make, tag, before, after,
                                                           declare_at):
    monitor = StandInMonitor(declare_at)
    schedule = make()
    model = _resnet()
    trainer = make_trainer(tmp_path, [monitor, schedule], max_steps=12, max_epochs=-1)
    trainer.fit(model, gaussian_loader())
    assert monitor.end_step == declare_at
    logged = read_scalars(tmp_path / "lightning_logs")[tag]
    assert [s for s, _ in logged] == list(range(12))
    end = 12 if declare_at is None else declare_at
    assert [v for _, v in logged] == pytest.approx([before] * end + [after] * (12 - end))
    assert schedule.current_cutoff() == declare_at


@pytest.mark.parametrize(
    ("make", "tag", "before", "after"),
    [
        (lambda: DropoutSchedule(p=0.3, mode="early", shape="constant", cutoff_signal="critical_period",
                                 cutoff_steps=8), "startwell/dropout/rate", 0.3, 0.0),
        (lambda: WeightDecaySchedule(mode="late", cutoff_signal="critical_period", cutoff_fraction=8 / 12),
         "startwell/weight_decay/factor", 0.0, 1.0),
    ],
)
@pytest.mark.parametrize(("declare_at", "switch"), [(None, 8), (5, 5), (10, 8)])
def test_a_fixed_cutoff_beside_the_signal_is_a_deadline(tmp_path, stand_in_monitor, make, tag, before, after,
                                                        declare_at, switch):
    # the end of the critical period, or the fixed cutoff (step 8) if it has not been declared by then
    schedule = make()
    trainer = make_trainer(tmp_path, [StandInMonitor(declare_at), schedule], max_steps=12, max_epochs=-1)
    trainer.fit(_resnet(), gaussian_loader())
    logged = read_scalars(tmp_path / "lightning_logs")[tag]
    assert [v for _, v in logged] == pytest.approx([before] * switch + [after] * (12 - switch))
    assert schedule.current_cutoff() == switch
    assert "at the latest at optimizer step 8" in schedule.cutoff_description()


def test_the_weight_decay_applied_switches_at_the_declared_step(tmp_path, stand_in_monitor):
    record = RecordUpdates()
    schedule = WeightDecaySchedule(mode="early", cutoff_signal="critical_period")
    trainer = make_trainer(tmp_path, [StandInMonitor(5), schedule, record], max_steps=10)
    trainer.fit(TwoGroups(), gaussian_loader(num=256))
    for r in record.records:
        wd = _expected_wd(r["step"], "early", 5)
        (w0, _), (gw, _), (w1, _) = r["before"], r["grads"], r["after"]
        torch.testing.assert_close(w1, w0 - LR * (gw + wd * w0), rtol=0, atol=1e-7)
    assert _weight_decays(trainer) == [WD, 0.0]


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: DropoutSchedule(mode="early", shape="linear", cutoff_signal="critical_period"), "`shape`"),
        (lambda: DropoutSchedule(mode="early", shape="cosine", cutoff_signal="critical_period"), "`shape`"),
        (lambda: StochasticDepthSchedule(mode="early", shape="linear", cutoff_signal="critical_period"), "`shape`"),
        (lambda: StochasticDepthSchedule(mode="standard", cutoff_signal="critical_period"), "mode 'standard'"),
        (lambda: DropoutSchedule(mode="late", shape="constant", cutoff_signal="critical_period", cutoff_steps=4,
                                 cutoff_epochs=1), "cutoff_epochs"),
        (lambda: StochasticDepthSchedule(mode="late", cutoff_signal="critical_period", cutoff_fraction=1.2),
         "cutoff_fraction"),
        (lambda: DropoutSchedule(mode="late", shape="constant", cutoff_signal="loss"), "cutoff_signal"),
    ],
)
def test_cutoff_signal_refusals_at_construction(make, named):
    with pytest.raises(ValueError, match=named):
        make()


@pytest.mark.parametrize(
    "schedule",
    [
        DropoutSchedule(mode="late", shape="constant", cutoff_signal="critical_period"),
        StochasticDepthSchedule(mode="late", cutoff_signal="critical_period"),
        WeightDecaySchedule(mode="early", cutoff_signal="critical_period"),
    ],
)
def test_cutoff_signal_without_a_monitor_is_refused_at_fit_start(tmp_path, schedule):
    trainer = make_trainer(tmp_path, [schedule, FailIfTrained()], max_steps=4)
    with pytest.raises(ValueError, match="CriticalPeriodMonitor"):
        trainer.fit(_resnet(), gaussian_loader())


@pytest.mark.pictures
@pytest.mark.parametrize("declare_at", [None, 3])
def test_the_schedule_picture_draws_an_undeclared_cutoff_until_now(tmp_path, stand_in_monitor, declare_at):
    schedules = [
        DropoutSchedule(p=0.3, mode="early", shape="constant", cutoff_signal="critical_period"),
        StochasticDepthSchedule(drop_rate=0.4, mode="late", cutoff_signal="critical_period"),
    ]
    trainer = make_trainer(tmp_path, [StandInMonitor(declare_at), *schedules], max_steps=6, max_epochs=-1)
    trainer.fit(_resnet(), gaussian_loader())
    pictures = read_images(tmp_path / "lightning_logs")["startwell/schedule/overview"]
    assert [step for step, _ in pictures] == [0, 6]
    plan = schedules[0].planned_rates(list(range(6)))
    assert plan == ([0.3] * 6 if declare_at is None else [0.3] * 3 + [0.0] * 3)
    if declare_at is None:  # unknown past the last step applied
        assert all(np.isnan(schedules[0].planned_rates([6, 7])))
    else:
        assert schedules[0].planned_rates([6, 7]) == [0.0, 0.0]


def test_mlp_without_weight_decay_in_default_sgd_is_refused(tmp_path):
    # the demo models' default optimizer is SGD without weight decay: nothing to schedule, and the error says so
    with pytest.raises(ValueError, match="weight_decay"):
        make_trainer(tmp_path, [WeightDecaySchedule(cutoff_steps=2)], max_steps=2).fit(MLP(), gaussian_loader())


# ---- with the real CriticalPeriodMonitor ----------------------------------------------------------------------------

#: The Fisher penalty the scripted monitor "measures" at each step: the rule (window 1, fraction 0.5, patience 2)
#: sees it fall below half its maximum at steps 4 and 5, and ends the period at step 5.
SCRIPT = [1.0, 2.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
DECLARED = 5


def _scripted_monitor():
    from lightning_startwell.callbacks import CriticalPeriodMonitor

    class ScriptedMonitor(CriticalPeriodMonitor):
        """The real monitor (rule, end_step, checkpoint), measuring SCRIPT instead of the Fisher penalty."""

        def _fisher_penalty(self, trainer, pl_module, batch, step):
            return SCRIPT[step]

    return ScriptedMonitor(every_n_steps=1, window=1, fraction=0.5, patience=2, min_measurements=1)


def _signal_schedules():
    return [
        DropoutSchedule(p=0.3, mode="early", shape="constant", cutoff_signal="critical_period"),
        StochasticDepthSchedule(drop_rate=0.4, mode="late", cutoff_signal="critical_period"),
        WeightDecaySchedule(mode="early", cutoff_signal="critical_period"),
    ]


TAGS = {"startwell/dropout/rate": (0.3, 0.0), "startwell/depth/drop_rate": (0.0, 0.4),
        "startwell/weight_decay/factor": (1.0, 0.0)}


def _check_switch(logged, switch, steps):
    for tag, (before, after) in TAGS.items():
        assert [s for s, _ in logged[tag]] == list(steps), tag
        assert [v for _, v in logged[tag]] == pytest.approx([before if s < switch else after for s in steps]), tag


def test_schedules_switch_at_the_end_step_of_the_real_monitor(tmp_path):
    monitor = _scripted_monitor()
    schedules = _signal_schedules()
    trainer = make_trainer(tmp_path, [monitor, *schedules], max_steps=12, max_epochs=-1)
    trainer.fit(_resnet(), gaussian_loader())
    assert monitor.end_step == DECLARED
    _check_switch(read_scalars(tmp_path / "lightning_logs"), DECLARED, range(12))
    assert [s.current_cutoff() for s in schedules] == [DECLARED] * 3


def test_a_schedule_listed_before_the_monitor_warns_and_switches_one_step_later(tmp_path):
    monitor = _scripted_monitor()
    trainer = make_trainer(tmp_path, [*_signal_schedules(), monitor], max_steps=12, max_epochs=-1)
    with pytest.warns(UserWarning, match="List the monitor first"):
        trainer.fit(_resnet(), gaussian_loader())
    assert monitor.end_step == DECLARED
    _check_switch(read_scalars(tmp_path / "lightning_logs"), DECLARED + 1, range(12))


@pytest.mark.parametrize("stop", [4, 7])  # a checkpoint before the end is declared, and one after
def test_resume_with_the_real_monitor_has_the_uninterrupted_switch(tmp_path, stop):
    def run(root, ckpt_path=None, extra=()):
        make_trainer(root, [_scripted_monitor(), *_signal_schedules(), *extra], max_steps=12, max_epochs=-1).fit(
            _resnet(), _same_batches(), ckpt_path=ckpt_path
        )
        return read_scalars(root / "lightning_logs")

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    run(tmp_path / "first", extra=[checkpoint, StopAt(stop)])
    resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt")
    _check_switch(resumed, DECLARED, range(stop, 12))


def test_example_config_runs_from_the_command_line(tmp_path):
    config = QUICKSTART.parent / "critical_period_weight_decay.yaml"
    main(["fit", "--config", str(config), "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar=false"])
    logged = read_scalars(tmp_path / "lightning_logs")
    factor = [v for _, v in logged["startwell/weight_decay/factor"]]
    assert factor[0] == 1.0 and set(factor) <= {0.0, 1.0}
    assert "startwell/critical_period/signal" in logged
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    assert [c["class_path"].rpartition(".")[2] for c in callbacks] == ["CriticalPeriodMonitor", "WeightDecaySchedule"]


def test_fit_start_report_names_the_groups_values_and_cutoff(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [WeightDecaySchedule(mode="late", cutoff_steps=3)], max_steps=4).fit(
            TwoGroups(), gaussian_loader()
        )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WeightDecaySchedule attached:")]
    assert "param groups driven (weight decay as built): 1 (group_0 (SGD 0, group 0): 0.01)" in line
    assert "late (0 before the cutoff, on from it), cutoff at optimizer step 3" in line
