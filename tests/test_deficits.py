"""Deficit functions against properties computed independently (constants, projections, indexing, statistics)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_startwell.deficits import (
    blur,
    class_permutation,
    deprivation,
    label_permutation,
    moments,
    noise,
    vertical_flip,
)


@pytest.mark.parametrize("shape", [(3, 2, 32, 32), (5, 1, 40)])
def test_blur_of_a_constant_is_that_constant(shape):
    x = torch.full(shape, 2.5)
    assert torch.allclose(blur(x, 4), x, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 2, 32, 32), (5, 1, 40)])
def test_blur_at_full_size_is_the_identity_and_blur_is_linear(shape):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.allclose(blur(x, shape[-1]), x, atol=1e-5)
    assert torch.allclose(blur(2 * x - 3 * y, 8), 2 * blur(x, 8) - 3 * blur(y, 8), atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 2, 32, 32), (5, 1, 40)])
def test_blur_is_nearly_a_projection(shape):
    """Bilinear upsampling followed by an antialiased (triangle-filter) downsampling is not exactly the identity on the
    small grid, so a second blur still moves the batch a little: much less than the first one did."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    once = blur(x, 8)
    twice = blur(once, 8)
    assert (twice - once).norm() < 0.15 * (once - x).norm()


def test_blur_removes_fine_detail_and_keeps_coarse_structure():
    t = torch.arange(40, dtype=torch.float32)
    fine = torch.cos(math.pi * t).reshape(1, 1, 40)  # +1, -1, ...: period 2 samples
    coarse = torch.sin(2 * math.pi * t / 40).reshape(1, 1, 40)  # one period over the signal
    assert blur(fine, 8).abs().max() < 0.1  # at least 90% of the amplitude gone (the rest is at the borders)
    assert torch.corrcoef(torch.stack([blur(coarse, 8).flatten(), coarse.flatten()]))[0, 1] > 0.98


def test_vertical_flip_by_indexing_and_twice_is_identity():
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    flipped = vertical_flip(image)
    for row in range(4):
        assert torch.equal(flipped[:, :, row], image[:, :, 3 - row])
    assert torch.equal(vertical_flip(flipped), image)
    signal = torch.randn(2, 1, 40)
    assert torch.equal(vertical_flip(signal), -signal)
    assert torch.equal(vertical_flip(vertical_flip(signal)), signal)


def test_label_permutation_is_a_fixed_permutation():
    perm = class_permutation(10, seed=3)
    assert sorted(perm.tolist()) == list(range(10))
    assert torch.equal(perm, class_permutation(10, seed=3))
    assert not torch.equal(perm, class_permutation(10, seed=4))
    y = torch.tensor([0, 3, 3, 9])
    assert label_permutation(y, perm).tolist() == [perm[0].item(), perm[3].item(), perm[3].item(), perm[9].item()]


def test_noise_statistics():
    x = torch.zeros(200_000)
    out = noise(x, 0.7, generator=torch.Generator().manual_seed(0))
    assert abs(out.mean().item()) < 0.01 and out.std().item() == pytest.approx(0.7, rel=0.01)
    with pytest.raises(ValueError, match="noise_std"):
        noise(x, -1.0)


@pytest.mark.parametrize("size", [0, 41])
def test_blur_size_outside_the_input_is_refused(size):
    with pytest.raises(ValueError, match="size"):
        blur(torch.zeros(1, 1, 40), size)


def test_deficits_need_batched_images_or_signals():
    with pytest.raises(ValueError, match="shape"):
        blur(torch.zeros(4, 40), 4)


def test_deprivation_keeps_nothing_of_the_input_but_its_shape_and_the_given_moments():
    x = torch.randn(50_000, 1, 40, generator=torch.Generator().manual_seed(0))
    out = deprivation(x, 1.5, 0.25, generator=torch.Generator().manual_seed(1))
    same_draw = deprivation(torch.zeros_like(x), 1.5, 0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same_draw)  # the values of x play no part
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.mean().item() == pytest.approx(1.5, abs=0.002) and out.std().item() == pytest.approx(0.25, rel=0.01)
    assert abs(torch.corrcoef(torch.stack([out.flatten(), x.flatten()]))[0, 1].item()) < 0.01
    with pytest.raises(ValueError, match="std"):
        deprivation(x, 0.0, -1.0)


def test_moments_against_numpy_float64():
    x = torch.randn(3, 2, 40, generator=torch.Generator().manual_seed(2)) * 3 + 7
    values = x.numpy().astype("float64").ravel()
    mean, std = moments(x)
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert std == pytest.approx(values.std(ddof=1), rel=1e-12)


def test_label_permutation_keeps_ignored_targets():
    perm = class_permutation(300, seed=1)  # a vocabulary larger than 100: -100 would index a real token
    y = torch.tensor([[5, -100, 299], [-100, -100, 0]])
    out = label_permutation(y, perm)
    assert out.tolist() == [[perm[5].item(), -100, perm[299].item()], [-100, -100, perm[0].item()]]
    assert label_permutation(torch.tensor([300, 2]), perm, ignore_index=300).tolist() == [300, perm[2].item()]
