"""CriticalPeriodMonitor(signal="gradient_confusion"): Fukase et al. (2025)'s gradient confusion against a naive
float64 double loop, their outlier rule against a transcription of their code, real fits (the logged value against an
independent computation, training unchanged), bad arguments, resume."""

from __future__ import annotations

import copy
import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ddp_spawn_flake, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_critical_period import X, Y, fit, frozen_sgd, loader, logged, plain_sgd
from test_fisher_callback import StopAt
from torch import nn

from lightning_startwell.callbacks import CriticalPeriodMonitor
from lightning_startwell.callbacks._common import batch_forward
from lightning_startwell.critical_period import OutlierRule, confusion_gradients, gradient_confusion, outlier_end
from lightning_startwell.models import ResNet

# ------------------------------------------------------------------------------------------------- gradient confusion


def confusion_by_hand(gradients):
    """max over pairs i < j of <g_i, g_j> / (||g_i|| ||g_j||), a plain double loop in float64 (their loop)."""
    g = [np.asarray(v, dtype=np.float64).reshape(-1) for v in gradients]
    best = -math.inf
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            best = max(best, float(g[i] @ g[j] / (np.linalg.norm(g[i]) * np.linalg.norm(g[j]))))
    return best


@pytest.mark.parametrize("k, size", [(2, 7), (5, 50), (9, 300)])
def test_gradient_confusion_equals_a_double_loop_over_pairs(k, size):
    gradients = torch.randn(k, size, generator=torch.Generator().manual_seed(k))
    expected = confusion_by_hand(gradients.numpy())
    assert gradient_confusion(gradients) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert gradient_confusion(list(gradients.reshape(k, 1, size))) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_gradient_confusion_of_hand_made_gradients():
    g = torch.tensor([3.0, 4.0, 0.0])
    assert gradient_confusion([g, -2 * g]) == pytest.approx(-1.0)  # opposite: the largest cosine is -1
    assert gradient_confusion([g, 5 * g]) == pytest.approx(1.0)  # one direction
    # cos(a, b) = 0, cos(a, c) = 0.6, cos(b, c) = 0.8: the largest pair is (b, c)
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([3.0, 4.0])
    assert gradient_confusion([a, b, c]) == pytest.approx(0.8)
    assert gradient_confusion([a, -a, -b]) == pytest.approx(0.0)  # (a, -b) and (-a, -b) orthogonal, (a, -a) opposite
    assert gradient_confusion([a, torch.zeros(2), c]) == pytest.approx(0.6)  # a zero gradient has no direction
    assert math.isnan(gradient_confusion([a, torch.zeros(2)]))
    with pytest.raises(ValueError, match="at least 2"):
        gradient_confusion([a])


# ------------------------------------------------------------------------------------------------------- outlier rule


def their_rule(values, check_interval, threshold):
    """utils/custom_callbacks.py::GradientConfusion.on_epoch_end with is_outlier(mode='low'), one value per epoch
    (metric_frequency 1), with numpy's linear quantiles (pandas' default): the epoch it stops at, or None."""
    history = []
    for epoch, new in enumerate(values):
        if (epoch + 1) % check_interval == 0 and len(history) > 1:
            past = history[:-1]
            q1, q3 = np.quantile(past, 0.25), np.quantile(past, 0.75)
            if new < q1 - threshold * (q3 - q1):
                return epoch
        history.append(new)
    return None


def test_the_outlier_rule_agrees_with_their_code_on_random_signals():
    rng = np.random.default_rng(0)
    ended = 0
    for trial in range(300):
        check_interval = int(rng.integers(1, 6))
        threshold = float(rng.choice([0.0, 0.5, 1.5, 3.0]))
        values = list(rng.normal(size=int(rng.integers(3, 40))) - np.linspace(0, rng.uniform(0, 4), 1))
        if trial % 3 == 0:  # a drop somewhere: the rule has something to find
            drop = int(rng.integers(len(values)))
            values[drop:] = [v - 5.0 for v in values[drop:]]
        expected = their_rule(values, check_interval, threshold)
        assert outlier_end(values, check_interval, threshold) == expected, (values, check_interval, threshold)
        ended += expected is not None
    assert 30 < ended < 270  # both outcomes exercised


