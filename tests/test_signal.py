"""SignalRecorder against autograd with retained gradients, including torchvision's in-place ResNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_startwell.init import weight_layers
from lightning_startwell.models import MLP
from lightning_startwell.propagation import SignalRecorder, propagation_ratios


def _reference(model, x, loss_fn):
    """Outputs and their gradients of every Linear/conv layer, by retain_grad and a float64 variance."""
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in weight_layers(model).items()]
    loss_fn(model(x)).backward()
    for h in hooks:
        h.remove()
    forward = {n: o.detach().double().var().item() for n, o in outputs.items()}
    backward = {n: o.grad.double().var().item() for n, o in outputs.items()}
    return forward, backward


def _compare(model, x, loss_fn):
    torch.manual_seed(0)
    expected_f, expected_b = _reference(model, x, loss_fn)
    model.zero_grad()
    with SignalRecorder(weight_layers(model)) as recorder:
        loss_fn(model(x)).backward()
    forward, backward = recorder.variances()
    assert list(forward) == list(expected_f)
    for name in expected_f:
        assert forward[name] == pytest.approx(expected_f[name], rel=1e-9)
        assert backward[name] == pytest.approx(expected_b[name], rel=1e-9)
    return forward, backward


def test_recorder_matches_retained_gradients_on_an_mlp():
    model = MLP(depth=3, width=32, activation="tanh").eval()
    x = torch.randn(16, 1, 8, 8)
    forward, backward = _compare(model, x, lambda out: out.logsumexp(-1).sum())
    ratio_f, ratio_b = propagation_ratios(forward, backward)
    names = list(forward)
    assert ratio_f == pytest.approx(forward[names[-1]] / forward[names[0]])
    assert ratio_b == pytest.approx(backward[names[0]] / backward[names[-1]])


def test_recorder_works_with_in_place_ops_of_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    forward, backward = _compare(model, x, lambda out: nn.functional.cross_entropy(out, torch.arange(4)))
    assert len(forward) == 21  # 20 convolutions and the classifier


def test_hooks_exist_only_while_attached():
    model = MLP()
    recorder = SignalRecorder(weight_layers(model)).attach()
    assert all(len(m._forward_hooks) == 1 for m in weight_layers(model).values())
    recorder.detach()
    assert all(len(m._forward_hooks) == 0 for m in weight_layers(model).values())
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert recorder.names() == []
