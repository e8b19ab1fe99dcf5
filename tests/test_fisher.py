"""fisher_trace against a float64 naive per-sample loop (one backward per sample and label), on an MLP, a conv net with
BatchNorm, the demo ResNet, torchvision's ResNet (in-place ReLU), attention, and shared parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_startwell.fisher import fisher_trace
from lightning_startwell.model_call import call_arguments, map_tensors, num_samples
from lightning_startwell.models import MLP, ConvNet, ResNet


@pytest.fixture(autouse=True)
def _seeded():
    """Fixed weights for every test. ReLU and max-pool are not differentiable at their kinks: a pre-activation within
    float32 rounding of one can switch sides between our float32 batched forward and the float64 reference, changing a
    per-sample gradient outright (seen at ~1 in 15 random torchvision ResNet-18 inits). Fixed seeds keep the
    comparison about our algebra, not about where rounding lands."""
    torch.manual_seed(0)


def naive_fisher(model, x, fisher, labels=None):
    """Per-module float64 trace: for every sample, backward of log p(y|x_i) for the label(s), squared norms summed.
    ``x``: a tensor, a tuple (positional arguments) or a dict (keyword arguments), every tensor split by sample."""
    model = copy.deepcopy(model).double().eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    owner = {n: n.rpartition(".")[0] for n in params}
    per_layer = {o: 0.0 for o in owner.values()}
    for i in range(num_samples(x)):
        xi = map_tensors(lambda t, i=i: t[i : i + 1].double() if t.is_floating_point() else t[i : i + 1], x)
        args, kwargs = call_arguments(xi)
        log_probs = model(*args, **kwargs).log_softmax(-1)[0]
        if fisher == "exact":
            pairs = [(c, log_probs[c].exp().item()) for c in range(len(log_probs))]
        else:
            pairs = [(int(labels[i]), 1.0)]
        for c, weight in pairs:
            grads = torch.autograd.grad(log_probs[c], list(params.values()), retain_graph=True, allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    g = g.to_dense() if g.is_sparse else g  # nn.Embedding(sparse=True)
                    per_layer[owner[name]] += weight * g.square().sum().item()
    return {k: v / num_samples(x) for k, v in per_layer.items()}


def _trained_bn(model, x):
    """Give BatchNorm layers non-trivial running statistics, as after some training."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5 * torch.randn_like(x))
    return model.eval()


def _compare(model, x, fisher, targets=None, method="auto", rel=1e-5, chunk_size=None):
    generator = torch.Generator().manual_seed(0)
    ours = fisher_trace(model, x, fisher=fisher, targets=targets, method=method, generator=generator,
                        chunk_size=chunk_size)
    labels = targets
    if fisher == "true":  # the same draws as fisher_trace: one multinomial per input from the same seed
        with torch.no_grad():
            probs = model.eval()(x).float().softmax(-1)
        labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(1)
    reference = naive_fisher(model, x, fisher, labels)
    nonzero = {k: v for k, v in reference.items() if v > 0}
    assert set(ours.per_layer) >= set(nonzero), (sorted(ours.per_layer), sorted(nonzero))
    for name, value in reference.items():
        assert ours.per_layer.get(name, 0.0) == pytest.approx(value, rel=rel, abs=1e-12), name
    assert ours.total == pytest.approx(sum(reference.values()), rel=rel)
    assert sum(ours.per_layer.values()) == pytest.approx(ours.total, rel=1e-12)
    assert ours.num_samples == num_samples(x)
    return ours


X_IMG = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("fisher", ["empirical", "exact", "true"])
def test_mlp(fisher):
    _compare(MLP(depth=2, width=16, activation="tanh"), X_IMG, fisher, Y)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 40)])
