"""Stochastic depth as the papers did it: Huang et al.'s l/L rule, Liu et al.'s code and timm's linspace(0, rate, L),
a uniform rate; a draw per sample or per mini-batch. Against closed forms, numpy, and measured drop frequencies within
their binomial error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import gaussian_loader, make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_startwell.callbacks import StochasticDepthSchedule
from lightning_startwell.cli import main
from lightning_startwell.drop_path import DropPath, DropPathHooks, ResidualBlock, drop_path
from lightning_startwell.models import ResNet
from lightning_startwell.schedules import block_drop_rates, expected_depth

RULES = ("linear", "linspace", "uniform")


def closed_form_rates(rule, rate, num_blocks):
    if rule == "linear":  # Huang et al.: p_l = 1 - (l / L)(1 - p_L), l = 1..L
        return [rate * block / num_blocks for block in range(1, num_blocks + 1)]
    if rule == "linspace":  # Liu et al.'s code, timm: numpy/torch linspace(0, rate, L)
        return list(np.linspace(0.0, rate, num_blocks))
    return [rate] * num_blocks


def closed_form_depth(rule, rate, num_blocks):
    """E[depth] = sum_l p_l: L - r (L + 1) / 2 (linear), L - r L / 2 (linspace), L (1 - r) (uniform)."""
    return {"linear": num_blocks - rate * (num_blocks + 1) / 2, "linspace": num_blocks - rate * num_blocks / 2,
            "uniform": num_blocks * (1 - rate)}[rule]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_blocks", [2, 5, 54])
def test_rates_and_expected_depth_per_rule_against_closed_forms(rule, num_blocks):
    rates = block_drop_rates(0.5, num_blocks, rule)
    assert rates == pytest.approx(closed_form_rates(rule, 0.5, num_blocks), abs=1e-12)
    assert expected_depth(rates) == pytest.approx(closed_form_depth(rule, 0.5, num_blocks), abs=1e-9)


def test_huang_110_layer_resnet_and_timm_on_the_same_network():
    # 54 blocks, p_L = 0.5: Huang's rule keeps 40.25 blocks on average, the linspace rule 40.5.
    assert expected_depth(block_drop_rates(0.5, 54, "linear")) == pytest.approx(40.25)
    assert expected_depth(block_drop_rates(0.5, 54, "linspace")) == pytest.approx(40.5)
    assert block_drop_rates(0.5, 54, "linspace")[0] == 0.0 and block_drop_rates(0.5, 54, "linear")[0] > 0
    assert block_drop_rates(0.3, 1, "linspace") == [0.0] == torch.linspace(0, 0.3, 1).tolist()


class Ones(nn.Module):
    """A residual model whose branches output ones, so a dropped branch shows as zeros."""

    def __init__(self, num_blocks):
        super().__init__()
        self.branches = nn.ModuleList(nn.Identity() for _ in range(num_blocks))

    def forward(self, x):
        return torch.stack([branch(torch.ones_like(x)) for branch in self.branches])  # (L, N, ...)


def measured_drops(rule, per, rate=0.6, num_blocks=4, batch=64, passes=300):
    torch.manual_seed(0)
    model = Ones(num_blocks).train()
    blocks = [ResidualBlock(f"branches.{i}", (f"branches.{i}",)) for i in range(num_blocks)]
    hooks = DropPathHooks(model, blocks, per=per).attach()
    hooks.set_rates(block_drop_rates(rate, num_blocks, rule))
    with torch.no_grad():
        outputs = torch.stack([model(torch.zeros(batch, 3)) for _ in range(passes)])  # (passes, L, N, 3)
    hooks.detach()
    return outputs[..., 0] == 0  # dropped, (passes, L, N)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("per", ["sample", "batch"])
def test_measured_drop_frequencies_within_binomial_error(rule, per):
    dropped = measured_drops(rule, per)
    if per == "batch":  # one draw per branch and mini-batch: all samples dropped or none
        assert bool(((dropped.all(-1)) | (~dropped.any(-1))).all())
        trials_per_block = dropped.shape[0]
        frequencies = dropped[..., 0].float().mean(0)
    else:
        trials_per_block = dropped.shape[0] * dropped.shape[2]
        frequencies = dropped.float().mean((0, 2))
        assert not bool(((dropped.all(-1)) | (~dropped.any(-1))).all())  # samples drawn apart
    for rate, frequency in zip(closed_form_rates(rule, 0.6, 4), frequencies.tolist(), strict=True):
        assert abs(frequency - rate) <= 4 * math.sqrt(rate * (1 - rate) / trials_per_block)
        if rate == 0:
            assert frequency == 0.0


def test_inverted_scaling_keeps_the_mean_per_batch_and_per_sample():
    torch.manual_seed(1)
    x = torch.full((20000, 1), 3.0)
    assert drop_path(x, torch.tensor(0.4)).mean().item() == pytest.approx(3.0, rel=0.03)
    means = torch.stack([drop_path(x[:8], torch.tensor(0.4), "batch").mean() for _ in range(4000)])
    assert set(torch.unique(means).tolist()) == {0.0, 5.0}  # 3 / (1 - 0.4), or dropped
    assert means.mean().item() == pytest.approx(3.0, rel=0.05)


def test_drop_path_module_per_batch():
    torch.manual_seed(2)
    module = DropPath(0.5, per="batch").train()
    out = torch.stack([module(torch.ones(16, 2)) for _ in range(400)])
    per_batch = out.reshape(400, -1)
    assert bool(((per_batch == 0).all(1) | (per_batch == 2).all(1)).all())
    assert abs((per_batch[:, 0] == 0).float().mean().item() - 0.5) <= 4 * math.sqrt(0.25 / 400)
    assert "per=batch" in repr(module)


@pytest.mark.parametrize(("kwargs", "name"), [({"per": "row"}, "per"), ({"rule": "huang"}, "rule")])
def test_bad_rule_or_per_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        StochasticDepthSchedule(**kwargs)
    with pytest.raises(ValueError, match="`per`"):
        DropPath(0.1, per="row")


class CountBatchDrops(Callback):
    """Per block of the demo ResNet, the training forwards whose branch output is zero for every sample (dropped) or
    for none; a mixed batch is counted apart."""

    def __init__(self, num_blocks):
        self.counts = {i: {"all": 0, "none": 0, "mixed": 0} for i in range(num_blocks)}
        self.handles = []

    def on_fit_start(self, trainer, pl_module):
        for i, block in enumerate(pl_module.blocks):
            self.handles.append(block.branch.register_forward_hook(self._hook(i)))  # after the scheduler's hook

    def _hook(self, index):
        def hook(module, inputs, output):
            if module.training:
                zero = output.flatten(1).abs().sum(1) == 0
                kind = "all" if bool(zero.all()) else ("none" if not bool(zero.any()) else "mixed")
                self.counts[index][kind] += 1

        return hook

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


def test_per_batch_linspace_schedule_in_a_fit(tmp_path):
    counter = CountBatchDrops(3)
    callback = StochasticDepthSchedule(drop_rate=0.6, rule="linspace", per="batch")
    trainer = make_trainer(tmp_path, [callback, counter], max_epochs=4)
    trainer.fit(ResNet(num_blocks=3, width=4), gaussian_loader(num=960, batch_size=16))
    for index, rate in enumerate([0.0, 0.3, 0.6]):
        counts = counter.counts[index]
        assert counts["mixed"] == 0 and counts["all"] + counts["none"] == 240
        assert abs(counts["all"] / 240 - rate) <= 4 * math.sqrt(rate * (1 - rate) / 240)
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/depth/expected_depth"]
    assert logged[0][1] == pytest.approx(closed_form_depth("linspace", 0.6, 3))


def test_rule_and_per_from_yaml(tmp_path):
    config = tmp_path / "sd.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  log_every_n_steps: 1\n  enable_progress_bar: false\n  callbacks:\n"
        "    - class_path: lightning_startwell.StochasticDepthSchedule\n"
        "      init_args: {drop_rate: 0.4, rule: linspace, per: batch}\n"
        "model:\n  class_path: lightning_startwell.ResNet\n  init_args: {num_blocks: 5, width: 4}\n"
        "data:\n  class_path: lightning_startwell.DigitsDataModule\n"
    )
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/depth/expected_depth"]
    assert logged[0][1] == pytest.approx(closed_form_depth("linspace", 0.4, 5))
