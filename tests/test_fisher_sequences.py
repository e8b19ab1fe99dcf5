"""fisher_trace on sequence outputs (N, T, C): one categorical likelihood per position, the sample's log-likelihood the
sum over its positions; padding (a mask) and targets of -100 left out. Against float64 loops that run one unpadded
sample at a time, in every path (closed forms, per-module fallback, whole-model vmap), and, for ``exact``, against
the expectation over every label sequence enumerated."""

from __future__ import annotations

import copy
import itertools

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer, read_scalars
from torch import nn
from torch.utils.data import DataLoader

import lightning_startwell.fisher.hooks as fisher_hooks
from lightning_startwell.callbacks import FisherTraceMonitor
from lightning_startwell.fisher import fisher_trace

VOCAB = 4


class TinyCausalLM(nn.Module):
    """Token ids (and an optional padding mask) to next-token logits (N, T, V): embedding, causal self-attention,
    LayerNorm, a linear head. With right padding, a real position never sees a padded one."""

    def __init__(self, vocab: int = VOCAB, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=input_ids.device), 1)
        h = self.embed(input_ids)
        padding = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        return self.head(self.norm(h + a))


def right_padded(n: int = 5, t: int = 4, seed: int = 0):
    """Token ids padded on the right with 0, their mask, and next-token targets (-100 at the last real position and
    on padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, t), generator=g) * mask
    targets = torch.full((n, t), -100)
    targets[:, :-1] = ids[:, 1:]
    targets[mask.roll(-1, 1) == 0] = -100
    return ids, mask, targets


def per_position_loop(model, ids, mask, fisher, labels=None, logits=lambda model, ids: model(ids)):
    """Float64 per-sample trace, each sample cut to its real tokens and run alone (``logits(model, ids)``: (1, T, V)).
    ``exact``: sum over positions t and classes c of p_tc ||grad log p_tc||^2; otherwise one backward of
    sum_t log p(y_t) over the kept positions."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    per_layer = {n.rpartition(".")[0]: 0.0 for n in params}

    def add(objective, weight=1.0):
        grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True)
        for name, g in zip(params, grads, strict=True):
            per_layer[name.rpartition(".")[0]] += weight * g.square().sum().item()

    for i in range(len(ids)):
        length = int(mask[i].sum())
        log_probs = logits(model, ids[i : i + 1, :length]).log_softmax(-1)[0]  # (length, V)
        if fisher == "exact":
            for t, c in itertools.product(range(length), range(log_probs.shape[1])):
                add(log_probs[t, c], log_probs[t, c].exp().item())
        else:
            kept = [t for t in range(length) if labels[i, t] != -100]
            if kept:
                add(sum(log_probs[t, labels[i, t]] for t in kept))
    return {k: v / len(ids) for k, v in per_layer.items()}


def model_draws(model, inputs, seed=0, logits=lambda model, ids: model(ids)):
    """The labels fisher_trace draws for ``true``: one multinomial per position, in row-major order, from ``seed``."""
    with torch.no_grad():
        probs = logits(model.eval(), inputs).float().softmax(-1)
    n, t, v = probs.shape
    return torch.multinomial(probs.reshape(n * t, v), 1, generator=torch.Generator().manual_seed(seed)).reshape(n, t)


def assert_equal_traces(ours, reference, rel=1e-5):
    for name, value in reference.items():
        assert ours.per_layer.get(name, 0.0) == pytest.approx(value, rel=rel, abs=1e-12), name
    assert ours.total == pytest.approx(sum(reference.values()), rel=rel)
    assert sum(ours.per_layer.values()) == pytest.approx(ours.total, rel=1e-12)


@pytest.fixture
def per_module_fallback(monkeypatch):
    """No closed form and no attention rule: every layer through the per-module vmap of its recorded inputs."""
    monkeypatch.setattr(fisher_hooks, "_closed_form", lambda layer: None)
    monkeypatch.setattr(fisher_hooks, "_plain_attention", lambda layer: False)


@pytest.fixture(params=["auto", "per_module", "vmap"])
def path(request):
    if request.param == "per_module":
        request.getfixturevalue("per_module_fallback")
    return "vmap" if request.param == "vmap" else "auto"


@pytest.mark.parametrize("fisher", ["true", "empirical", "exact"])
@pytest.mark.parametrize("inputs", ["ids", "ids and mask"])
def test_padded_positions_are_left_out(path, fisher, inputs):
    torch.manual_seed(0)
    model = TinyCausalLM()
    ids, mask, targets = right_padded()
    x = ids if inputs == "ids" else {"input_ids": ids, "attention_mask": mask}
    ours = fisher_trace(model, x, fisher=fisher, targets=targets, mask=mask, method=path,
                        generator=torch.Generator().manual_seed(0), chunk_size=3)
    if fisher == "true":
        labels = model_draws(model, ids).masked_fill(mask == 0, -100)
    else:
        labels = targets
    assert_equal_traces(ours, per_position_loop(model, ids, mask, fisher, labels))
    assert ours.num_samples == len(ids)


