"""The provenance verdict kept between measurements (lightning_startwell.fisher.provenance.cached_provenance): the same
numbers as computed afresh, the three runs skipped on a reuse, and a new verdict wherever the key changes."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from test_fisher import Attention
from torch import nn

from lightning_startwell.fisher import fisher_trace, provenance


@pytest.fixture(autouse=True)
def _fresh_cache():
    torch.manual_seed(0)
    provenance._CACHE.clear()
    provenance._UNSTABLE.clear()
    yield
    provenance._CACHE.clear()
    provenance._UNSTABLE.clear()


@pytest.fixture
def runs(monkeypatch):
    """How many times the three provenance runs were made."""
    calls = []
    original = provenance.sample_provenance

    def spy(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(provenance, "sample_provenance", spy)
    return calls


def _measure(model, x, **kwargs):
    return fisher_trace(model, x, fisher="true", generator=torch.Generator().manual_seed(1), **kwargs)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def _uncached(model, x, **kwargs):
    provenance._CACHE.clear()
    try:
        return _measure(model, x, **kwargs)
    finally:
        provenance._CACHE.clear()


def test_gpt2_cached_verdict_gives_the_same_numbers_and_skips_the_runs(runs):
    model = _gpt2()
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids}
    fresh = _uncached(model, x)
    assert len(runs) == 1
    first, second, third = (_measure(model, x) for _ in range(3))
    assert len(runs) == 2  # computed once, reused twice
    assert first == second == third == fresh  # bit for bit, every layer
    assert fresh.per_layer and fresh.total > 0


def test_transformer_encoder_cached_verdict_gives_the_same_numbers(runs):
    model = Attention().eval()
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(3))
    fresh = _uncached(model, x)
    cached = [_measure(model, x) for _ in range(3)]
    assert len(runs) == 2
    assert all(c == fresh for c in cached)
    # another batch of the same layout reuses the verdict, and equals its own fresh measurement
    y = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(4))
    reused = _measure(model, y)
    assert len(runs) == 2
    assert reused == _uncached(model, y)


def test_a_new_shape_beyond_the_samples_is_a_new_verdict(runs):
    model = Attention().eval()
    _measure(model, torch.randn(6, 5, 4))
    _measure(model, torch.randn(6, 5, 4))
    assert len(runs) == 1
    _measure(model, torch.randn(6, 7, 4))  # another sequence length
    assert len(runs) == 2
    assert runs[-1].shape == (2, 7, 4)
    _measure(model, torch.randn(3, 7, 4))  # another number of samples alone: the same verdict
    assert len(runs) == 2


def test_gpt2_new_sequence_length_recomputes(runs):
    model = _gpt2()
    _measure(model, {"input_ids": torch.randint(0, 100, (3, 10))})
    _measure(model, {"input_ids": torch.randint(0, 100, (3, 10))})
    assert len(runs) == 1
    x = {"input_ids": torch.randint(0, 100, (3, 16))}
    assert _measure(model, x) == _uncached(model, x)
    assert len(runs) == 3


def test_a_replaced_module_a_new_hook_and_a_new_model_are_new_verdicts(runs):
    model = Attention().eval()
    x = torch.randn(6, 5, 4)
    _measure(model, x)
    model.norm = nn.Identity()  # structure change
    _measure(model, x)
    assert len(runs) == 2
    handle = model.embed.register_forward_hook(lambda m, args, out: out * 2)
    _measure(model, x)
    assert len(runs) == 3
    handle.remove()
    _measure(model, x)  # back to the earlier key
    assert len(runs) == 3
    other = Attention().eval()
    _measure(other, x)
    assert len(runs) == 4
    model.encoder.train()  # another mode of a submodule (a measurement puts it back)
    assert model.encoder.training
    _measure(model, x)
    assert len(runs) == 4  # measured in eval mode: the same key
    model.head.weight.requires_grad_(False)  # another set of trainable parameters
    _measure(model, x)
    assert len(runs) == 5


class KeepsDropout(nn.Module):
    """A submodule that stays in training mode in eval (its ``train`` ignores the flag) changes the key."""

    def __init__(self, mode: bool):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.mode = mode

    def train(self, mode: bool = True):
        return super().train(self.mode)

    def forward(self, x):
        return self.lin(x)


def test_training_flags_seen_in_measurement_are_in_the_key(runs):
    model = nn.Sequential(nn.Linear(4, 4), KeepsDropout(False))
    x = torch.randn(5, 4)
    _measure(model, x)
    _measure(model, x)
    assert len(runs) == 1
    model[1].mode = True
    _measure(model, x)
    assert len(runs) == 2


def test_the_cache_dies_with_the_model():
    model = Attention().eval()
    _measure(model, torch.randn(4, 5, 4))
    assert len(provenance._CACHE) == 1
    del model
    gc.collect()
    assert len(provenance._CACHE) == 0


def test_a_bound_method_forward_does_not_keep_the_model_alive(runs):
    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Attention()

        def startwell_forward(self, batch):
            return self.net(batch)

    module = Module().eval()
    x = torch.randn(4, 5, 4)
    _measure(module, x, forward=module.startwell_forward)
    _measure(module, x, forward=module.startwell_forward)  # a new bound method object, the same method
    assert len(runs) == 1
    del module
    gc.collect()
    assert len(provenance._CACHE) == 0


def test_two_equal_samples_are_not_cached(runs):
    model = Attention().eval()
    x = torch.randn(1, 5, 4).repeat(4, 1, 1)
    _measure(model, x)
    _measure(model, x)
    _measure(model, x[:1])
    _measure(model, x[:1])
    assert len(runs) == 4


class Mixing(nn.Module):
    """Mixes the samples when ``mix`` is set: a routing that follows something outside the key (as values would)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.mix = False

    def forward(self, x):
        h = self.lin(x)
        if self.mix:
            h = h + h.mean(0, keepdim=True)
        return self.head(h)


def test_a_changed_verdict_is_caught_by_the_recheck_and_stops_the_reuse(runs, monkeypatch):
    monkeypatch.setattr(provenance, "RECHECK_EVERY", 2)
    model = Mixing().eval()
    x = torch.randn(5, 4)
    _measure(model, x)
    model.mix = True
    _measure(model, x)
    _measure(model, x)  # two reuses of the stale verdict (what RECHECK_EVERY bounds)
    assert len(runs) == 1
    with pytest.warns(UserWarning, match="checked on every measurement"):
        rechecked = _measure(model, x)
    assert len(runs) == 2
    assert rechecked == _uncached(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model
        _measure(model, x)
        _measure(model, x)
    assert len(runs) == 5  # the uncached measurement above, and every measurement since
    model.mix = False
    _measure(model, torch.randn(5, 4))  # the model is no longer cached, whatever the key
    assert len(runs) == 6 and not provenance._CACHE
