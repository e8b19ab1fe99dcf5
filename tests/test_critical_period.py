"""CriticalPeriodMonitor and its pure core: the end-of-critical-period rule on synthetic signals with a known peak, the
Fisher penalty against a plain autograd loop, real fits with an injected signal, resume, DDP."""

from __future__ import annotations

import copy
import json
import math
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import REPO, ddp_spawn_flake, make_trainer, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from test_fisher_callback import StopAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import (
    CriticalPeriodMonitor,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    find_critical_period_monitor,
)
from lightning_startwell.callbacks.critical_period import penalty_seed
from lightning_startwell.cli import main
from lightning_startwell.critical_period import (
    CriticalPeriodRule,
    critical_period_end,
    fisher_penalty,
    smoothed_signal,
)
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import MLP, ResNet

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(96, 1, 8, 8, generator=G), torch.randint(0, 10, (96,), generator=G)

# Rises to a peak of 10 at index 4, falls, stays low. Window 1: below 5 from index 7 on -> third in a row at 9. Window
# 3: the smoothed peak is 26/3 at index 5; index 8's mean (6 + 4 + 3) / 3 = 13/3 equals half of it, not below; below
# from index 9 on -> third in a row at 11.
PEAKED = [1.0, 2.0, 4.0, 8.0, 10.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def loader(batch_size=16, x=X, y=Y):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def logged(root):
    scalars = read_scalars(root / "lightning_logs")
    prefix = "startwell/critical_period/"
    return {tag.removeprefix(prefix): dict(v) for tag, v in scalars.items() if tag.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------- rule


@pytest.mark.parametrize("window, expected", [(1, 9), (3, 11)])
def test_a_peak_and_a_fall_end_at_the_index_worked_out_by_hand(window, expected):
    assert critical_period_end(PEAKED, window=window, fraction=0.5, patience=3, min_measurements=1) == expected


def test_patience_and_min_measurements_delay_the_end():
    falls_at_once = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    kwargs = dict(window=1, fraction=0.5)
    assert critical_period_end(falls_at_once, patience=3, min_measurements=1, **kwargs) == 3
    assert critical_period_end(falls_at_once, patience=1, min_measurements=1, **kwargs) == 1
    assert critical_period_end(falls_at_once, patience=3, min_measurements=6, **kwargs) == 5
    assert critical_period_end(falls_at_once, patience=3, min_measurements=7, **kwargs) is None
    assert critical_period_end(falls_at_once, patience=6, min_measurements=1, **kwargs) is None  # only 5 after


@pytest.mark.parametrize(
    "values",
    [
        [3.0] * 30,  # flat
        [float(i) for i in range(30)],  # rising
        [10.0] + [5.0] * 30,  # falls to exactly fraction x max: not below
        [1.0, 10.0, 6.0, 9.0, 5.5, 8.0, 6.0] * 4,  # oscillates above half the peak
    ],
    ids=["flat", "rising", "at-the-fraction", "oscillating"],
)
def test_a_signal_that_does_not_fall_below_the_fraction_never_ends(values):
    for window in (1, 3):
        assert critical_period_end(values, window=window, fraction=0.5, patience=3, min_measurements=1) is None


def test_the_window_smooths_a_single_dip_away():
    # One dip at index 4 (3 < 5) ends the period at once without smoothing; with a window of 3 the means are 23/3 at
    # indices 4-6, 22/3 at 8, and 14/3 < 5 at 9 first.
    noisy = [1.0, 5.0, 10.0, 10.0, 3.0, 10.0, 10.0, 10.0, 2.0, 2.0, 2.0, 2.0]
    assert critical_period_end(noisy, window=1, patience=1, min_measurements=1) == 4
    assert critical_period_end(noisy, window=3, patience=1, min_measurements=1) == 9


def test_a_noisy_bump_ends_after_its_peak_with_the_window():
    # A bump peaking at index 20 (value 10) plus noise of +-1.5, alternating, that lets the raw signal cross half the
    # peak back and forth around the true crossing; a window of 4 averages the alternation away.
    t = np.arange(80)
    clean = 10.0 * np.exp(-(((t - 20) / 12.0) ** 2))
    noisy = clean + 1.5 * (-1.0) ** t
    first_below = int(np.argmax((t > 20) & (clean < 5.0)))  # the clean curve's crossing
    end = critical_period_end(noisy.tolist(), window=4, fraction=0.5, patience=3, min_measurements=1)
    assert end is not None and first_below <= end <= first_below + 5
    raw = critical_period_end(noisy.tolist(), window=1, fraction=0.5, patience=1, min_measurements=1)
    assert raw is not None and raw < first_below  # without the window a noise dip ends it early


def test_the_online_rule_and_the_smoothed_signal_agree_with_numpy():
    values = np.random.default_rng(0).gamma(2.0, size=50).tolist()
    for window in (1, 2, 5):
        expected = [np.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
        assert smoothed_signal(values, window) == pytest.approx(expected, rel=1e-12)
        rule = CriticalPeriodRule(window, 0.5, 2, 1)
        online = []
        for value in values:
            rule.update(value)
            online.append(rule.smoothed)
        assert online == pytest.approx(expected, rel=1e-12)
        assert rule.maximum == pytest.approx(max(expected), rel=1e-12)


def test_non_finite_measurements_are_left_out_of_the_rule():
    assert critical_period_end([10.0, math.nan, 1.0, math.inf, 1.0, 1.0], window=1, patience=3, min_measurements=1) == 5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"signal": "trace"}, "signal"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window": 0}, "window"),
        ({"window": 2.5}, "window"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"fraction": True}, "fraction"),
        ({"fraction": "half"}, "fraction"),
        ({"patience": 0}, "patience"),
        ({"min_measurements": 0}, "min_measurements"),
        ({"seed": -1}, "seed"),
        ({"input_key": []}, "input_key"),
        ({"mask_key": 1.5}, "mask_key"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        CriticalPeriodMonitor(**kwargs)
    if name in ("window", "fraction", "patience", "min_measurements"):
        with pytest.raises(ValueError, match=f"`{name}`"):
            CriticalPeriodRule(**kwargs)


# ------------------------------------------------------------------------------------------------------ Fisher penalty


def penalty_by_hand(model, x, seed, mask=None):
    """||grad (1/N) sum -log p(y | x)||^2, y drawn from softmax with a generator seeded ``seed``, by .backward() on a
    copy of the model, per sample (and position), summed in float64."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        out = model(x)
    probs = out.softmax(-1).reshape(-1, out.shape[-1])
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).reshape(out.shape[:-1])
    keep = torch.ones(labels.shape, dtype=torch.bool) if mask is None else mask.bool()
    total = 0
    for n in range(len(x)):  # a plain loop: one sample at a time
        log_probs = model(x[n : n + 1])[0].log_softmax(-1)
        if log_probs.ndim == 1:
            total = total - log_probs[labels[n]]
        else:
            for t in range(log_probs.shape[0]):
                if keep[n, t]:
                    total = total - log_probs[t, labels[n, t]]
    (total / keep.sum()).backward()
    return sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())


def test_the_fisher_penalty_equals_a_plain_autograd_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(7, 5)
    value = fisher_penalty(model, x, generator=torch.Generator().manual_seed(3))
    assert value == pytest.approx(penalty_by_hand(model, x, 3), rel=1e-6)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    other = fisher_penalty(model, x, generator=torch.Generator().manual_seed(4))
    assert other == pytest.approx(penalty_by_hand(model, x, 4), rel=1e-6) and other != value


def test_the_fisher_penalty_times_the_batch_size_averages_to_the_exact_fisher_trace_of_the_batch():
    # Labels drawn from the model: the per-sample gradients have mean zero over y and the cross terms of the squared
    # norm of their mean vanish in expectation, E_y[FP] = tr F / N (the biased-proxy relation the docs state).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(6, 5)
    draws = [fisher_penalty(model, x, generator=torch.Generator().manual_seed(s)) for s in range(1000)]
    exact = fisher_trace(model, x, fisher="exact").total
    assert 6 * float(np.mean(draws)) == pytest.approx(exact, rel=0.05)
    assert float(np.mean(draws)) < exact / 3  # the squared norm of the mean, not the trace


def test_the_fisher_penalty_of_a_sequence_model_counts_the_positions_the_mask_keeps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))  # (N, T, 4) -> (N, T, 5) logits
    x = torch.randn(3, 6, 4)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    value = fisher_penalty(model, x, generator=torch.Generator().manual_seed(1), mask=mask)
    assert value == pytest.approx(penalty_by_hand(model, x, 1, mask), rel=1e-6)
    unmasked = fisher_penalty(model, x, generator=torch.Generator().manual_seed(1))
    assert unmasked == pytest.approx(penalty_by_hand(model, x, 1), rel=1e-6) and unmasked != value


def test_the_logged_penalty_is_the_one_of_each_training_batch(tmp_path):
    model = MLP(depth=2, width=16, optimizer=frozen_sgd)  # learning rate 0: the same weights at every step
    net = copy.deepcopy(model)
    monitor = CriticalPeriodMonitor(every_n_steps=2, seed=5)
    make_trainer(tmp_path, [monitor], max_steps=6).fit(model, loader())
    values = logged(tmp_path)["signal"]
    assert sorted(values) == [0, 2, 4]
    for step in (0, 2, 4):
        x = X[16 * step : 16 * (step + 1)]
        assert values[step] == pytest.approx(penalty_by_hand(net, x, penalty_seed(5, step, 0)), rel=1e-5)
    assert [s for s, _ in monitor.history] == [0, 2, 4]


def test_training_is_the_same_with_and_without_the_monitor(tmp_path):
    """Dropout and BatchNorm in the model: the extra pass would move the running statistics, draw from the global
    random streams or add to .grad if it did any of these."""

    def run(root, callbacks):
        pl.seed_everything(0)
        model = ResNet(num_blocks=1, width=8, dropout=0.3)
        make_trainer(root, callbacks, max_steps=4, deterministic=True).fit(model, loader())
        return model.state_dict(), torch.get_rng_state()

    plain = run(tmp_path / "plain", [])
    monitored = run(tmp_path / "monitored", [CriticalPeriodMonitor(every_n_steps=1)])
    for name, value in plain[0].items():
        assert torch.equal(value, monitored[0][name]), name
    assert torch.equal(plain[1], monitored[1])
    assert sorted(logged(tmp_path / "monitored")["signal"]) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------- fits with a known signal


class ScriptedFisher(FisherTraceMonitor):
    """A FisherTraceMonitor stand-in whose trace at step t is ``values[t]``, measured at every step (step 0 at the
    start of training, the others after each step), as the real one: its latest measurement in ``last_trace``."""

    def __init__(self, values):
        super().__init__(every_n_steps=1, log_images=False)
        self.values = values

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self._measure(trainer, pl_module)

    def _measure(self, trainer, pl_module):
        step = trainer.global_step
        self._last_step = step
        self.last_trace = (step, self.values[step])


def fit(root, callbacks, max_steps, ckpt_path=None):
    pl.seed_everything(0)
    trainer = make_trainer(root, callbacks, max_steps=max_steps, max_epochs=-1)
    trainer.fit(MLP(depth=1, width=8, optimizer=plain_sgd), loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-first", "fisher-first"])
def test_a_fit_ends_the_period_at_the_step_of_the_known_peak_and_fall(tmp_path, monitor_first):
    monitor = CriticalPeriodMonitor(signal="fisher")  # defaults: window 3, fraction 0.5, patience 3, 5 measurements
    fisher = ScriptedFisher(PEAKED)
    trainer = fit(tmp_path, [monitor, fisher] if monitor_first else [fisher, monitor], max_steps=15)
    assert monitor.end_step == 11  # the trace measured at step t is PEAKED[t]: index 11 (worked out above)
    assert find_critical_period_monitor(trainer) is monitor
    values = logged(tmp_path)
    assert values["signal"] == {t: PEAKED[t] for t in range(16)}
    assert values["smoothed"] == pytest.approx({t: float(np.mean(PEAKED[max(0, t - 2) : t + 1])) for t in range(16)})
    assert values["ended"] == {t: float(t >= 11) for t in range(16)}
    assert values["end_step"] == {11: 11.0}


class ScriptedPenalty(CriticalPeriodMonitor):
    """The Fisher penalty replaced by ``values[step]`` (NaN where ``values`` says so): the monitor's own cadence."""

    def __init__(self, values, **kwargs):
        super().__init__(**kwargs)
        self.values = values

    def _fisher_penalty(self, trainer, pl_module, batch, step):
        return self.values[step]


class ReadEndStep(pl.Callback):
    """What a schedule placed after the monitor reads, at the start of every training batch."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = find_critical_period_monitor(trainer).end_step


def test_a_schedule_after_the_monitor_reads_the_end_step_before_the_batch_of_that_step(tmp_path):
    # Measured every 2 steps: PEAKED with a NaN inserted at step 6, left out of the rule. The window-1 end is PEAKED's
    # index 9, the 11th measurement (the NaN before it), taken at step 20.
    measurements = [*PEAKED[:3], math.nan, *PEAKED[3:]]
    monitor = ScriptedPenalty({2 * k: v for k, v in enumerate(measurements)}, every_n_steps=2, window=1,
                              min_measurements=1)
    reader = ReadEndStep()
    with pytest.warns(UserWarning, match="signal at step 6 is nan"):
        fit(tmp_path, [monitor, reader], max_steps=31)
    assert critical_period_end(PEAKED, window=1, patience=3, min_measurements=1) == 9
    assert monitor.end_step == 20
    assert reader.seen == {step: (20 if step >= 20 else None) for step in range(31)}
    values = logged(tmp_path)
    assert values["end_step"] == {20: 20.0}
    assert math.isnan(values["signal"][6]) and 6 not in values["smoothed"] and values["ended"][6] == 0.0


def test_the_end_step_is_none_and_a_warning_said_so_when_the_signal_never_falls(tmp_path):
    monitor = CriticalPeriodMonitor(signal="fisher")
    with pytest.warns(UserWarning, match="before the end of the critical period was detected"):
        trainer = fit(tmp_path, [ScriptedFisher([1.0 + t for t in range(20)]), monitor], max_steps=12)
    assert monitor.end_step is None and find_critical_period_monitor(trainer) is monitor
    values = logged(tmp_path)
    assert values["ended"] == {t: 0.0 for t in range(13)} and "end_step" not in values


@pytest.mark.parametrize("stop", [8, 14], ids=["before-the-end", "after-the-end"])
def test_a_resumed_run_keeps_the_history_and_the_end_step(tmp_path, stop):
    full = CriticalPeriodMonitor(signal="fisher")
    fit(tmp_path / "full", [full, ScriptedFisher(PEAKED)], max_steps=15)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    first = CriticalPeriodMonitor(signal="fisher")
    fit(tmp_path / "first", [first, ScriptedFisher(PEAKED), checkpoint, StopAt(stop)], max_steps=15)
    assert first.end_step == (None if stop < 11 else 11)
    resumed = CriticalPeriodMonitor(signal="fisher")
    (saved,) = (tmp_path / "ckpt").glob(f"*-step={stop}.ckpt")
    fit(tmp_path / "second", [resumed, ScriptedFisher(PEAKED)], max_steps=15, ckpt_path=saved)
    assert resumed.end_step == full.end_step == 11
    assert resumed.history == full.history  # the checkpoint's measurements, then the resumed run's
    values = logged(tmp_path / "second")
    assert sorted(values["signal"]) == list(range(stop + 1, 16))
    assert values["ended"] == {t: float(t >= 11) for t in range(stop + 1, 16)}
    assert ("end_step" in values) == (stop < 11)  # logged once, by the run that declared it


def test_a_run_resumed_after_the_end_keeps_its_end_step_under_other_rule_arguments(tmp_path):
    # fraction 0.05 would never end on PEAKED (its lowest smoothed value is 1 > 0.05 x 26/3): the saved end step wins.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    fit(tmp_path / "first", [CriticalPeriodMonitor(signal="fisher"), ScriptedFisher(PEAKED), checkpoint, StopAt(13)],
        max_steps=15)
    assert critical_period_end(PEAKED, fraction=0.05) is None
    resumed = CriticalPeriodMonitor(signal="fisher", fraction=0.05)
    (saved,) = (tmp_path / "ckpt").glob("*-step=13.ckpt")
    fit(tmp_path / "second", [resumed, ScriptedFisher(PEAKED)], max_steps=15, ckpt_path=saved)
    assert resumed.end_step == 11
    assert logged(tmp_path / "second")["ended"] == {14: 1.0, 15: 1.0}


def test_the_direction_error_of_a_gradient_dynamics_monitor_is_the_signal(tmp_path):
    dynamics = GradientDynamicsMonitor(num_batches=2, batch_size=8, every_n_steps=2)
    monitor = CriticalPeriodMonitor(signal="direction_error", min_measurements=1)
    fit(tmp_path, [monitor, dynamics], max_steps=6)
    scalars = read_scalars(tmp_path / "lightning_logs")
    expected = dict(scalars["startwell/dynamics/direction_error"])
    assert sorted(expected) == [0, 2, 4]
    assert logged(tmp_path)["signal"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "signal, callbacks, message",
    [
        ("fisher", [], "has none: add `FisherTraceMonitor"),
        ("direction_error", [], "has none: add `GradientDynamicsMonitor"),
        ("direction_error", [GradientDynamicsMonitor(measure_directions=False)], "measure_directions=False"),
    ],
)
def test_a_signal_without_its_monitor_is_refused_at_fit_start(tmp_path, signal, callbacks, message):
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, [CriticalPeriodMonitor(signal=signal), *callbacks], max_steps=2)


def test_fast_dev_run_runs_without_warnings(tmp_path, recwarn):
    monitor = CriticalPeriodMonitor(every_n_steps=1)
    pl.Trainer(default_root_dir=tmp_path, fast_dev_run=True, accelerator="cpu", enable_progress_bar=False,
               callbacks=[monitor]).fit(MLP(depth=1, width=8), loader())
    assert [s for s, _ in monitor.history] == [0] and monitor.end_step is None
    assert not [w for w in recwarn if "CriticalPeriodMonitor" in str(w.message)]


def test_says_once_what_it_attached_to(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(tmp_path, [CriticalPeriodMonitor(every_n_steps=4, window=2)], max_steps=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CriticalPeriodMonitor attached:")]
    assert len(lines) == 1
    assert "Fisher penalty on the training batch every 4 steps, input_key=0" in lines[0]
    assert "mean of the last 2 measurements" in lines[0]


def docs_yaml_blocks():
    text = (REPO / "docs" / "critical_period.md").read_text()
    section = text.split("## Example YAML\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["fisher_penalty", "fisher"])
def test_the_yaml_examples_of_the_docs_run_in_the_cli(tmp_path, index):
    block = docs_yaml_blocks()[index]
    config = tmp_path / "config.yaml"
    config.write_text(
        block + "  max_steps: 3\n  log_every_n_steps: 1\n  enable_progress_bar: false\n"
        "model:\n  class_path: lightning_startwell.MLP\n  init_args: {depth: 1, width: 16}\n"
        "data:\n  class_path: lightning_startwell.DigitsDataModule\n"
    )
    with pytest.warns(UserWarning, match="before the end of the critical period"):
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    scalars = read_scalars(tmp_path / "lightning_logs")
    signal = dict(scalars["startwell/critical_period/signal"])
    if index == 0:
        assert sorted(signal) == [0]  # every 20 steps
    else:  # the FisherTraceMonitor's trace at step 0 and at the end of the (cut) epoch
        assert signal == dict(scalars["startwell/fisher/trace"]) and sorted(signal) == [0, 3]


# ------------------------------------------------------------------------------------------------------------------ DDP


class RecordingMonitor(CriticalPeriodMonitor):
    """Writes, per rank, the local gradients, the values taken in and the end step to ``<out>/rank<r>.json``; with
    ``scripted``, each rank's local gradient is replaced by a 4-vector of known size (rank 0's peaks at step 2, rank
    1's at step 9: alone, each rank would end at a different step)."""

    def __init__(self, out, scripted, **kwargs):
        super().__init__(**kwargs)
        self.out, self.scripted = str(out), scripted
        self.local = {}

    def _local_gradient(self, trainer, pl_module, batch, step):
        gradient = super()._local_gradient(trainer, pl_module, batch, step)
        if self.scripted:
            peak = 2 if trainer.global_rank == 0 else 9
            gradient = torch.full((4,), 1.0 + 10.0 * math.exp(-((step - peak) / 2.0) ** 2), dtype=gradient.dtype)
        self.local[step] = gradient.tolist()
        return gradient

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        record = {"local": self.local, "history": self.history, "end_step": self.end_step}
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)


def rank_values(local):
    return [float(np.dot(g, g)) for g in local]


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_averages_the_gradients_and_ends_on_the_same_step(tmp_path):
    def run(root, scripted):
        root.mkdir()
        pl.seed_everything(0)
        monitor = RecordingMonitor(root, scripted, every_n_steps=1, window=1, patience=2, min_measurements=1)
        trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=14,
                             max_epochs=-1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                             enable_checkpointing=False, callbacks=[monitor])
        trainer.fit(MLP(depth=1, width=8, optimizer=plain_sgd), loader(batch_size=8))
        return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]

    real = run(tmp_path / "real", scripted=False)
    assert real[0]["history"] == real[1]["history"]  # the same value on both ranks, every step
    for step, value in real[0]["history"]:
        g0, g1 = (np.array(r["local"][str(step)]) for r in real)
        assert not np.allclose(g0, g1)  # each rank's own batch and labels
        assert value == pytest.approx(float(np.dot((g0 + g1) / 2, (g0 + g1) / 2)), rel=1e-9)

    scripted = run(tmp_path / "scripted", scripted=True)
    mean = [(np.array(a) + np.array(b)) / 2 for a, b in zip(scripted[0]["local"].values(),
                                                             scripted[1]["local"].values(), strict=True)]
    expected = critical_period_end(rank_values(mean), window=1, patience=2, min_measurements=1)
    alone = [critical_period_end(rank_values(r["local"].values()), window=1, patience=2, min_measurements=1)
             for r in scripted]
    assert expected is not None and len(set(alone)) == 2  # each rank alone would decide differently
    assert scripted[0]["end_step"] == scripted[1]["end_step"] == expected


def test_fisher_penalty_refuses_an_output_without_two_classes():
    # A regression head (N, 1) under softmax has one "class" of probability 1: the penalty would be 0 for any model.
    from lightning_startwell.critical_period import fisher_penalty

    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="`signal` to 'fisher'"):
        fisher_penalty(model, torch.randn(4, 3), generator=torch.Generator().manual_seed(0))
