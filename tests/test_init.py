"""init_weights against the formulas of the lecture and of the papers, computed here independently."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_startwell.init import fans, find_residual_branches, init_weights
from lightning_startwell.models import MLP, ConvNet, ResNet

# Layers with fan_in != fan_out, both ways, so Glorot, LeCun, He fan_in and He fan_out all aim at different stds.
LAYERS_AND_FANS = [
    (lambda: nn.Linear(1024, 512), (1024, 512)),
    (lambda: nn.Linear(256, 1024), (256, 1024)),
    (lambda: nn.Conv2d(256, 128, 3), (256 * 9, 128 * 9)),
]


def _expected_std(scheme, fan_in, fan_out, slope=0.0, mode="fan_in"):
    fan = fan_in if mode == "fan_in" else fan_out
    return {
        "glorot_normal": math.sqrt(2 / (fan_in + fan_out)),
        "glorot_uniform": math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(3),  # a^2 = 6/(fi+fo), Var = a^2/3
        "he_normal": math.sqrt(2 / ((1 + slope**2) * fan)),
        "he_uniform": math.sqrt(6 / ((1 + slope**2) * fan)) / math.sqrt(3),
        "lecun_normal": math.sqrt(1 / fan_in),
        "orthogonal": 1 / math.sqrt(max(fan_in, fan_out)),
    }[scheme]


@pytest.mark.parametrize(
    "scheme", ["glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "lecun_normal", "orthogonal"]
)
@pytest.mark.parametrize("slope", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_std_of_each_scheme_matches_its_formula_within_3_percent(scheme, slope, mode):
    nonlinearity = "leaky_relu" if slope else "relu"
    if scheme == "orthogonal":
        nonlinearity = "linear"
    for make_layer, (fan_in, fan_out) in LAYERS_AND_FANS:
        layer = make_layer()
        report = init_weights(
            layer,
            scheme,
            mode=mode,
            nonlinearity=nonlinearity,
            negative_slope=slope,
            generator=torch.Generator().manual_seed(0),
        )
        expected = _expected_std(scheme, fan_in, fan_out, slope, mode)
        std = layer.weight.double().std().item()
        assert std == pytest.approx(expected, rel=0.03)
        assert report[0].target_std == pytest.approx(expected, rel=1e-12)
        assert (report[0].fan_in, report[0].fan_out) == (fan_in, fan_out)
        if scheme.endswith("uniform"):
            assert layer.weight.abs().max().item() <= math.sqrt(3) * expected + 1e-7
        assert torch.count_nonzero(layer.bias) == 0


def test_orthogonal_rows_are_orthonormal_times_the_gain():
    layer = nn.Linear(300, 200)
    init_weights(layer, "orthogonal", nonlinearity="tanh", generator=torch.Generator().manual_seed(1))
    w = layer.weight.double()
    assert torch.allclose(w @ w.T, (5 / 3) ** 2 * torch.eye(200, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 64, 3), (64, 8, 3), (16, 16, 1)], ids=["widening", "narrowing", "square"])
@pytest.mark.parametrize(("nonlinearity", "slope", "gain"), [("tanh", 0.0, 5 / 3), ("leaky_relu", 0.5, math.sqrt(1.6))])
def test_orthogonal_convolutions_have_the_singular_values_of_torch_nn_init(shape, nonlinearity, slope, gain):
    in_channels, out_channels, kernel = shape
    ours, reference = nn.Conv2d(in_channels, out_channels, kernel), nn.Conv2d(in_channels, out_channels, kernel)
    report = init_weights(
        ours, "orthogonal", nonlinearity=nonlinearity, negative_slope=slope, generator=torch.Generator().manual_seed(0)
    )
    nn.init.orthogonal_(reference.weight, gain=gain)
    singular = torch.linalg.svdvals(ours.weight.detach().double().flatten(1))
    expected = torch.linalg.svdvals(reference.weight.detach().double().flatten(1))
    assert torch.allclose(singular, expected, rtol=1e-5)
    assert torch.allclose(singular, torch.full_like(singular, gain), rtol=1e-5)
    assert report[0].target_std == pytest.approx(ours.weight.double().pow(2).mean().sqrt().item(), rel=1e-5)


def test_fans_of_grouped_and_transposed_convolutions_by_hand():
    assert fans(nn.Conv1d(6, 12, 5, groups=3)) == (2 * 5, 4 * 5)
    # ConvTranspose2d stores (in, out/groups, k, k); each output unit sees in/groups x 9 inputs.
    assert fans(nn.ConvTranspose2d(16, 8, 3, groups=2)) == (8 * 9, 4 * 9)
    assert fans(nn.Linear(7, 3)) == (7, 3)


def _deep_relu_ratio(scheme, slope, seed):
    """Var[z^50] / Var[z^1] of a 50-layer width-256 (leaky) ReLU MLP on Gaussian input, by an explicit loop."""
    layers = [nn.Linear(256, 256) for _ in range(50)]
    nonlinearity = "leaky_relu" if slope else "relu"
    init_weights(
        nn.Sequential(*layers),
        scheme,
        nonlinearity=nonlinearity,
        negative_slope=slope,
        generator=torch.Generator().manual_seed(seed),
    )
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    variances = []
    with torch.no_grad():
        for layer in layers:
            z = x @ layer.weight.double().T + layer.bias.double()
            variances.append(z.var().item())
            x = torch.where(z > 0, z, slope * z)
    return variances[-1] / variances[0]


@pytest.mark.parametrize(("scheme", "slope"), [("he_normal", 0.0), ("he_normal", 0.2)])
def test_he_keeps_the_variance_through_50_relu_layers(scheme, slope):
    ratios = [_deep_relu_ratio(scheme, slope, seed) for seed in range(5)]
    geometric_mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert 0.25 <= geometric_mean <= 4


def test_glorot_collapses_through_50_relu_layers():
    assert all(_deep_relu_ratio("glorot_normal", 0.0, seed) < 1e-6 for seed in range(3))


def test_same_seed_same_weights_and_every_rank_agrees():
    a, b, c = (MLP() for _ in range(3))
    init_weights(a, "he_normal", generator=torch.Generator().manual_seed(5))
    init_weights(b, "he_normal", generator=torch.Generator().manual_seed(5))
    init_weights(c, "he_normal", generator=torch.Generator().manual_seed(6))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.net[1].weight, c.net[1].weight)


def test_biases_kept_on_request_and_norms_reset():
    model = ConvNet(channels=[8], dropout=0.0)
    with torch.no_grad():
        model.net[1].weight.fill_(3.0)
        model.net[1].bias.fill_(2.0)
    head = model.net[-1]
    bias_before = head.bias.clone()
    init_weights(model, "he_normal", keep_bias=True)
    assert torch.equal(head.bias, bias_before)
    assert torch.all(model.net[1].weight == 1) and torch.all(model.net[1].bias == 0)


def test_include_and_exclude_patterns():
    model = MLP(depth=3)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = init_weights(model, "he_normal", include=["net.*"], exclude=["net.1"])
    assert [r.name for r in report] == ["net.4", "net.7", "net.10"]
    assert torch.equal(model.net[1].weight, before["net.1.weight"])
    assert not torch.equal(model.net[4].weight, before["net.4.weight"])


def _fixup_warning():
    return pytest.warns(UserWarning, match="fixup.*without normalisation")


def test_fixup_on_the_demo_resnet_with_batch_norm_is_applied_with_a_warning():
    model = ResNet(num_blocks=4, width=16)
    with _fixup_warning():
        init_weights(model, "fixup", generator=torch.Generator().manual_seed(0))
    he = math.sqrt(2 / (16 * 9))
    first = torch.cat([model.blocks[i].branch[0].weight.flatten() for i in range(4)]).double()
    assert first.std().item() == pytest.approx(he * 4 ** (-1 / (2 * 2 - 2)), rel=0.03)
    for i in range(4):
        assert torch.count_nonzero(model.blocks[i].branch[4].weight) == 0
    assert torch.count_nonzero(model.head[2].weight) == 0 and torch.count_nonzero(model.head[2].bias) == 0


def test_fixup_on_the_normalisation_free_resnet_makes_every_block_the_identity():
    blocks, width = 9, 16
    model = ResNet(num_blocks=blocks, width=width, norm="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no normalisation: no warning
        init_weights(model, "fixup", generator=torch.Generator().manual_seed(0))
    first = torch.cat([block.branch[1].weight.flatten() for block in model.blocks]).double()
    # He std sqrt(2 / fan_in) times L^(-1/(2m-2)) with m = 2 layers per branch: L^(-1/2).
    assert first.std().item() == pytest.approx(math.sqrt(2 / (width * 9)) / math.sqrt(blocks), rel=0.03)
    assert all(torch.count_nonzero(block.branch[6].weight) == 0 for block in model.blocks)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        stem = model.stem(x)
        assert torch.equal(model.blocks(stem), stem)
        assert torch.count_nonzero(model(x)) == 0


def test_fixup_and_zero_init_residual_on_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    branches = find_residual_branches(model)
    assert len(branches) == 8 and branches[0].layers == ("layer1.0.conv1", "layer1.0.conv2")
    with _fixup_warning():
        init_weights(model, "fixup", zero_init_residual=True, generator=torch.Generator().manual_seed(0))
    conv1 = model.layer4[1].conv1.weight.double()
    assert conv1.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)) * 8**-0.5, rel=0.03)
    for block in (model.layer1[0], model.layer4[1]):
        assert torch.count_nonzero(block.conv2.weight) == 0
        assert torch.count_nonzero(block.bn2.weight) == 0
    assert torch.count_nonzero(model.fc.weight) == 0
    assert model.layer2[0].downsample[0].weight.double().std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)


def test_zero_init_residual_on_named_branches():
    model = ResNet(num_blocks=2, width=8)
    init_weights(model, "he_normal", zero_init_residual=True, residual_branches=["blocks.*.branch"])
    for block in model.blocks:
        assert torch.count_nonzero(block.branch[5].weight) == 0
        assert torch.all(block.branch[1].weight == 1)


def _train_mode_output_variances(model, x):
    """Output variance of every Linear/conv layer in train mode, through hooks written here."""
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.double().var().item())

        return hook

    hooks = [
        m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    mode = model.training
    model.train()
    with torch.no_grad():
        model(x)
    model.train(mode)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("model", [MLP(depth=4, width=64, activation="tanh"), ResNet(num_blocks=2, width=16)])
def test_lsuv_reaches_unit_variance_restores_mode_and_running_statistics(model):
    x = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    model.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    report = init_weights(model, "lsuv", lsuv_inputs=x, lsuv_tol=0.05, generator=torch.Generator().manual_seed(0))
    assert not model.training and not any(m.training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    variances = _train_mode_output_variances(model, x)
    assert set(variances) == {r.name for r in report}
    for r in report:
        assert abs(variances[r.name] - 1) < 0.05, (r.name, variances[r.name])
        assert r.output_var == pytest.approx(variances[r.name], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"scheme": "xavier"}, "scheme"),
        ({"mode": "fan_avg"}, "mode"),
        ({"nonlinearity": "gelu"}, "nonlinearity"),
        ({"negative_slope": 1.0}, "negative_slope"),
        ({"negative_slope": -0.1}, "negative_slope"),
        ({"include": ["encoder.*"]}, "include"),
        ({"scheme": "he_normal", "nonlinearity": "tanh"}, "nonlinearity"),
        ({"scheme": "fixup"}, "residual"),
        ({"scheme": "lsuv"}, "lsuv_inputs"),
    ],
)
def test_bad_arguments_raise_before_any_weight_changes(kwargs, named):
    model = MLP()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        init_weights(model, **kwargs)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


def test_a_model_without_layers_is_refused():
    with pytest.raises(ValueError, match="no Linear, convolution, recurrent or attention layer"):
        init_weights(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "he_normal")