def test_the_outlier_rule_on_hand_made_signals():
    # Checks at measurements 5, 10, 15... (1-based). At 5 the baseline is x_1..x_3 = 0.9, 0.8, 0.9: Q1 0.85, Q3 0.9,
    # bound 0.85 - 1.5 x 0.05 = 0.775.
    assert outlier_end([0.9, 0.8, 0.9, 0.8, 0.1], check_interval=5) == 4
    assert outlier_end([0.9, 0.8, 0.9, 0.8, 0.78], check_interval=5) is None  # above 0.775
    rule = OutlierRule(check_interval=5)
    assert [rule.update(x) for x in [0.9, 0.8, 0.9, 0.8, 0.776]] == [False] * 5
    assert rule.lower_bound == pytest.approx(0.775)
    # A drop at measurement 7 is caught at the next check, 10, not before: the rule only looks every 5.
    assert outlier_end([1.0, 1.1] * 3 + [0.0] * 6, check_interval=5) == 9
    # The measurement just before the checked one is not in the baseline (their history[:-1]): a low x_9 does not
    # widen the baseline of the check at 10.
    assert outlier_end([1.0, 1.1, 1.0, 1.1, 1.0, 1.1, 1.0, 1.1, -9.0, 0.5], check_interval=10) == 9
    # Non-finite values are left out (not counted): the fifth finite value is at index 6.
    assert outlier_end([0.9, math.nan, 0.8, 0.9, math.inf, 0.8, 0.1], check_interval=5) == 6
    rule = OutlierRule(check_interval=1)
    assert [rule.update(x) for x in [1.0, 0.0, 0.5, 0.9]] == [False, False, True, True]  # stays ended
    assert rule.end_index == 2


# --------------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"check_interval": 0}, "check_interval"),
        ({"check_interval": 2.0}, "check_interval"),
        ({"outlier_threshold": -0.5}, "outlier_threshold"),
        ({"outlier_threshold": math.nan}, "outlier_threshold"),
        ({"outlier_threshold": True}, "outlier_threshold"),
        ({"outlier_threshold": "1.5"}, "outlier_threshold"),
        ({"num_chunks": 1}, "num_chunks"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"target_key": 1.5}, "target_key"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        CriticalPeriodMonitor(signal="gradient_confusion", **kwargs)
    if name in ("check_interval", "outlier_threshold"):
        with pytest.raises(ValueError, match=f"`{name}`"):
            OutlierRule(**kwargs)


def test_the_default_cadence_is_every_30_steps():
    assert CriticalPeriodMonitor().every_n_steps == 30
    assert CriticalPeriodMonitor(signal="gradient_confusion").every_n_steps == 30


def test_a_probe_larger_than_the_dataset_is_refused_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match="more than the 96"):
        fit(tmp_path, [CriticalPeriodMonitor(signal="gradient_confusion", num_chunks=4, chunk_size=25)], max_steps=2)


# ---------------------------------------------------------------------------------------------------------------- fits


def confusion_of_the_probe(model, seed, num_chunks, chunk_size):
    """The probe drawn by hand (randperm with ``seed`` over the dataset, consecutive chunks), each chunk's gradient of
    the mean cross-entropy by .backward() on a copy of the model in evaluation mode, the largest cosine by the loop."""
    model = copy.deepcopy(model).eval()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    gradients = []
    for k in range(num_chunks):
        index = order[k * chunk_size : (k + 1) * chunk_size]
        model.zero_grad()
        nn.functional.cross_entropy(model(X[index]), Y[index]).backward()
        gradients.append(np.concatenate([p.grad.double().reshape(-1).numpy() for p in model.parameters()]))
    return confusion_by_hand(gradients)