def test_conv_net_with_batchnorm(fisher, input_shape):
    x = torch.randn(10, *input_shape, generator=torch.Generator().manual_seed(3))
    model = _trained_bn(ConvNet(input_shape=input_shape, channels=[8, 16]), x)
    _compare(model, x, fisher, Y[:10])


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_demo_resnet(fisher):
    _compare(_trained_bn(ResNet(num_blocks=2, width=8), X_IMG), X_IMG, fisher, Y)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_torchvision_resnet_with_in_place_relu(fisher):
    torchvision = pytest.importorskip("torchvision")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    model = _trained_bn(torchvision.models.resnet18(num_classes=5), x)
    _compare(model, x, fisher, Y[:4] % 5)


class Attention(nn.Module):
    """Embedding -> TransformerEncoderLayer (MultiheadAttention uses its out_proj functionally) -> LayerNorm -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x))).mean(1))


def test_attention_layernorm_and_sequence_linear_layers():
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model = Attention()
        model.norm.weight.uniform_(0.5, 1.5)
    _compare(model, x, "exact")


class MaskedTokens(nn.Module):
    """Token ids -> embedding -> attention with a per-sample key padding mask (a batched keyword argument of the
    MultiheadAttention call, which the per-module vmap must slice with the samples) -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 8, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        padding = tokens == 0
        h = self.encoder(self.embed(tokens), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))


def test_attention_with_a_per_sample_padding_mask():
    tokens = torch.randint(1, 9, (6, 5), generator=torch.Generator().manual_seed(12))
    tokens[:3, 3:] = 0  # three samples padded: their masks differ from the others'
    _compare(MaskedTokens(), tokens, "exact")


class AttentionVariants(nn.Module):
    """Cross-attention (5 queries over 7 keys, a boolean mask) or causal self-attention, either layout, with or
    without biases: the configurations of nn.MultiheadAttention the attention rule re-runs with identity projections."""

    def __init__(self, cross, batch_first, bias):
        super().__init__()
        self.cross, self.batch_first = cross, batch_first
        self.q = nn.Linear(4, 8)
        self.kv = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        layout = (lambda t: t) if self.batch_first else (lambda t: t.transpose(0, 1))
        if self.cross:
            q, kv = layout(self.q(x[:, :5])), layout(self.kv(x))
            mask = torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=4)
            out = self.attn(q, key=kv, value=kv, attn_mask=mask, need_weights=False)[0]
        else:
            h = layout(self.q(x) + self.kv(x))
            causal = nn.Transformer.generate_square_subsequent_mask(7)
            out = self.attn(h, h, h, attn_mask=causal, is_causal=True, need_weights=False)[0]
        return self.head(layout(out).mean(1))


