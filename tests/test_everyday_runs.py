"""The first runs a Lightning user makes on a new config, with every callback attached and the cutoffs of the paper's
300-epoch recipe: short debug runs, the tuners, mixed precision, and evaluation without fit. None may fail; a cutoff
past the end of the run is one warning per callback, and none under ``fast_dev_run`` or inside a tuner's own fit."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import gaussian_loader, make_trainer, read_scalars
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.tuner import Tuner

from lightning_startwell import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)

OURS = ("InitScheme", "SignalPropagationMonitor", "DropoutSchedule", "StochasticDepthSchedule", "FisherTraceMonitor",
        "DeficitInjector")


def every_callback():
    return [
        InitScheme(),
        SignalPropagationMonitor(every_n_steps=2),
        DropoutSchedule(p=0.1, mode="early", cutoff_epochs=50),
        StochasticDepthSchedule(drop_rate=0.4, mode="late", cutoff_epochs=50),
        FisherTraceMonitor(num_samples=16),
        DeficitInjector("blur", start_epoch=0, end_epoch=20, size=4),
    ]


class TunableResNet(ResNet):
    """The demo ResNet with the ``lr`` attribute the LR finder reads."""

    def __init__(self) -> None:
        super().__init__(num_blocks=2, width=8, dropout=0.1)
        self.lr = 0.05

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def our_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(OURS)]


def fit(tmp_path, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, every_callback(), **kwargs)
        trainer.fit(TunableResNet(), gaussian_loader())
    return our_warnings(caught)


def test_fast_dev_run_trains_without_a_warning(tmp_path):
    assert fit(tmp_path, fast_dev_run=True) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"max_steps": 3}, {"limit_train_batches": 2}, {"precision": "bf16-mixed", "max_steps": 2}],
    ids=["max_steps", "limit_train_batches", "bf16-mixed"],
)
def test_short_runs_warn_once_per_cutoff_past_the_end(tmp_path, kwargs):
    messages = fit(tmp_path, **kwargs)
    dropout = [m for m in messages if m.startswith("DropoutSchedule")]
    depth = [m for m in messages if m.startswith("StochasticDepthSchedule")]
    deficit = [m for m in messages if m.startswith("DeficitInjector")]
    assert len(dropout) == len(depth) == len(deficit) == 1, messages
    assert "`cutoff_epochs`=50" in dropout[0] and "never reaches 0" in dropout[0]
    assert "`cutoff_epochs`=50" in depth[0] and "never turns on" in depth[0]
    assert "(0, 20)" in deficit[0]


def test_a_cutoff_within_the_run_gives_no_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks = [DropoutSchedule(p=0.1, mode="early", cutoff_steps=4),
                     StochasticDepthSchedule(mode="late", cutoff_steps=4)]
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(TunableResNet(), gaussian_loader())
    assert our_warnings(caught) == []


class SizedResNet(TunableResNet):
    """Builds its own loader from ``batch_size``, as the batch-size finder needs."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 8

    def train_dataloader(self):
        return gaussian_loader(num=128, batch_size=self.batch_size)

    def val_dataloader(self):
        return gaussian_loader(num=32, batch_size=self.batch_size)


def test_the_tuners_run_with_every_callback_and_do_not_warn(tmp_path):
    model = SizedResNet()
    trainer = make_trainer(tmp_path, every_callback(), max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner = Tuner(trainer)
        result = tuner.lr_find(model, num_training=5, update_attr=False, early_stop_threshold=None)
        size = tuner.scale_batch_size(model, mode="power", steps_per_trial=1, max_trials=2, init_val=8)
    assert result is not None and len(result.results["lr"]) == 5
    assert size == 16  # trials at 8 and 16 both ran (a failed trial halves)
    assert our_warnings(caught) == []


def test_the_lr_finder_callback_runs_before_a_real_fit(tmp_path):
    callbacks = [*every_callback(), LearningRateFinder(num_training_steps=4)]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, max_steps=6)
    trainer.fit(TunableResNet(), gaussian_loader())
    assert trainer.global_step == 6
    assert callbacks[0].applied  # the tuner's checkpoint restore is not a resume: the real fit is initialised


def test_evaluation_without_fit(tmp_path):
    trainer = make_trainer(tmp_path, every_callback(), limit_val_batches=None)
    model = TunableResNet()
    assert trainer.validate(model, gaussian_loader(), verbose=False)
    assert trainer.test(model, gaussian_loader(), verbose=False)
    predictions = trainer.predict(model, gaussian_loader())
    assert torch.cat(predictions).shape == (64, 10)
    assert not every_callback()[0].applied


def test_fisher_monitor_without_arguments_measures_every_epoch(tmp_path):
    trainer = make_trainer(tmp_path, [FisherTraceMonitor()], max_epochs=3)
    trainer.fit(TunableResNet(), gaussian_loader())  # 4 batches per epoch
    steps = [step for step, _ in read_scalars(tmp_path)["startwell/fisher/trace"]]
    assert steps == [0, 4, 8, 12]


def test_fisher_settings_past_this_run_warn_and_still_measure_the_initialisation(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [FisherTraceMonitor(num_samples=100, every_n_epochs=5)], max_epochs=2)
        trainer.fit(TunableResNet(), gaussian_loader())  # 64 items, 8 steps
    messages = our_warnings(caught)
    assert len(messages) == 2, messages
    assert "`num_samples`=100 > 64 training items" in messages[0]
    assert "`every_n_epochs`=5" in messages[1] and "(8 optimizer steps)" in messages[1]
    assert [step for step, _ in read_scalars(tmp_path)["startwell/fisher/trace"]] == [0]
