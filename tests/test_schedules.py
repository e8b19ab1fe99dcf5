"""Schedules, dropout discovery and drop path against independent references (NumPy, formulas, counting)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_startwell.drop_path import DropPathHooks, ResidualBlock, drop_path, find_residual_blocks
from lightning_startwell.dropout import find_dropout, set_rates
from lightning_startwell.models import ResNet
from lightning_startwell.schedules import (
    block_drop_rates,
    check_cutoff,
    check_schedule,
    expected_depth,
    quantize,
    resolve_cutoff,
    schedule_completes,
    scheduled_rate,
)


def _official(rate, total, cutoff, mode, shape):
    """The schedule as the official code builds it (facebookresearch/dropout drop_scheduler), with NumPy."""
    if mode == "standard":
        return np.full(total, rate)
    if mode == "early":
        early = np.full(cutoff, rate) if shape == "constant" else np.linspace(rate, 0, cutoff)
        return np.concatenate([early, np.zeros(total - cutoff)])
    return np.concatenate([np.zeros(cutoff), np.full(total - cutoff, rate)])


@pytest.mark.parametrize(
    ("mode", "shape"), [("standard", "constant"), ("early", "constant"), ("early", "linear"), ("late", "constant")]
)
def test_schedule_equals_the_official_arrays(mode, shape):
    expected = _official(0.1, 60, 25, mode, shape)
    got = [scheduled_rate(step, 0.1, mode, shape, 25) for step in range(60)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_cosine_shape_by_formula():
    got = [scheduled_rate(step, 0.4, "early", "cosine", 11) for step in range(13)]
    expected = [0.4 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(11)] + [0.0, 0.0]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0] == pytest.approx(0.4) and got[10] == pytest.approx(0.0, abs=1e-12)


def test_huang_linear_rule_and_expected_depth_of_exercise_6():
    rates = block_drop_rates(0.5, 54, "linear")
    survival = [1 - (block / 54) * (1 - 0.5) for block in range(1, 55)]
    np.testing.assert_allclose([1 - r for r in rates], survival, atol=1e-12)
    # Exercise 6: E[depth] = sum_l p_l = L - (1 - p_L)(L + 1)/2 = 54 - 0.5 * 55 / 2 = 40.25.
    assert expected_depth(rates) == pytest.approx(54 - 0.5 * 55 / 2)
    assert block_drop_rates(0.2, 3, "uniform") == [0.2, 0.2, 0.2]


def test_quantize_to_levels():
    assert quantize(0.061, 0.1, 5) == pytest.approx(0.05)
    assert quantize(0.0874, 0.1, 5) == pytest.approx(0.075)
    assert len({quantize(v, 0.1, 5) for v in np.linspace(0.1, 0, 1000)}) == 5
    assert quantize(0.061, 0.1, None) == 0.061


def test_resolve_cutoff():
    assert resolve_cutoff(3, None, None, steps_per_epoch=7, total_steps=70) == 21
    assert resolve_cutoff(None, 9, None, 7, 70) == 9
    assert resolve_cutoff(None, None, 0.25, 7, 70) == round(17.5)
    assert resolve_cutoff(None, None, None, 7, 60) == 10  # the paper's 50/300
    assert resolve_cutoff(11, None, None, 7, 70) == 77  # past the end: returned, the callback warns
    with pytest.raises(ValueError, match="cutoff_epochs"):
        resolve_cutoff(2, None, None, steps_per_epoch=None, total_steps=None)
    with pytest.raises(ValueError, match="cutoff_fraction"):
        resolve_cutoff(None, None, 0.5, steps_per_epoch=None, total_steps=None)


@pytest.mark.parametrize(
    ("mode", "shape", "cutoff", "total", "completes"),
    [
        ("early", "constant", 9, 10, True),  # step 9 is the first at rate 0
        ("early", "constant", 10, 10, False),
        ("early", "linear", 10, 10, True),  # linspace(p, 0, 10) reaches 0 at its last step
        ("early", "linear", 11, 10, False),
        ("late", "constant", 9, 10, True),
        ("late", "constant", 10, 10, False),
        ("standard", "constant", 0, 10, True),
    ],
)
def test_schedule_completes_iff_the_last_step_has_the_final_rate(mode, shape, cutoff, total, completes):
    official = _official(0.3, max(total, cutoff), cutoff, mode, shape)
    final = 0.0 if mode == "early" else 0.3
    assert (official[total - 1] == final) == completes  # the official code's schedule, cut at this run's length
    assert schedule_completes(0.3, mode, shape, cutoff, total) == completes


def test_a_cosine_schedule_completes_at_its_cutoff():
    assert schedule_completes(0.3, "early", "cosine", 10, 10)  # (1 + cos(pi)) / 2 = 0 at step 9
    assert not schedule_completes(0.3, "early", "cosine", 11, 10)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: check_schedule("p", 1.0, "early", "linear"), "`p`"),
        (lambda: check_schedule("drop_rate", -0.1, "early", "linear"), "drop_rate"),
        (lambda: check_schedule("p", 0.1, "sometimes", "linear"), "mode"),
        (lambda: check_schedule("p", 0.1, "early", "step"), "shape"),
        (lambda: check_schedule("p", 0.1, "late", "linear"), "shape"),
        (lambda: check_cutoff("early", 2, 10, None), "cutoff_epochs"),
        (lambda: check_cutoff("early", -1, None, None), "cutoff_epochs"),
        (lambda: check_cutoff("late", None, None, 1.5), "cutoff_fraction"),
        (lambda: check_cutoff("standard", None, 5, None), "standard"),
        (lambda: block_drop_rates(0.1, 3, "exponential"), "rule"),
    ],
)
def test_bad_schedule_arguments(call, named):
    with pytest.raises(ValueError, match=named):
        call()


def test_every_kind_of_dropout_is_found_and_set():
    model = nn.Sequential(
        nn.Dropout(0.3), nn.Dropout1d(), nn.Dropout2d(), nn.Dropout3d(), nn.AlphaDropout(), nn.FeatureAlphaDropout(),
        nn.MultiheadAttention(8, 2, dropout=0.2),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1),
    )
    slots = find_dropout(model)
    assert [s.name for s in slots] == [
        "0.p", "1.p", "2.p", "3.p", "4.p", "5.p", "6.dropout",
        "7.self_attn.dropout", "7.dropout.p", "7.dropout1.p", "7.dropout2.p",
    ]
    set_rates(slots, 0.05)
    rates = [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates += [m.dropout for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert rates == [0.05] * 11


def test_dropout_patterns_and_named_attributes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)
            self.attn_p = 0.2

    model = nn.Sequential(Block(), Block())
    assert [s.name for s in find_dropout(model, exclude=["1.*"])] == ["0.drop.p"]
    assert [s.name for s in find_dropout(model, include=["*.drop"], attributes=["*.attn_p"])] == [
        "0.drop.p", "1.drop.p", "0.attn_p", "1.attn_p",
    ]
    with pytest.raises(ValueError, match="include"):
        find_dropout(model, include=["encoder.*"])
    with pytest.raises(ValueError, match="attributes"):
        find_dropout(model, attributes=["*.nothing"])


def test_drop_path_frequency_matches_each_block_rate():
    """Branch outputs of ones: a dropped sample is 0, a kept one 1/(1 - rate); count over 40,000 samples per block."""
    blocks = nn.ModuleList(nn.Identity() for _ in range(4))


    hooks = DropPathHooks(blocks, [ResidualBlock(str(i), (str(i),)) for i in range(4)]).attach()
    rates = block_drop_rates(0.6, 4, "linear")  # 0.15, 0.3, 0.45, 0.6
    hooks.set_rates(rates)
    torch.manual_seed(0)
    x = torch.ones(40_000, 3)
    for i, rate in enumerate(rates):
        out = blocks[i](x)
        dropped = (out[:, 0] == 0).double().mean().item()
        assert abs(dropped - rate) < 4 * math.sqrt(rate * (1 - rate) / len(x))
        assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - rate))))
        assert torch.all(out == out[:, :1])  # whole samples, not elements
    blocks.eval()
    assert torch.equal(blocks[3](x), x)


def test_drop_path_is_unbiased():
    """E[out] = x: kept samples are scaled by 1 / (1 - rate). Mean 3, so no scaling (2.1) or all zeros (0) would fail;
    the sample mean's standard error is sqrt(E[x^2] / 0.7 - 9) / sqrt(N) ~ 0.005."""
    torch.manual_seed(1)
    x = torch.randn(200_000, 2) + 3.0
    out = drop_path(x, torch.tensor(0.3))
    assert out.mean(0).sub(x.mean(0)).abs().max() < 0.03
    dropped = (out == 0).all(1).double().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(x))


def test_demo_resnet_hooked_eval_equals_plain_model():
    model = ResNet(num_blocks=3, width=8)
    reference = ResNet(num_blocks=3, width=8)
    reference.load_state_dict(model.state_dict())
    hooks = DropPathHooks(model, find_residual_blocks(model)).attach()
    hooks.set_rates([0.5, 0.5, 0.5])
    model.eval(), reference.eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), reference(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_our_drop_path_module_drops_whole_samples_and_is_found_as_a_slot():
    from lightning_startwell.drop_path import DropPath

    torch.manual_seed(0)
    layer = DropPath(0.25)
    out = layer(torch.ones(40_000, 3))
    dropped = (out[:, 0] == 0).double().mean().item()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 40_000)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(1 / 0.75)))
    layer.eval()
    assert torch.equal(layer(torch.ones(5, 3)), torch.ones(5, 3))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(3, 3)
            self.drop = DropPath(0.1)

        def forward(self, x):
            return x + self.drop(self.f(x))

    model = nn.Sequential(Block(), Block())
    assert [b.outputs for b in find_residual_blocks(model)] == [("0.drop",), ("1.drop",)]
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)
