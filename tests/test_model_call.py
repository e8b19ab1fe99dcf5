"""One way for a batch to become a model call: tuple and dict inputs, `.logits` outputs, a `forward` function, masks
split by sample in every Fisher path; against float64 loops that run one unpadded sample at a time."""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import types

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, default_collate

import lightning_startwell.fisher.hooks as fisher_hooks
from lightning_startwell.callbacks import (
    DeficitInjector,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
)
from lightning_startwell.callbacks._common import batch_tensor, replace_tensor
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.init import forward_variances, init_weights
from lightning_startwell.model_call import call_arguments, num_samples, run, select


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


# --- Batches as namedtuples, dataclasses and Hugging Face BatchEncodings ---

Pair = collections.namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Example:
    x: torch.Tensor
    y: torch.Tensor


CONTAINERS = ["tuple", "namedtuple", "dataclass", "batch_encoding"]
N_ITEMS, N_CLASSES = 24, 3
X = torch.randn(N_ITEMS, 1, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, N_CLASSES, (N_ITEMS,), generator=torch.Generator().manual_seed(2))


def keys(container):
    """``(input_key, target_key)``: indices of a tuple, field or key names otherwise."""
    return (0, 1) if container == "tuple" else ("x", "y")


def unpack(batch):
    """``(x, y)`` of any of the containers, read without the library's helpers."""
    if isinstance(batch, transformers.BatchEncoding):
        return batch["x"], batch["y"]
    if isinstance(batch, Example):
        return batch.x, batch.y
    return batch[0], batch[1]


def container_loader(container, batch_size=8):
    """The same items in the same order, collated into ``container`` batches ("tuple": a list, as default collation
    gives)."""
    if container == "tuple":
        return DataLoader(list(zip(X, Y, strict=True)), batch_size=batch_size)
    if container == "namedtuple":
        return DataLoader([Pair(x, y) for x, y in zip(X, Y, strict=True)], batch_size=batch_size)
    if container == "dataclass":
        def collate(items):
            return Example(torch.stack([i.x for i in items]), torch.stack([i.y for i in items]))

        return DataLoader([Example(x, y) for x, y in zip(X, Y, strict=True)], batch_size=batch_size, collate_fn=collate)

    def collate(items):
        return transformers.BatchEncoding(default_collate(items))

    return DataLoader([{"x": x, "y": y} for x, y in zip(X, Y, strict=True)], batch_size=batch_size, collate_fn=collate)


class ContainerModule(pl.LightningModule):
    """A small MLP on signals ``(N, 1, 8)``; ``training_step`` records the type and the tensors of its batches."""

    def __init__(self, lr=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, N_CLASSES))
        self.lr = lr
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = unpack(batch)
        self.seen.append((type(batch), x.detach().clone(), y.clone()))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class BatchForwardModule(ContainerModule):
    """The same model called through ``startwell_forward`` on the whole batch, which must keep its type."""

    def startwell_forward(self, batch):
        assert isinstance(batch, self.batch_type), type(batch)
        return self.net(unpack(batch)[0])


class Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def values(self, tag):
        return [(step, m[tag]) for step, m in self.records if tag in m]


def fit(container, callback, tmp_path, module_class=ContainerModule, max_steps=2, lr=0.1):
    pl.seed_everything(0)
    module = module_class(lr=lr)
    module.batch_type = {"tuple": list, "namedtuple": Pair, "dataclass": Example,
                         "batch_encoding": transformers.BatchEncoding}[container]
    recorder = Recorder()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=max_steps, logger=recorder,
        callbacks=callback if isinstance(callback, list) else [callback], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, container_loader(container))
    return module, recorder


def test_the_helpers_keep_the_container_type_and_read_fields_by_name():
    x, y = X[:4], Y[:4]
    for batch in (Pair(x, y), Example(x, y), transformers.BatchEncoding({"x": x, "y": y})):
        half = select(batch, slice(0, 2))
        assert type(half) is type(batch) and torch.equal(unpack(half)[0], x[:2]) and torch.equal(unpack(half)[1], y[:2])
        assert num_samples(batch) == 4
        assert batch_tensor(batch, "x") is x and batch_tensor(batch, "y", "target_key") is y
        new = replace_tensor(batch, "x", -x)
        assert type(new) is type(batch) and torch.equal(unpack(new)[0], -x) and unpack(batch)[0] is x  # a copy
    assert batch_tensor(Pair(x, y), 1) is y  # integers still index (named)tuples
    assert torch.equal(replace_tensor(Pair(x, y), 0, -x).x, -x)
    assert call_arguments(Pair(x, y)) == ((x, y), {})
    assert call_arguments(Example(x, y)) == ((), {"x": x, "y": y})
    for batch, accepted in ((Pair(x, y), r"field name, one of \['x', 'y'\]"), (Example(x, y), r"one of \['x', 'y'\]"),
                            (transformers.BatchEncoding({"x": x}), r"key, one of \['x'\]")):
        with pytest.raises(ValueError, match=r"`target_key`='z' does not name a tensor .*" + accepted):
            batch_tensor(batch, "z", "target_key")