@pytest.mark.parametrize("cross", [True, False], ids=["cross", "causal self"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_rule_without_per_sample_vmap(cross, batch_first, bias, monkeypatch, no_whole_model_vmap):
    import lightning_startwell.fisher.hooks as fisher_module

    vmapped = []
    vjp_norms = fisher_module._vjp_norms
    monkeypatch.setattr(fisher_module, "_vjp_norms", lambda layer, *a: vmapped.append(layer) or vjp_norms(layer, *a))
    x = torch.randn(6, 7, 4, generator=torch.Generator().manual_seed(15))
    ours = _compare(AttentionVariants(cross, batch_first, bias), x, "exact")
    assert vmapped == []
    assert ours.per_layer["attn"] > 0 and ours.per_layer["attn.out_proj"] > 0


class UsesAttentionWeights(nn.Module):
    """The attention weights, the second output of nn.MultiheadAttention, feed the head too: a hook on the first
    output alone would miss that path."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(13, 3)

    def forward(self, x):
        h = self.q(x)
        out, weights = self.attn(h, h, h)
        return self.head(torch.cat([out.mean(1), weights.mean(1)], dim=1))


def test_a_second_output_used_downstream_takes_the_whole_model_path():
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(18))
    _compare(UsesAttentionWeights(), x, "exact")


class Recurrent(nn.Module):
    """A GRU (torch.func cannot vmap its kernel), its final state feeding the head beside its outputs or not."""

    def __init__(self, batch_first, use_state):
        super().__init__()
        self.batch_first, self.use_state = batch_first, use_state
        self.rnn = nn.GRU(4, 6, batch_first=batch_first)
        self.head = nn.Linear(12 if use_state else 6, 3)

    def forward(self, x):
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        features = out.mean(1 if self.batch_first else 0)
        return self.head(torch.cat([features, state[-1]], dim=1) if self.use_state else features)


@pytest.mark.parametrize(("batch_first", "use_state"), [(True, False), (True, True), (False, True)])
def test_recurrent_layers_per_sample_when_vmap_cannot(batch_first, use_state):
    x = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(19))
    _compare(Recurrent(batch_first, use_state), x, "exact")


class SequenceFirst(nn.Module):
    """nn.TransformerEncoderLayer in its default (sequence, batch, features) layout: its Linear and LayerNorm layers
    see the samples along dim 1."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x).transpose(0, 1)).mean(0))


@pytest.mark.parametrize("batch", [6, 5])  # 5: as many samples as positions, the shapes alone cannot tell
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_sequence_first_layers_take_the_whole_model_path(batch, fisher):
    x = torch.randn(batch, 5, 4, generator=torch.Generator().manual_seed(16))
    _compare(SequenceFirst(), x, fisher, torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(17)))


def test_partly_frozen_layers_count_only_their_trainable_parameters():
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(13))
    model = _trained_bn(ConvNet(input_shape=(1, 8, 8), channels=[4, 8]), x)
    frozen = [m for m in model.modules() if len(list(m.parameters(recurse=False))) == 2][:3]
    assert len(frozen) == 3
    frozen[0].weight.requires_grad_(False)  # bias-only fine-tuning of this layer (BitFit)
    frozen[1].bias.requires_grad_(False)
    for p in frozen[2].parameters():
        p.requires_grad_(False)
    ours = _compare(model, x, "exact", Y[:10])
    fully_frozen = next(n for n, m in model.named_modules() if m is frozen[2])
    assert fully_frozen not in ours.per_layer


