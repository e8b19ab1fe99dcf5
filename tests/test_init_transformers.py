"""InitScheme's core on Hugging Face's Conv1D (GPT-2's projections, weight stored (in, out)): every projection
reached, with the fans of its forward pass, against the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_startwell.init import fans, init_weights, weight_layers

transformers = pytest.importorskip("transformers")


def gpt2(width=64):
    config = transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=width, n_layer=2, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2Model(config)


def conv1d_layers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def test_every_gpt2_projection_is_a_weight_layer_with_the_fans_of_its_forward():
    model = gpt2()
    found = weight_layers(model)
    assert set(conv1d_layers(model)) == set(found) and len(found) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj x 2
    attn, fc = found["h.0.attn.c_attn"], found["h.0.mlp.c_fc"]
    x = torch.randn(5, 64)
    assert attn(x).shape[-1] == 192 and fans(attn) == (64, 192)  # y = x W: in 64, out 3 x 64
    assert fans(fc) == (64, 256) and fans(found["h.0.mlp.c_proj"]) == (256, 64)


@pytest.mark.parametrize(
    ("scheme", "std_of"),
    [
        ("glorot_normal", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
        ("he_normal", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
        ("he_uniform", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
    ],
)
def test_schemes_on_conv1d_draw_the_formula_std(scheme, std_of):
    model = gpt2()
    init_weights(model, scheme, generator=torch.Generator().manual_seed(0))
    for name, layer in conv1d_layers(model).items():
        fan_in, fan_out = layer.weight.shape  # (in, out) as stored
        assert layer.weight.std().item() == pytest.approx(std_of(fan_in, fan_out), rel=0.05), name
        assert torch.count_nonzero(layer.bias) == 0


def test_orthogonal_conv1d_is_orthogonal_between_output_units():
    model = gpt2()
    init_weights(model, "orthogonal", generator=torch.Generator().manual_seed(0))
    for name, layer in conv1d_layers(model).items():
        w = layer.weight.detach().double().t()  # one row per output unit, as the layer computes y = x W
        small = min(w.shape)
        gram = w.t() @ w if w.shape[0] > w.shape[1] else w @ w.t()  # the side that can be the identity
        # A semi-orthogonal matrix scaled by the ReLU gain sqrt(2) (the default nonlinearity): W W^T = 2 I.
        assert torch.allclose(gram, 2 * torch.eye(small, dtype=torch.float64), atol=1e-5), name