@pytest.mark.parametrize("container", CONTAINERS[1:])
@pytest.mark.parametrize("call", ["input_key", "startwell_forward"])
def test_fisher_monitor_reads_every_container(container, call, tmp_path):
    def trace(container, module_class):
        input_key, target_key = keys(container)
        monitor = FisherTraceMonitor(num_samples=16, batch_size=8, every_n_steps=1, input_key=input_key,
                                     target_key=target_key, fisher="empirical", log_images=False)
        _, recorder = fit(container, monitor, tmp_path, module_class)
        return recorder.values("startwell/fisher/trace")

    module_class = ContainerModule if call == "input_key" else BatchForwardModule
    ours, reference = trace(container, module_class), trace("tuple", module_class)
    assert [step for step, _ in ours] == [0, 1, 2]
    assert all(math.isfinite(v) and v > 0 for _, v in ours)
    assert [v for _, v in ours] == pytest.approx([v for _, v in reference], rel=1e-6)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("deficit", ["vertical_flip", "label_permutation"])
def test_deficit_reaches_training_step_in_every_container(container, deficit, tmp_path):
    input_key, target_key = keys(container)
    injector = DeficitInjector(deficit, 0, 1, num_classes=N_CLASSES, seed=3, input_key=input_key,
                               target_key=target_key, log_images=False)
    module, _ = fit(container, injector, tmp_path, max_steps=1)
    ((batch_type, x, y),) = module.seen
    assert batch_type is module.batch_type
    permutation = torch.randperm(N_CLASSES, generator=torch.Generator().manual_seed(3))
    if deficit == "vertical_flip":  # a signal mirrored about zero, the labels as they were
        assert torch.equal(x, -X[:8]) and torch.equal(y, Y[:8])
    else:
        assert torch.equal(x, X[:8]) and torch.equal(y, permutation[Y[:8]])


@pytest.mark.parametrize("container", CONTAINERS[1:])
def test_gradient_dynamics_reads_every_container(container, tmp_path):
    def directions(container):
        input_key, target_key = keys(container)
        monitor = GradientDynamicsMonitor(num_batches=3, batch_size=8, every_n_steps=1, input_key=input_key,
                                          target_key=target_key)
        _, recorder = fit(container, monitor, tmp_path)
        return [v for tag in ("direction_variance", "direction_error")
                for _, v in recorder.values("startwell/dynamics/" + tag)]

    ours, reference = directions(container), directions("tuple")
    assert len(ours) == 4 and all(math.isfinite(v) and v > 0 for v in ours)
    assert ours == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("container", CONTAINERS[1:])
def test_lsuv_reads_every_container(container, tmp_path):
    def weights(container):
        input_key, _ = keys(container)
        module, _ = fit(container, InitScheme("lsuv", seed=0, input_key=input_key, log_images=False), tmp_path,
                        max_steps=1, lr=0.0)
        return [p.detach().clone() for p in module.net.parameters()], module

    (ours, module), (reference, _) = weights(container), weights("tuple")
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # LSUV's aim, on its batch (the first one): unit output variance of every Linear
        z1 = module.net[1](X[:8].flatten(1))
        z2 = module.net[3](z1.relu())
    assert z1.var().item() == pytest.approx(1.0, abs=0.1) and z2.var().item() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("container", CONTAINERS[1:])
def test_signal_propagation_trains_on_every_container(container, tmp_path):
    def forward_variances(container):
        _, recorder = fit(container, SignalPropagationMonitor(every_n_steps=1, log_images=False), tmp_path)
        return [v for _, v in recorder.values("startwell/signal/forward/net.1")]

    ours, reference = forward_variances(container), forward_variances("tuple")
    assert len(ours) == 2 and ours == pytest.approx(reference, rel=1e-6)
    with torch.no_grad():  # the first step's forward variance, on the first batch at the initialisation
        pl.seed_everything(0)
        first = ContainerModule().net[1](X[:8].flatten(1))
    assert ours[0] == pytest.approx(first.var().item(), rel=1e-4)  # over all its entries, unbiased


@pytest.mark.parametrize("container", CONTAINERS[1:])
def test_fisher_training_probe_keeps_the_container_through_the_deficit(container, tmp_path):
    def trace(container):
        input_key, target_key = keys(container)
        injector = DeficitInjector("vertical_flip", 0, 1, input_key=input_key, log_images=False)
        monitor = FisherTraceMonitor(num_samples=16, batch_size=8, every_n_steps=1, input_key=input_key,
                                     target_key=target_key, probe="training", log_images=False)
        _, recorder = fit(container, [injector, monitor], tmp_path, BatchForwardModule)
        return [v for _, v in recorder.values("startwell/fisher/trace")]

    ours, reference = trace(container), trace("tuple")
    assert len(ours) == 3 and all(math.isfinite(v) and v > 0 for v in ours)
    assert ours == pytest.approx(reference, rel=1e-6)