class Tied(nn.Module):
    """The same Linear applied twice, and a weight shared by two modules."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.inner(torch.tanh(self.inner(x))))
        return self.a(h) + self.b(h)


def test_shared_parameters_fall_back_to_exact_per_sample_gradients():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
    _compare(Tied(), x, "exact")


def test_vmap_method_agrees():
    _compare(_trained_bn(ResNet(num_blocks=1, width=4), X_IMG), X_IMG, "empirical", Y, method="vmap")


def test_measurement_leaves_grad_mode_and_running_statistics_alone():
    model = _trained_bn(ResNet(num_blocks=1, width=4), X_IMG).train()
    model.blocks[0].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    fisher_trace(model, X_IMG, fisher="exact")
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_batching_gives_the_same_trace():
    model = MLP(depth=1, width=8)
    whole = fisher_trace(model, X_IMG, fisher="exact")
    batched = fisher_trace(model, X_IMG, fisher="exact", batch_size=5)
    assert batched.total == pytest.approx(whole.total, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"fisher": "observed"}, "fisher"),
        ({"method": "backpack"}, "method"),
        ({"fisher": "empirical"}, "targets"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        fisher_trace(MLP(), X_IMG, **kwargs)


def test_output_that_is_not_logits_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 1)

        def forward(self, x):
            return self.lin(x.flatten(1)).squeeze(1)

    with pytest.raises(ValueError, match=r"\(N, C\).* logits"):
        fisher_trace(Flat(), X_IMG)


@pytest.fixture(params=[None, 2], ids=["one chunk", "chunks of 2"])
def chunks(request, monkeypatch):
    """Run the per-sample rules in one chunk, or in chunks of two samples."""
    import lightning_startwell.fisher.closed_forms as fisher_module

    if request.param:
        monkeypatch.setattr(fisher_module, "_chunk_samples", lambda per_sample, like: request.param)


@pytest.mark.parametrize(("t", "d", "p"), [(3, 20, 30), (50, 4, 6)])  # ghost norm, then materialised
def test_sequence_rule_equals_explicit_per_sample_gradients(t, d, p, chunks):
    from lightning_startwell.fisher.closed_forms import _sequence_norms

    g = torch.Generator().manual_seed(7)
    a = torch.randn(5, t, d, generator=g, dtype=torch.float64)
    delta = torch.randn(5, t, p, generator=g, dtype=torch.float64)
    explicit = torch.einsum("ntp,ntd->npd", delta, a).square().sum((1, 2))
    assert torch.allclose(_sequence_norms(a, delta), explicit, rtol=1e-12)


@pytest.mark.parametrize("path", ["ghost", "weight"])
@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
        nn.Conv2d(3, 5, (3, 1), padding=(1, 0), dilation=(2, 1)),
        nn.Conv1d(4, 8, 5, stride=2, padding=2, groups=4),
    ],
)
def test_both_convolution_rules_equal_explicit_per_sample_gradients(monkeypatch, path, layer, chunks):
    import lightning_startwell.fisher.closed_forms as fisher_module

    layer = layer.double()
    shape = (6, layer.in_channels, 9, 7) if isinstance(layer, nn.Conv2d) else (6, layer.in_channels, 11)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out = layer(x)
    delta = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    explicit = []
    for i in range(len(x)):
        grads = torch.autograd.grad(layer(x[i : i + 1]), [layer.weight, layer.bias], delta[i : i + 1])
        explicit.append(sum(g.square().sum() for g in grads))
    rule = fisher_module._conv_ghost_norms if path == "ghost" else fisher_module._conv_weight_norms
    monkeypatch.setattr(fisher_module, "_conv_ghost_norms", rule)
    monkeypatch.setattr(fisher_module, "_conv_weight_norms", rule)
    assert torch.allclose(fisher_module._conv_norms(layer, x, delta.detach()), torch.stack(explicit), rtol=1e-10)


class OffPath(nn.Module):
    """A layer whose output does not depend on the input (a learned bias vector through a Linear)."""

    def __init__(self):
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 4))
        self.const = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x) + self.const(self.seed)


def test_layers_off_the_path_to_the_input_are_still_counted():
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(10))
    _compare(OffPath(), x, "exact")


class PositionParameter(nn.Module):
    """A learned position parameter added in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.position = nn.Parameter(torch.randn(1, 5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x) + self.position).mean(1))


@pytest.mark.parametrize("chunk_size", [32, 2**25])  # whole-model per-sample gradients small, then too large
def test_a_parameter_used_by_the_model_itself(chunk_size, monkeypatch):
    import lightning_startwell.fisher.trace as fisher_module

    x = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(10))
    model = PositionParameter()
    whole_model = []
    vmap_sums = fisher_module._vmap_sums
    monkeypatch.setattr(fisher_module, "_vmap_sums", lambda *a: whole_model.append(True) or vmap_sums(*a))
    reference = naive_fisher(model, x, "exact")
    ours = fisher_trace(model, x, fisher="exact", chunk_size=chunk_size)
    assert ours.per_layer == pytest.approx(reference, rel=1e-5)
    assert bool(whole_model) == (
        chunk_size == 32
    )  # one pass over the whole model when it is cheap, the hooks otherwise


@pytest.fixture
def no_whole_model_vmap(monkeypatch):
    """Fail if the measurement falls back to whole-model per-sample gradients, for all parameters or some."""
    import lightning_startwell.fisher.fallbacks as fallbacks
    import lightning_startwell.fisher.trace as fisher_module

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to whole-model vmap")

    monkeypatch.setattr(fisher_module, "_vmap_sums", refuse)
    monkeypatch.setattr(fallbacks, "_vmap_sums", refuse)