def test_targets_of_minus_100_alone_leave_positions_out_of_the_empirical_fisher():
    torch.manual_seed(1)
    model = TinyCausalLM()
    ids, mask, targets = right_padded(seed=1)
    ours = fisher_trace(model, ids, fisher="empirical", targets=targets, batch_size=3)  # no mask
    assert_equal_traces(ours, per_position_loop(model, ids, mask, "empirical", targets))


def test_exact_is_the_expectation_over_every_label_sequence():
    """E_y ||grad sum_t log p(y_t)||^2 by enumerating all V^T label sequences of each (unpadded) sample: the
    definition, with the cross terms between positions that the per-position passes leave out."""
    torch.manual_seed(2)
    model = TinyCausalLM(vocab=3)
    ids = torch.randint(0, 3, (3, 3), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    reference = copy.deepcopy(model).double().eval()
    params = list(reference.parameters())
    total = 0.0
    for i in range(len(ids)):
        length = int(mask[i].sum())
        log_probs = reference(ids[i : i + 1, :length]).log_softmax(-1)[0]
        for labels in itertools.product(range(3), repeat=length):
            log_p = sum(log_probs[t, c] for t, c in enumerate(labels))
            grads = torch.autograd.grad(log_p, params, retain_graph=True)
            total += log_p.exp().item() * sum(g.square().sum().item() for g in grads)
    ours = fisher_trace(model, ids, fisher="exact", mask=mask)
    assert ours.total == pytest.approx(total / len(ids), rel=1e-5)


@pytest.mark.parametrize("fisher", ["exact", "empirical", "true"])
def test_gaussian_outputs_per_position_with_a_mask(fisher):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))  # (N, T, 2) -> (N, T, 3)
    x = torch.randn(6, 4, 2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    targets = torch.randn(6, 4, 3)
    ours = fisher_trace(model, x, fisher=fisher, targets=targets, mask=mask, likelihood="gaussian", noise_std=0.5,
                        generator=torch.Generator().manual_seed(3))
    eps = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(model).double()
    params = list(reference.parameters())
    total = 0.0
    for i in range(len(x)):
        f = reference(x[i].double())  # (T, 3)
        if fisher == "exact":  # one unit vector per kept position and output dimension, over the noise's std
            units = torch.eye(12, dtype=torch.float64).reshape(12, 4, 3) / 0.5
            vectors = [u for u in units if (u.abs().sum(1) * mask[i]).sum() > 0]
        else:
            v = (targets[i].double() - f.detach()) / 0.25 if fisher == "empirical" else eps[i].double() / 0.5
            vectors = [v * mask[i, :, None]]
        for v in vectors:
            total += sum(g.square().sum().item() for g in torch.autograd.grad(f, params, v, retain_graph=True))
    assert ours.total == pytest.approx(total / len(x), rel=1e-5)


def test_bad_masks_and_targets_are_named():
    model = TinyCausalLM()
    ids, mask, targets = right_padded()
    with pytest.raises(ValueError, match="mask"):
        fisher_trace(model, ids, mask=mask[:3])
    with pytest.raises(ValueError, match="mask"):
        fisher_trace(model, ids, mask=mask[:, :2])
    with pytest.raises(ValueError, match="mask"):
        fisher_trace(nn.Linear(4, 3), torch.randn(7, 4), mask=mask)  # one position per sample: nothing to mask
    with pytest.raises(ValueError, match="targets"):
        fisher_trace(model, ids, fisher="empirical", targets=targets[:, :2])


class CausalLMModule(pl.LightningModule):
    """A LightningModule on dict batches {input_ids, attention_mask, labels}, the labels shifted as the logits are."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = TinyCausalLM()

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def token_items(n=8):
    ids, mask, targets = right_padded(n=n)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": targets[i]} for i in range(n)]


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_monitor_leaves_padding_out_with_mask_key(tmp_path, fisher):
    torch.manual_seed(4)
    module = CausalLMModule()
    initial = copy.deepcopy(module.lm)
    items = token_items()
    monitor = FisherTraceMonitor(num_samples=6, every_n_steps=100, fisher=fisher, target_key="labels",
                                 input_key=["input_ids", "attention_mask"], mask_key="attention_mask")
    make_trainer(tmp_path, [monitor], max_steps=2).fit(module, DataLoader(items, batch_size=4))
    chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:6]
    probe = {k: torch.stack([items[int(i)][k] for i in chosen]) for k in items[0]}
    reference = per_position_loop(initial, probe["input_ids"], probe["attention_mask"], fisher, probe["labels"])
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/fisher/trace"]
    assert logged[0] == (0, pytest.approx(sum(reference.values()), rel=1e-5))


def test_monitor_warns_once_when_an_attention_mask_is_not_used(tmp_path):
    monitor = FisherTraceMonitor(num_samples=4, every_n_steps=100, input_key=["input_ids", "attention_mask"])
    with pytest.warns(UserWarning, match="mask_key") as record:
        make_trainer(tmp_path, [monitor], max_steps=1).fit(CausalLMModule(), DataLoader(token_items(), batch_size=4))
    assert sum("mask_key" in str(w.message) for w in record) == 1
    with pytest.raises(ValueError, match="mask_key"):
        FisherTraceMonitor(mask_key=["attention_mask"])
