"""The pure core of the gradient dynamics against hand computations: closed-form gradients of softmax regression,
pairwise cosines by a double loop, the whole-set gradient from all samples at once, norms in float64."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from lightning_startwell.dynamics import (
    direction_statistics,
    direction_sums,
    gradient_directions,
    gradient_norm,
    parameter_distance,
    probe_gradient,
)

K, B, D, C = 4, 6, 5, 3  # probe batches, batch size, input size, classes


def softmax_regression_gradient(weight, bias, x, y):
    """Closed form in float64: dL/dW = 1/N sum_n (softmax(W x_n + b) - e_{y_n}) x_n^T, dL/db = 1/N sum_n (...)."""
    w, b, x = weight.detach().double(), bias.detach().double(), x.double()
    residual = torch.softmax(x @ w.T + b, dim=1) - torch.eye(w.shape[0], dtype=torch.float64)[y]
    return torch.cat([(residual.T @ x / len(x)).reshape(-1), residual.mean(0)])


def cosine(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


@pytest.fixture
def probe_set():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(D, C)
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=g))
        model.bias.copy_(torch.randn(C, generator=g))
    x, y = torch.randn(K * B, D, generator=g), torch.randint(0, C, (K * B,), generator=g)
    return model, list(zip(x.split(B), y.split(B), strict=True)), (x, y)


def test_probe_gradient_is_the_closed_form_gradient_of_softmax_regression(probe_set):
    model, batches, _ = probe_set
    params = list(model.parameters())
    for x, y in batches:
        expected = softmax_regression_gradient(model.weight, model.bias, x, y)
        assert torch.allclose(probe_gradient(model, x, y, params).double(), expected, rtol=1e-5, atol=1e-7)


def test_direction_statistics_equal_the_double_loop_and_the_whole_set_gradient(probe_set):
    model, batches, (x_all, y_all) = probe_set
    grads = [softmax_regression_gradient(model.weight, model.bias, x, y) for x, y in batches]
    pair_distances = [(1 - cosine(gi, gj)) / 2 for gi, gj in itertools.combinations(grads, 2)]
    assert len(pair_distances) == K * (K - 1) // 2
    # The whole probe set's gradient, from all K*B samples at once (not the mean of the batch gradients).
    whole = softmax_regression_gradient(model.weight, model.bias, x_all, y_all)
    errors = [(1 - cosine(g, whole)) / 2 for g in grads]
    params = list(model.parameters())
    measured = gradient_directions([probe_gradient(model, x, y, params) for x, y in batches])
    assert measured.variance == pytest.approx(sum(pair_distances) / len(pair_distances), rel=1e-6)
    assert measured.error == pytest.approx(sum(errors) / K, rel=1e-6)
    assert 0 < measured.error < measured.variance < 0.5  # a real spread: the test would see a wrong formula


def test_direction_statistics_of_a_hand_made_set():
    # g1 = (1, 0), g2 = (0, 1), g3 = (1, 1): cos12 = 0, cos13 = cos23 = 1/sqrt2; the whole-set gradient points along
    # (1, 1): cos = 1/sqrt2, 1/sqrt2, 1.
    r = 1 / math.sqrt(2)
    stats = gradient_directions([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])])
    assert stats.variance == pytest.approx(((1 - 0) / 2 + 2 * (1 - r) / 2) / 3, rel=1e-12)
    assert stats.error == pytest.approx((2 * (1 - r) / 2 + 0) / 3, rel=1e-12)
    same = gradient_directions([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])])
    assert same.variance == pytest.approx(0.0, abs=1e-12) and same.error == pytest.approx(0.0, abs=1e-12)
    opposite = gradient_directions([torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])])
    assert opposite.variance == pytest.approx(1.0, rel=1e-12)


def test_sums_of_parts_add_up_to_the_sums_of_the_whole():
    grads = list(torch.randn(7, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    parts = direction_sums(grads[:3]) + direction_sums(grads[3:])  # what an all-reduce over two processes does
    assert direction_statistics(parts, 7) == pytest.approx(tuple(gradient_directions(grads)), rel=1e-12)


def test_zero_gradient_gives_nan_and_fewer_than_two_are_refused():
    stats = gradient_directions([torch.zeros(3), torch.ones(3)])
    assert math.isnan(stats.variance)
    with pytest.raises(ValueError, match="count"):
        gradient_directions([torch.ones(3)])
    with pytest.raises(ValueError, match="gradients"):
        direction_sums([])


def test_gradient_norm_and_distance_against_float64_sums():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    expected = math.sqrt(sum(float(v) ** 2 for t in tensors for v in t.double().reshape(-1)))
    assert gradient_norm([tensors[0], None, tensors[1]]).item() == pytest.approx(expected, rel=1e-6)
    initial = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    distance = math.sqrt(sum(float((a - b).double().pow(2).sum()) for a, b in zip(tensors, initial, strict=True)))
    assert parameter_distance(tensors, initial).item() == pytest.approx(distance, rel=1e-6)
    with pytest.raises(ValueError, match="initial"):
        parameter_distance(tensors, initial[:1])


def test_gradient_norm_of_half_precision_does_not_overflow():
    big = torch.full((100,), 300.0, dtype=torch.float16)  # 300^2 > 65504, the largest float16
    assert gradient_norm([big]).item() == pytest.approx(3000.0, rel=1e-3)


class DropoutBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, C))

    def forward(self, x):
        return self.net(x)


def test_probe_gradient_leaves_grad_buffers_and_random_streams_alone(probe_set):
    _, batches, _ = probe_set
    torch.manual_seed(3)
    model = DropoutBatchNormNet().train()
    params = list(model.parameters())
    for p in params[:-1]:
        p.grad = torch.full_like(p, 7.0)  # the last one keeps grad None
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    probe_gradient(model, *batches[0], params, seed=11)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params[:-1]) and params[-1].grad is None
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())


def test_probe_gradient_draws_its_dropout_masks_from_the_seed(probe_set):
    _, batches, _ = probe_set
    torch.manual_seed(3)
    model = DropoutBatchNormNet().train()
    params = list(model.parameters())
    x, y = batches[0]
    # Reference: plain backward on a copy, masks drawn from the same seed.
    reference = copy.deepcopy(model)
    torch.manual_seed(11)
    nn.functional.cross_entropy(reference(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    assert torch.allclose(probe_gradient(model, x, y, params, seed=11), expected, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(probe_gradient(model, x, y, params, seed=12), expected, rtol=1e-3)  # masks change
    model.eval()  # no dropout: the seed no longer matters
    assert torch.equal(probe_gradient(model, x, y, params, seed=1), probe_gradient(model, x, y, params, seed=2))


def test_probe_gradient_gives_zeros_for_parameters_the_loss_does_not_reach(probe_set):
    model, batches, _ = probe_set
    unused = nn.Parameter(torch.ones(4))
    grad = probe_gradient(model, *batches[0], [*model.parameters(), unused])
    assert grad.shape == (C * D + C + 4,) and torch.equal(grad[-4:], torch.zeros(4))


def test_mse_loss_gradient_is_the_closed_form():
    g = torch.Generator().manual_seed(4)
    model = nn.Linear(D, 2)
    x, y = torch.randn(B, D, generator=g), torch.randn(B, 2, generator=g)
    # L = 1/(N C) sum (W x + b - y)^2: dL/dW = 2/(N C) sum_n r_n x_n^T, dL/db = 2/(N C) sum_n r_n.
    r = (x.double() @ model.weight.double().T + model.bias.double() - y.double()) * 2 / (B * 2)
    expected = torch.cat([(r.T @ x.double()).reshape(-1), r.sum(0)])
    got = probe_gradient(model, x, y, list(model.parameters()), loss="mse").double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