class Tokens(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.head = nn.Linear(6, 4)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_integer_inputs_start_the_backward_at_the_embedding(no_whole_model_vmap, monkeypatch):
    import lightning_startwell.fisher.hooks as fisher_module

    tokens = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(11))
    tokens[0] = 4  # one sample repeats a token: its rows of the table gradient add up
    tokens[1, 1:] = 0  # padding, averaged with the rest: the padding row must get no gradient
    model = Tokens(padding_idx=0)
    monkeypatch.setattr(fisher_module, "_vjp_norms", None)  # the embedding is in closed form: no per-sample vmap
    _compare(model, tokens, "exact")
    differentiated = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        differentiated.append(inputs)
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    fisher_trace(model, tokens, fisher="exact")
    # the backward passes stop at the embedding's output: no weight gradients are computed
    assert not any(w is p for wrt in differentiated for w in wrt for p in model.parameters())
    assert sum(len(wrt) == 1 and wrt[0].shape == (5, 3, 6) for wrt in differentiated) >= 4  # one per class


class LearnedPositions(nn.Module):
    """A position embedding shared by all samples: its output gradient sums over them, so its per-sample norms need
    per-sample gradients (the whole-model fallback), not its output's hook."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.positions = nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.embed(x) + self.positions(torch.arange(x.shape[1]))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("batch", [6, 5])  # 5: as many samples as positions, the shapes cannot tell them apart
def test_a_position_embedding_shared_by_the_samples(batch):
    x = torch.randn(batch, 5, 4, generator=torch.Generator().manual_seed(14))
    ours = _compare(LearnedPositions(), x, "exact")
    assert ours.per_layer["positions"] > 0


def naive_gaussian(model, x, fisher, sigma, targets=None, eps=None):
    """Float64 loop for the Gaussian likelihood N(f(x), sigma^2 I): grad log p(y|x) = J^T (y - f) / sigma^2."""
    model = copy.deepcopy(model).double().eval()
    params = list(model.parameters())
    total = 0.0
    for i in range(len(x)):
        f = model(x[i : i + 1].double()).reshape(-1)
        if fisher == "exact":
            vectors = [torch.eye(len(f), dtype=torch.float64)[k] / sigma for k in range(len(f))]
        elif fisher == "empirical":
            vectors = [(targets[i].double().reshape(-1) - f.detach()) / sigma**2]
        else:
            vectors = [eps[i].double() / sigma]
        for v in vectors:
            grads = torch.autograd.grad(f, params, v, retain_graph=True)
            total += sum(g.square().sum().item() for g in grads)
    return total / len(x)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "true"])
@pytest.mark.parametrize("squeeze", [False, True])
def test_gaussian_likelihood_for_regression(fisher, squeeze):
    torch.manual_seed(0)
    dim = 1 if squeeze else 3
    body = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(), nn.Linear(40, dim))
    model = nn.Sequential(body, nn.Flatten(0)) if squeeze else body
    x = torch.randn(9, 1, 10)
    model = _trained_bn(model, x)
    targets = torch.randn(9, dim).squeeze(1) if squeeze else torch.randn(9, dim)
    ours = fisher_trace(
        model,
        x,
        fisher=fisher,
        likelihood="gaussian",
        noise_std=0.5,
        targets=targets,
        generator=torch.Generator().manual_seed(3),
    )
    eps = torch.randn(9, dim, generator=torch.Generator().manual_seed(3))
    expected = naive_gaussian(model, x, fisher, 0.5, targets=targets, eps=eps)
    assert ours.total == pytest.approx(expected, rel=1e-5)


def test_gaussian_rejects_bad_noise_and_categorical_rejects_one_output():
    with pytest.raises(ValueError, match="noise_std"):
        fisher_trace(MLP(), X_IMG, likelihood="gaussian", noise_std=0.0)
    with pytest.raises(ValueError, match="likelihood"):
        fisher_trace(MLP(), X_IMG, likelihood="poisson")


class HeadFirst(nn.Module):
    """Registers its layers in another order than it calls them, holds a parameter of its own, and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(8)
        self.body = nn.Linear(5, 8)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x * self.scale))))


