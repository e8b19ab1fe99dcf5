"""InitScheme's core on transformer and recurrent layers: Hugging Face's Conv1D (GPT-2's projections, weight stored
(in, out)), nn.LSTM / GRU / RNN per gate, nn.MultiheadAttention per projection, each against the formulas."""

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


def gate_blocks(weight, gates):
    return weight.detach().double().chunk(gates, dim=0)


@pytest.mark.parametrize(("kind", "gates"), [(torch.nn.LSTM, 4), (torch.nn.GRU, 3), (torch.nn.RNN, 1)])
def test_recurrent_layers_per_gate_scheme_on_inputs_orthogonal_recurrence(kind, gates):
    torch.manual_seed(0)
    rnn = kind(32, 64, num_layers=2, bidirectional=True)
    report = init_weights(torch.nn.Sequential(rnn), "glorot_normal", generator=torch.Generator().manual_seed(0))
    for suffix in ("", "_reverse"):
        for layer, inputs in ((0, 32), (1, 128)):  # layer 1 reads both directions: 2 x 64
            for g, block in enumerate(gate_blocks(getattr(rnn, f"weight_ih_l{layer}{suffix}"), gates)):
                assert block.std().item() == pytest.approx(math.sqrt(2 / (inputs + 64)), rel=0.08), (layer, g)
            for block in gate_blocks(getattr(rnn, f"weight_hh_l{layer}{suffix}"), gates):
                assert torch.allclose(block @ block.t(), torch.eye(64, dtype=torch.float64), atol=1e-5)
    assert all(torch.count_nonzero(p) == 0 for n, p in rnn.named_parameters() if "bias" in n)
    entry = {r.name: r for r in report}["0.weight_ih_l1"]
    assert (entry.fan_in, entry.fan_out, entry.module) == (128, 64, "0")
    assert entry.target_std == pytest.approx(math.sqrt(2 / 192))


def test_lstm_forget_gate_bias_and_projection():
    lstm = torch.nn.LSTM(16, 32, proj_size=8)
    generator = torch.Generator().manual_seed(0)
    init_weights(torch.nn.Sequential(lstm), "he_normal", forget_gate_bias=1.0, generator=generator)
    i, f, g, o = lstm.bias_ih_l0.detach().chunk(4)
    assert torch.all(f == 1.0) and torch.count_nonzero(torch.cat([i, g, o])) == 0
    assert torch.count_nonzero(lstm.bias_hh_l0) == 0  # the gate's total bias is the value asked for
    for block in gate_blocks(lstm.weight_hh_l0, 4):  # (32, 8): recurrent input is the projection
        assert torch.allclose(block.t() @ block, torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert lstm.weight_hr_l0.std().item() == pytest.approx(math.sqrt(2 / 32), rel=0.25)  # He, fan_in = hidden 32
    with pytest.raises(ValueError, match="forget_gate_bias"):
        init_weights(torch.nn.Sequential(lstm), "he_normal", forget_gate_bias=float("nan"))


def test_multihead_attention_fans_per_projection_not_of_the_packed_matrix():
    attn = torch.nn.MultiheadAttention(64, 4)
    init_weights(torch.nn.Sequential(attn), "glorot_normal", generator=torch.Generator().manual_seed(0))
    for block in attn.in_proj_weight.detach().chunk(3):
        # per projection (64 -> 64): sqrt(2 / 128) = 0.125; the packed (192, 64) matrix would give sqrt(2 / 256)
        assert block.std().item() == pytest.approx(0.125, rel=0.05)
    assert attn.out_proj.weight.std().item() == pytest.approx(0.125, rel=0.05)
    separate = torch.nn.MultiheadAttention(64, 4, kdim=16, vdim=32)
    init_weights(torch.nn.Sequential(separate), "glorot_normal", generator=torch.Generator().manual_seed(0))
    assert separate.k_proj_weight.std().item() == pytest.approx(math.sqrt(2 / 80), rel=0.08)
    assert separate.v_proj_weight.std().item() == pytest.approx(math.sqrt(2 / 96), rel=0.08)


def test_transformer_encoder_layer_is_reached_whole():
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128)
    names = {r.name for r in init_weights(layer, "orthogonal", generator=torch.Generator().manual_seed(0))}
    assert names == {"self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"}
    for block in layer.self_attn.in_proj_weight.detach().double().chunk(3):
        assert torch.allclose(block @ block.t(), 2 * torch.eye(64, dtype=torch.float64), atol=1e-5)  # ReLU gain


def test_signal_of_recurrent_and_attention_layers_is_their_first_output():
    from lightning_startwell.init import watched_layers
    from lightning_startwell.propagation import SignalRecorder

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            h, _ = self.lstm(x)
            a, _ = self.attn(h, h, h)
            return self.head(a[:, -1])

    torch.manual_seed(0)
    net, x = Net(), torch.randn(4, 5, 8)
    layers = watched_layers(net)
    assert list(layers) == ["lstm", "attn", "attn.out_proj", "head"]
    with SignalRecorder(layers) as recorder:
        net(x).pow(2).sum().backward()
    forward, backward = recorder.variances()
    h = net.lstm(x)[0]  # independent: the outputs recomputed and differentiated directly
    h.retain_grad()
    a = net.attn(h, h, h)[0]
    a.retain_grad()
    net.head(a[:, -1]).pow(2).sum().backward()
    assert forward["lstm"] == pytest.approx(h.double().var().item(), rel=1e-5)
    assert forward["attn"] == pytest.approx(a.double().var().item(), rel=1e-5)
    assert backward["attn"] == pytest.approx(a.grad.double().var().item(), rel=1e-5)
    assert backward["lstm"] == pytest.approx(h.grad.double().var().item(), rel=1e-5)