def test_the_logged_confusion_is_the_one_of_the_fixed_probe_in_evaluation_mode(tmp_path):
    # BatchNorm and dropout: in training mode the chunks' gradients would differ (batch statistics, masks).
    pl.seed_everything(0)
    model = ResNet(num_blocks=1, width=8, dropout=0.3, optimizer=frozen_sgd)  # learning rate 0: the same weights
    with torch.no_grad():  # running statistics away from their initial 0 and 1 (evaluation mode then differs), and
        for module in model.modules():  # momentum 0: training steps leave them there
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.momentum = 0.0
    net = copy.deepcopy(model)
    monitor = CriticalPeriodMonitor(signal="gradient_confusion", every_n_steps=2, seed=3)  # 16 // 4 = 4 per chunk
    make_trainer(tmp_path, [monitor], max_steps=5).fit(model, loader())
    expected = confusion_of_the_probe(net, 3, 4, 4)
    values = logged(tmp_path)["signal"]
    assert sorted(values) == [0, 2, 4]
    for value in values.values():  # frozen weights, fixed probe: the same value at every measurement
        assert value == pytest.approx(expected, rel=1e-5)
    train_mode = copy.deepcopy(net).train()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(3))
    grads = []
    for k in range(4):
        train_mode.zero_grad()
        index = order[4 * k : 4 * k + 4]
        nn.functional.cross_entropy(train_mode(X[index]), Y[index]).backward()
        grads.append(np.concatenate([p.grad.reshape(-1).numpy() for p in train_mode.parameters()]))
    assert abs(confusion_by_hand(grads) - expected) > 1e-3  # the mode matters: the test can tell
    assert all(m.training for m in model.modules())  # the modes are back


class Augmented(torch.utils.data.TensorDataset):
    """Noise from the global stream on every item: a probe drawn on the training run's streams would shift them."""

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x + 0.01 * torch.randn(x.shape), y


def test_training_is_the_same_with_and_without_the_gradient_confusion(tmp_path):
    def run(root, callbacks):
        pl.seed_everything(0)
        model = ResNet(num_blocks=1, width=8, dropout=0.3)
        data = torch.utils.data.DataLoader(Augmented(X, Y), batch_size=16)
        make_trainer(root, callbacks, max_steps=4, deterministic=True).fit(model, data)
        return model.state_dict(), torch.get_rng_state()

    plain = run(tmp_path / "plain", [])
    monitored = run(tmp_path / "monitored", [CriticalPeriodMonitor(signal="gradient_confusion", every_n_steps=1)])
    for name, value in plain[0].items():
        assert torch.equal(value, monitored[0][name]), name
    assert torch.equal(plain[1], monitored[1])
    assert sorted(logged(tmp_path / "monitored")["signal"]) == [0, 1, 2, 3]


# Mostly aligned, then a drop from measurement 13 on: with check_interval 5 the checks are at measurements 5, 10, 15;
# the one at 15 (index 14) is the first below its bound.
SCRIPTED = [0.8, 0.7, 0.75, 0.8, 0.72, 0.78, 0.74, 0.79, 0.71, 0.77, 0.76, 0.73, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]