def test_layer_order_is_the_order_of_the_forward_pass_and_changes_nothing():
    from lightning_startwell.fisher import layer_order

    model = HeadFirst().train()
    statistics = model.norm.running_mean.clone()
    assert layer_order(model, (torch.randn(4, 5),)) == ["", "body", "norm", "head", "unused"]
    assert layer_order(model, {"x": torch.randn(4, 5)}) == ["", "body", "norm", "head", "unused"]
    assert model.training and torch.equal(model.norm.running_mean, statistics)


# Nothing guessed from shapes (issue 19): each model below has a tensor that a shape rule misreads; the measurement
# must equal the float64 loop, through the whole-model path (a small model) and through the hooks with the exact
# path for the parameters they cannot verify (chunk_size=2**25: the whole model's per-sample gradients too large).
BOTH_PATHS = pytest.mark.parametrize("chunk_size", [None, 2**25], ids=["whole model", "hooks and exact path"])


class SharedTable(nn.Module):
    """A Linear applied to a table of N rows shared by every sample, averaged into all of them: its input's first
    dimension equals N but holds no samples. Token ids go through a ``.view`` first (as Hugging Face models do), so no
    module is called with the input itself."""

    def __init__(self, rows):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.register_buffer("table", torch.randn(rows, 4, generator=torch.Generator().manual_seed(20)))
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.embed(tokens.view(-1, tokens.shape[-1])).mean(1) + self.proj(self.table).mean(0)
        return self.head(torch.tanh(h))


@BOTH_PATHS
def test_a_tensor_with_n_rows_that_holds_no_samples(chunk_size):
    tokens = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(21))
    ours = _compare(SharedTable(rows=5), tokens, "exact", chunk_size=chunk_size)
    assert ours.per_layer["proj"] > 0


class DictHead(nn.Module):
    """A head owning parameters (a Linear and a scale of its own) that returns a dict, as Hugging Face heads do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 3))

    def forward(self, h):
        return {"logits": self.lin(h) * self.scale}


class WithDictHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = DictHead()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))["logits"]


@BOTH_PATHS
def test_a_module_returning_a_dict_keeps_its_parameters(chunk_size):
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(22))
    ours = _compare(WithDictHead(), x, "exact", chunk_size=chunk_size)
    assert ours.per_layer["head"] > 0


class DictBatch(nn.Module):
    """The model itself owns a parameter and is called with a dict (one container argument, not tensors)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.offset = nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(23)))
        self.head = nn.Linear(6, 3)

    def forward(self, batch):
        return self.head(torch.tanh(self.embed(batch["x"]) * batch["gain"][:, None] + self.offset))


@BOTH_PATHS
def test_a_parameter_of_the_model_itself_with_a_container_batch(chunk_size):
    g = torch.Generator().manual_seed(24)
    batch = {"x": torch.randn(7, 4, generator=g), "gain": torch.rand(7, generator=g) + 0.5}
    ours = _compare(DictBatch(), (batch,), "exact", chunk_size=chunk_size)
    assert ours.per_layer[""] > 0


