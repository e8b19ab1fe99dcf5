"""One way for a batch to become a model call: tuple and dict inputs, `.logits` outputs, a `forward` function, masks
split by sample in every Fisher path; against float64 loops that run one unpadded sample at a time."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import lightning_startwell.fisher.hooks as fisher_hooks
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.init import forward_variances, init_weights
from lightning_startwell.model_call import num_samples, run, select


class MaskedTextClassifier(nn.Module):
    """Token ids and a padding mask: embedding, self-attention that ignores padding, mean over the real tokens."""

    def __init__(self, output: str = "dict") -> None:
        super().__init__()
        self.output = output
        self.embed = nn.Embedding(30, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        a, _ = self.attn(h, h, h, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(h + a)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1))
        if self.output == "dict":
            return {"logits": logits, "hidden": h}
        if self.output == "object":
            return types.SimpleNamespace(logits=logits, loss=None)
        return logits


def padded_batch(n: int = 10, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.randint(1, 30, (n, t), generator=g) * mask  # padding token 0
    return ids, mask, torch.randint(0, 3, (n,), generator=g)


def unpadded_loop(model, ids, mask, fisher, labels=None):
    """Float64 per-sample trace, each sample cut to its real tokens and run alone (no padding, an all-ones mask)."""
    model = copy.deepcopy(model).double().eval()
    model.output = "tensor"
    params = {n: p for n, p in model.named_parameters()}
    per_layer = {n.rpartition(".")[0]: 0.0 for n in params}
    for i in range(len(ids)):
        length = int(mask[i].sum())
        log_probs = model(ids[i : i + 1, :length], mask[i : i + 1, :length]).log_softmax(-1)[0]
        pairs = [(c, log_probs[c].exp().item()) for c in range(3)] if fisher == "exact" else [(int(labels[i]), 1.0)]
        for c, weight in pairs:
            grads = torch.autograd.grad(log_probs[c], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads, strict=True):
                per_layer[name.rpartition(".")[0]] += weight * g.square().sum().item()
    return {k: v / len(ids) for k, v in per_layer.items()}


def _assert_equal_traces(ours, reference):
    for name, value in reference.items():
        assert ours.per_layer.get(name, 0.0) == pytest.approx(value, rel=1e-5, abs=1e-12), name
    assert ours.total == pytest.approx(sum(reference.values()), rel=1e-5)


@pytest.fixture
def per_module_fallback(monkeypatch):
    """No closed form and no attention rule: every layer through the per-module vmap of its recorded inputs."""
    monkeypatch.setattr(fisher_hooks, "_closed_form", lambda layer: None)
    monkeypatch.setattr(fisher_hooks, "_plain_attention", lambda layer: False)


@pytest.mark.parametrize("path", ["auto", "per_module", "vmap"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_dict_inputs_with_a_padding_mask_equal_the_unpadded_loop(path, fisher, request):
    torch.manual_seed(0)
    if path == "per_module":
        request.getfixturevalue("per_module_fallback")
    model = MaskedTextClassifier("dict")
    ids, mask, labels = padded_batch()
    ours = fisher_trace(
        model, {"input_ids": ids, "attention_mask": mask}, fisher=fisher, targets=labels,
        method="vmap" if path == "vmap" else "auto", batch_size=4, chunk_size=3,
    )
    _assert_equal_traces(ours, unpadded_loop(model, ids, mask, fisher, labels))
    assert ours.num_samples == len(ids)


@pytest.mark.parametrize("output", ["object", "tensor"])
def test_tuple_inputs_are_positional_and_logits_are_read_through(output):
    torch.manual_seed(1)
    model = MaskedTextClassifier(output)
    ids, mask, _ = padded_batch(seed=1)
    ours = fisher_trace(model, (ids, mask), fisher="exact")
    _assert_equal_traces(ours, unpadded_loop(model, ids, mask, "exact"))


def test_a_forward_function_gets_the_batch_whole():
    torch.manual_seed(2)
    model = MaskedTextClassifier("dict")
    ids, mask, labels = padded_batch(seed=2)
    batch = {"ids": ids, "mask": mask, "labels": labels}
    seen = []

    def forward(b):
        seen.append(sorted(b))
        return model.forward(b["ids"], b["mask"])

    ours = fisher_trace(model, batch, fisher="exact", forward=forward)
    assert seen and all(keys == ["ids", "labels", "mask"] for keys in seen)
    _assert_equal_traces(ours, unpadded_loop(model, ids, mask, "exact"))


def test_forward_variances_and_lsuv_take_dict_inputs():
    torch.manual_seed(3)
    model = MaskedTextClassifier("dict")
    ids, mask, _ = padded_batch(n=32, seed=3)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        h = model.embed(ids)
        a, _ = model.attn(h, h, h, key_padding_mask=mask == 0, need_weights=False)
        pooled = (model.norm(h + a) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        expected = model.head(pooled).double().var().item()
    assert forward_variances(model, inputs, {"head": model.head})["head"] == pytest.approx(expected, rel=1e-6)
    report = init_weights(model, "lsuv", lsuv_inputs=inputs, lsuv_tol=0.01, include=["head"])
    assert report[0].output_var == pytest.approx(1.0, abs=0.01)
    with torch.no_grad():
        assert run(model, inputs).double().var().item() == pytest.approx(report[0].output_var, rel=1e-6)


def test_inputs_must_hold_the_samples_along_dim_0():
    assert num_samples((torch.zeros(4, 2), {"m": torch.zeros(4)})) == 4
    assert select({"a": torch.arange(6).reshape(3, 2), "n": "text"}, slice(1, 2))["a"].tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="inputs"):
        num_samples({"ids": torch.zeros(4, 3), "mask": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="inputs"):
        fisher_trace(nn.Linear(2, 2), (torch.zeros(3, 2), torch.zeros(2)))