class ScriptedConfusion(CriticalPeriodMonitor):
    """The gradient confusion replaced by ``values[k]`` at the k-th measurement: the monitor's own cadence."""

    def __init__(self, values, **kwargs):
        super().__init__(signal="gradient_confusion", **kwargs)
        self.values = values

    def _gradient_confusion(self, trainer, pl_module):
        return self.values[trainer.global_step // self.every_n_steps]


def test_a_fit_ends_the_period_at_the_first_low_outlier(tmp_path):
    assert outlier_end(SCRIPTED, check_interval=5) == 14
    monitor = ScriptedConfusion(SCRIPTED, every_n_steps=2, check_interval=5)
    fit(tmp_path, [monitor], max_steps=35)
    assert monitor.end_step == 28  # measurement index 14, every 2 steps
    values = logged(tmp_path)
    assert values["signal"] == pytest.approx({2 * k: v for k, v in enumerate(SCRIPTED)})
    assert sorted(values["lower_bound"]) == [8, 18, 28]  # the checked measurements only
    baseline = SCRIPTED[:13]
    q1, q3 = np.quantile(baseline, [0.25, 0.75])
    assert values["lower_bound"][28] == pytest.approx(q1 - 1.5 * (q3 - q1))
    assert values["ended"] == {2 * k: float(2 * k >= 28) for k in range(len(SCRIPTED))}
    assert values["end_step"] == {28: 28.0}
    assert "smoothed" not in values


@pytest.mark.parametrize("stop", [15, 30], ids=["before-the-end", "after-the-end"])
def test_a_resumed_run_keeps_the_history_and_the_end_step(tmp_path, stop):
    full = ScriptedConfusion(SCRIPTED, every_n_steps=2, check_interval=5)
    fit(tmp_path / "full", [full], max_steps=35)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    first = ScriptedConfusion(SCRIPTED, every_n_steps=2, check_interval=5)
    fit(tmp_path / "first", [first, checkpoint, StopAt(stop)], max_steps=35)
    assert first.end_step == (None if stop < 28 else 28)
    resumed = ScriptedConfusion(SCRIPTED, every_n_steps=2, check_interval=5)
    (saved,) = (tmp_path / "ckpt").glob(f"*-step={stop}.ckpt")
    fit(tmp_path / "second", [resumed], max_steps=35, ckpt_path=saved)
    assert resumed.end_step == full.end_step == 28
    assert resumed.history == full.history  # the checkpoint's measurements (the rule's baseline), then the new ones
    values = logged(tmp_path / "second")
    assert min(values["signal"]) == stop + stop % 2  # the first measurement after the checkpoint (taken at step t
    # before step t's batch, after the checkpoint of t steps)
    assert ("end_step" in values) == (stop < 28)


def test_says_once_what_it_attached_to(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(tmp_path, [CriticalPeriodMonitor(signal="gradient_confusion", every_n_steps=4, check_interval=7)],
            max_steps=3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CriticalPeriodMonitor attached:")]
    assert len(lines) == 1
    assert "4 fixed probe mini-batches of 4 (seed 0), evaluation mode, every 4 steps" in lines[0]
    assert "every 7 measurements, below Q1 - 1.5 x IQR" in lines[0]


# ----------------------------------------------------------------------------------------------------------------- DDP


class RecordingConfusion(CriticalPeriodMonitor):
    """Writes, per rank, the locally measured confusion, the history taken in and the end step to ``rank<r>.json``."""

    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        self.out, self.local = str(out), {}

    def _gradient_confusion(self, trainer, pl_module):
        params = [p for p in pl_module.parameters() if p.requires_grad]
        gradients = confusion_gradients(pl_module, self._probe, params, forward=batch_forward(pl_module))
        self.local[trainer.global_step] = gradient_confusion(gradients)
        return super()._gradient_confusion(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        record = {"local": self.local, "history": self.history, "end_step": self.end_step}
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_measures_the_same_probe_and_decides_alike(tmp_path):
    from lightning_startwell.models import MLP

    pl.seed_everything(0)
    monitor = RecordingConfusion(tmp_path, signal="gradient_confusion", every_n_steps=1, check_interval=2, seed=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=10,
                         max_epochs=-1, enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, callbacks=[monitor])
    trainer.fit(MLP(depth=1, width=8, optimizer=plain_sgd), loader(batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["end_step"] == ranks[1]["end_step"]
    assert len(ranks[0]["history"]) == 10
    for step, value in ranks[0]["history"]:  # one probe for both ranks: the mean of two equal local values
        local = [r["local"][str(step)] for r in ranks]
        assert local[0] == pytest.approx(local[1], abs=1e-6) and value == pytest.approx(sum(local) / 2, abs=1e-9)
        assert -1.0 <= value <= 1.0