class Mix(nn.Module):
    """No closed form (the per-module vmap): its own weight, called with the samples and a (T, D) table of them all."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 6))

    def forward(self, h, positions):
        return torch.tanh(h + positions) * self.weight


class SinusoidalPositions(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.register_buffer("positions", torch.sin(torch.arange(t * 6.0).reshape(t, 6)))
        self.mix = Mix()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.mix(self.embed(x), self.positions).mean(1))


@pytest.mark.parametrize("batch", [5, 4])  # 5: as many samples as positions
def test_a_shared_argument_is_not_split_by_sample(batch, no_whole_model_vmap):
    x = torch.randn(batch, 5, 4, generator=torch.Generator().manual_seed(25))
    ours = _compare(SinusoidalPositions(5), x, "exact")  # the table passed whole: the per-module vmap, no other path
    assert ours.per_layer["mix"] > 0


class GPT2Positions(nn.Module):
    """Token ids through ``.view`` (no module is called with the input itself) plus a position embedding of
    ``arange(T)[None]``, Hugging Face's GPT-2 layout: the position embedding's input does not depend on the batch."""

    def __init__(self, sparse=False):
        super().__init__()
        self.tokens = nn.Embedding(11, 6, sparse=sparse)
        self.positions = nn.Embedding(5, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        ids = ids.view(-1, ids.shape[-1])
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1])[None])
        return self.head(self.norm(torch.tanh(h)).mean(1))


@BOTH_PATHS
@pytest.mark.parametrize(("batch", "fisher"), [(6, "exact"), (5, "exact"), (6, "true")])  # true: the hooks and the
def test_a_module_whose_input_does_not_depend_on_the_batch(batch, fisher, chunk_size):  # exact path share the draws
    ids = torch.randint(0, 11, (batch, 5), generator=torch.Generator().manual_seed(26))
    ours = _compare(GPT2Positions(), ids, fisher, chunk_size=chunk_size)
    assert ours.per_layer["positions"] > 0


@BOTH_PATHS
def test_a_layer_called_twice_and_a_tied_weight_take_the_exact_path(chunk_size):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
    _compare(Tied(), x, "exact", chunk_size=chunk_size)


@pytest.mark.parametrize("method", ["vmap", "auto"])
@BOTH_PATHS
def test_sparse_embeddings(method, chunk_size):
    ids = torch.randint(0, 11, (5, 5), generator=torch.Generator().manual_seed(27))
    model = GPT2Positions(sparse=True)
    _compare(model, ids, "exact", method=method, chunk_size=chunk_size)
    assert model.tokens.sparse


def test_ordinary_layers_keep_their_closed_forms(no_whole_model_vmap, monkeypatch):
    """CNNs with BatchNorm, MLPs, Transformer layers, token embeddings: no per-sample vmap of any kind."""
    import lightning_startwell.fisher.hooks as fisher_module

    monkeypatch.setattr(fisher_module, "_vjp_norms", None)
    _compare(_trained_bn(ResNet(num_blocks=1, width=4), X_IMG), X_IMG, "empirical", Y)
    torchvision = pytest.importorskip("torchvision")  # in-place ReLU and ``out += identity`` after hooked layers
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    _compare(_trained_bn(torchvision.models.resnet18(num_classes=5), x), x, "empirical", Y[:4] % 5)
    _compare(MLP(depth=2, width=8), X_IMG, "exact")
    tokens = torch.randint(1, 9, (6, 5), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        model = Attention()
    monkeypatch.setattr(fisher_module, "_vjp_norms", None)
    _compare(model, torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(5)), "exact")
    _compare(Tokens(padding_idx=0), tokens, "exact")


def test_lstm_per_module_path_equals_whole_model_vmap_and_a_float64_loop():
    # The hooks' per-module vector-Jacobian product of an nn.LSTM failed on CPU in oneDNN's backward ("workspace").
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(12, 6)
            self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.lstm(self.embed(ids))[0][:, -1])

    net, ids = Net().eval(), torch.randint(0, 12, (5, 7))
    auto = fisher_trace(net, ids, fisher="exact")
    whole = fisher_trace(net, ids, fisher="exact", method="vmap")
    net64 = copy.deepcopy(net).double()
    total = 0.0
    for i in range(5):  # exact Fisher: sum over classes of p_c ||grad log p_c||^2, one backward per class
        log_p = torch.log_softmax(net64(ids[i : i + 1]), dim=-1)[0]
        for c in range(3):
            grads = torch.autograd.grad(log_p[c], list(net64.parameters()), retain_graph=True, allow_unused=True)
            total += log_p[c].exp().item() * sum(float(g.pow(2).sum()) for g in grads if g is not None)
    assert auto.total == pytest.approx(total / 5, rel=1e-5) and whole.total == pytest.approx(total / 5, rel=1e-5)
