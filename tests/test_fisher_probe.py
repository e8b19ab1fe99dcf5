"""The probes of FisherTraceMonitor and GradientDynamicsMonitor: what a training batch goes through (precision, transfer
hooks), on forked random streams (training is bit-identical with and without a monitor); a routed
``startwell_forward``; the bounded heatmap history; per-pixel (segmentation) likelihoods. Numbers against float64
per-sample loops."""

from __future__ import annotations

import copy
import itertools
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer, read_scalars
from test_fisher import naive_fisher
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_startwell.callbacks.fisher_monitor as fisher_monitor
import lightning_startwell.fisher.hooks as fisher_hooks
from lightning_startwell.callbacks import FisherTraceMonitor, GradientDynamicsMonitor
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import MLP, ConvNet

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 1, 8, 8, generator=G), torch.randint(0, 10, (64,), generator=G)


def _chosen(num_samples, size=64, seed=0):
    """The items FisherTraceMonitor draws: the first ``num_samples`` of a permutation seeded with ``seed``."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num_samples]


# --- 1. the probe goes through the precision plugin and the batch-transfer hooks, in Lightning's order ---------------


class HookedConvNet(ConvNet):
    """Batches come as dicts; ``on_before_batch_transfer`` scales the images by 2 and makes the (x, y) tuple the model
    is written for, ``on_after_batch_transfer`` adds 1 (on-device normalisation): the model sees 2x + 1."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch["image"] * 2, batch["label"]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x + 1, y


class ScaledConvNet(HookedConvNet):
    """The same on (x, y) tuples: ``on_before_batch_transfer`` scales the images by 2."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 2, y


def dict_items():
    return [{"image": X[i], "label": Y[i]} for i in range(len(X))]


@pytest.mark.parametrize("layout", ["dict", "tuple"])
def test_fisher_probe_goes_through_both_transfer_hooks_in_order(tmp_path, layout):
    torch.manual_seed(0)
    model = HookedConvNet(channels=[4, 8]) if layout == "dict" else ScaledConvNet(channels=[4, 8])
    initial = copy.deepcopy(model)
    monitor = FisherTraceMonitor(num_samples=24, batch_size=10, every_n_steps=100, fisher="empirical")
    data = dict_items() if layout == "dict" else TensorDataset(X, Y)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, DataLoader(data, batch_size=16))
    chosen = _chosen(24)
    reference = naive_fisher(initial, X[chosen] * 2 + 1, "empirical", Y[chosen])  # before, then after the transfer
    logged = read_scalars(tmp_path / "lightning_logs")
    assert logged["startwell/fisher/trace"][0] == (0, pytest.approx(sum(reference.values()), rel=1e-5))
    for name, value in reference.items():
        assert logged[f"startwell/fisher/layer/{name}"][0][1] == pytest.approx(value, rel=1e-4, abs=1e-9)


def test_dynamics_probe_goes_through_both_transfer_hooks(tmp_path):
    """The hooked model on dict batches logs what the plain model logs on the batches already transformed."""

    def run(root, model, data):
        pl.seed_everything(0)
        monitor = GradientDynamicsMonitor(num_batches=3, batch_size=8, every_n_steps=1)
        make_trainer(root, [monitor], max_steps=2).fit(model, DataLoader(data, batch_size=8))
        return read_scalars(root / "lightning_logs")

    torch.manual_seed(0)
    hooked = HookedConvNet(channels=[4, 8])
    plain = ConvNet(channels=[4, 8])
    plain.load_state_dict(hooked.state_dict())
    ours = run(tmp_path / "hooked", hooked, dict_items())
    reference = run(tmp_path / "plain", plain, TensorDataset(X * 2 + 1, Y))
    for tag in ("direction_variance", "direction_error"):
        values = ours[f"startwell/dynamics/{tag}"]
        assert [s for s, _ in values] == [0, 1]
        assert values == [(s, pytest.approx(v, rel=1e-5)) for s, v in reference[f"startwell/dynamics/{tag}"]]


# --- 2. the probe draws leave the training run's random streams as they were ------------------------------------------


class Augmenting(Dataset):
    """Each item is jittered by one random stream: torch, numpy or Python's ``random``."""

    def __init__(self, stream):
        self.stream = stream

    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        noise = {
            "torch": lambda: torch.randn(()).item(),
            "numpy": lambda: float(np.random.randn()),
            "python": lambda: random.gauss(0.0, 1.0),
        }[self.stream]()
        return X[i] + 0.1 * noise, Y[i]


class RecordLosses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


class JitteringMLP(MLP):
    """Also augments on the device after the transfer, from torch's global stream."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x + 0.05 * torch.randn_like(x), y


@pytest.mark.parametrize("stream", ["torch", "numpy", "python"])
@pytest.mark.parametrize("monitor", ["fisher", "dynamics"])
def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path, stream, monitor):
    def run(root, callbacks):
        pl.seed_everything(0)  # torch, numpy and python
        recorder = RecordLosses()
        model = JitteringMLP(depth=1, width=8, dropout=0.2)
        make_trainer(root, [*callbacks, recorder], max_steps=6, max_epochs=2).fit(
            model, DataLoader(Augmenting(stream), batch_size=16, shuffle=True)
        )
        return recorder.losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    watcher = (
        FisherTraceMonitor(num_samples=24, every_n_steps=2)
        if monitor == "fisher"
        else GradientDynamicsMonitor(num_batches=2, batch_size=8, every_n_steps=2)
    )
    plain_losses, plain_weights = run(tmp_path / "plain", [])
    losses, weights = run(tmp_path / "watched", [watcher])
    assert len(losses) == 6
    assert losses == plain_losses
    assert torch.equal(weights, plain_weights)


# --- 8. startwell_forward calling self(...) --------------------------------------------------------------------------


class RoutedConvNet(ConvNet):
    def startwell_forward(self, batch):
        return self(batch[0])


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_startwell_forward_calling_the_model_itself(tmp_path, method):
    torch.manual_seed(0)
    model = RoutedConvNet(channels=[4, 8])
    initial = copy.deepcopy(model)
    monitor = FisherTraceMonitor(num_samples=24, batch_size=10, every_n_steps=100, fisher="empirical", method=method)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, DataLoader(TensorDataset(X, Y), batch_size=16))
    chosen = _chosen(24)
    reference = naive_fisher(initial, X[chosen], "empirical", Y[chosen])
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/fisher/trace"]
    assert logged[0] == (0, pytest.approx(sum(reference.values()), rel=1e-5))
    direct = fisher_trace(initial, (X[chosen], Y[chosen]), fisher="empirical", targets=Y[chosen],
                          forward=initial.startwell_forward, method=method)
    for name, value in reference.items():
        assert direct.per_layer[name] == pytest.approx(value, rel=1e-4, abs=1e-9)


# --- 13. bf16-true: the padding check runs on the converted probe ----------------------------------------------------


class FeatureTagger(pl.LightningModule):
    """Per-position classification of float features: dict batches {features (N, T, F), attention_mask, labels}."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, features, attention_mask=None):
        return self.net(features)

    def training_step(self, batch, batch_idx):
        logits = self(batch["features"])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_bf16_true_padding_check_and_trace_run_on_the_converted_probe(tmp_path):
    g = torch.Generator().manual_seed(3)
    features, labels = torch.randn(8, 5, 3, generator=g), torch.randint(0, 4, (8, 5), generator=g)
    mask = (torch.arange(5) < torch.randint(2, 6, (8, 1), generator=g)).long()
    items = [{"features": features[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(8)]
    torch.manual_seed(0)
    module = FeatureTagger()
    monitor = FisherTraceMonitor(num_samples=6, every_n_steps=100, fisher="empirical", target_key="labels",
                                 input_key=["features", "attention_mask"])
    with pytest.warns(UserWarning, match="mask_key"):
        trainer = make_trainer(tmp_path, [monitor], max_steps=1, precision="bf16-true")
        trainer.fit(module, DataLoader(items, batch_size=4))
    # float64 reference on the bf16 weights and the bf16-rounded features, every position counted (no mask_key)
    net = copy.deepcopy(module.net).double()
    params = list(net.parameters())
    chosen = _chosen(6, size=8)
    total = 0.0
    for i in chosen:
        log_p = net(features[i].bfloat16().double()).log_softmax(-1)  # (T, C)
        grads = torch.autograd.grad(log_p[torch.arange(5), labels[i]].sum(), params)
        total += sum(g.square().sum().item() for g in grads)
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/fisher/trace"]
    assert logged[0] == (0, pytest.approx(total / 6, rel=2e-2))


# --- 15. the heatmap's history is bounded, kept only with TensorBoard, and survives a resume --------------------------


def test_history_is_thinned_to_evenly_spread_steps_and_a_resumed_run_goes_on(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(fisher_monitor, "MAX_HEATMAP_COLUMNS", 4, raising=False)
    data = DataLoader(TensorDataset(X, Y), batch_size=8)  # 8 steps per epoch

    def run(root, ckpt_path=None, extra=(), max_steps=20):
        pl.seed_everything(0)
        monitor = FisherTraceMonitor(num_samples=8, every_n_steps=1)
        make_trainer(root, [monitor, *extra], max_steps=max_steps, max_epochs=-1).fit(MLP(), data, ckpt_path=ckpt_path)
        return monitor

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    first = run(tmp_path / "first", extra=[checkpoint], max_steps=12)
    steps = [s for s, _ in first._history]
    assert 4 <= len(steps) <= 8 and steps[0] == 0 and steps[-1] == 12  # 13 measurements thinned past 8
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=12.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("FisherTraceMonitor")]
    assert [s for s, _ in state["history"]] == steps
    resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    steps = [s for s, _ in resumed._history]
    assert 4 <= len(steps) <= 8 and steps[0] == 0 and steps[-1] == 20
    logged = read_scalars(tmp_path / "second" / "lightning_logs")["startwell/fisher/trace"]
    assert [s for s, _ in logged] == list(range(13, 21))


def test_no_history_without_tensorboard(tmp_path):
    monitor = FisherTraceMonitor(num_samples=8, every_n_steps=1)
    data = DataLoader(TensorDataset(X, Y), batch_size=8)
    make_trainer(tmp_path, [monitor], max_steps=5, logger=False).fit(MLP(), data)
    assert monitor._last_step == 5
    assert monitor.state_dict()["history"] == []


# --- 17. per-pixel outputs (segmentation) ---------------------------------------------------------------------------

CLASSES, H, W = 3, 4, 5


class TinySegmenter(nn.Module):
    """(N, 2, H, W) images to (N, 3, H, W) per-pixel logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, CLASSES, 1)
        )

    def forward(self, x):
        return self.net(x)


def segmentation_data(n=4, seed=0):
    """Images, per-pixel labels with some pixels at the ignore index -100, and a mask leaving other pixels out."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, H, W, generator=g)
    labels = torch.randint(0, CLASSES, (n, H, W), generator=g)
    labels[torch.rand(n, H, W, generator=g) < 0.2] = -100
    mask = (torch.rand(n, H, W, generator=g) > 0.25).long()
    return x, labels, mask


def per_pixel_loop(model, x, fisher, labels, mask):
    """Float64, one sample at a time: ``exact`` sums p_c ||grad log p_c(pixel)||^2 over the kept pixels and classes;
    otherwise one backward of the sum of log p(label) over the pixels kept (mask 1, label not -100)."""
    model = copy.deepcopy(model).double().eval()
    params = dict(model.named_parameters())
    per_layer = {n.rpartition(".")[0]: 0.0 for n in params}

    def add(objective, weight=1.0):
        grads = torch.autograd.grad(objective, list(params.values()), retain_graph=True)
        for name, g in zip(params, grads, strict=True):
            per_layer[name.rpartition(".")[0]] += weight * g.square().sum().item()

    for i in range(len(x)):
        log_p = model(x[i : i + 1].double()).log_softmax(1)[0]  # (C, H, W)
        kept = [(h, w) for h in range(H) for w in range(W) if mask[i, h, w] != 0]
        if fisher == "exact":
            for h, w in kept:
                for c in range(CLASSES):
                    add(log_p[c, h, w], log_p[c, h, w].exp().item())
        else:
            kept = [(h, w) for h, w in kept if labels[i, h, w] != -100]
            if kept:
                add(sum(log_p[labels[i, h, w], h, w] for h, w in kept))
    return {k: v / len(x) for k, v in per_layer.items()}


def pixel_draws(model, x, seed):
    """The labels of the ``true`` Fisher: one multinomial draw per pixel, pixels in row-major order per sample."""
    with torch.no_grad():
        probs = model.eval()(x).float().softmax(1).movedim(1, -1).reshape(-1, CLASSES)
    draws = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
    return draws.reshape(len(x), H, W)


def _trained_segmenter():
    torch.manual_seed(0)
    model = TinySegmenter()
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            model(torch.randn(8, 2, H, W))
    return model.eval()


@pytest.mark.parametrize("fisher", ["true", "empirical", "exact"])
@pytest.mark.parametrize("path", ["auto", "per_module", "vmap"])
def test_per_pixel_fisher_equals_a_float64_loop(monkeypatch, fisher, path):
    if path == "per_module":  # no closed form: every layer through the per-module vmap of its recorded inputs
        monkeypatch.setattr(fisher_hooks, "_closed_form", lambda layer: None)
    model = _trained_segmenter()
    x, labels, mask = segmentation_data()
    ours = fisher_trace(model, x, fisher=fisher, targets=labels, mask=mask, method="vmap" if path == "vmap" else "auto",
                        generator=torch.Generator().manual_seed(5), chunk_size=3)
    if fisher == "true":
        labels = pixel_draws(model, x, seed=5)
    reference = per_pixel_loop(model, x, fisher, labels, mask)
    for name, value in reference.items():
        assert ours.per_layer.get(name, 0.0) == pytest.approx(value, rel=1e-5, abs=1e-12), name
    assert ours.total == pytest.approx(sum(reference.values()), rel=1e-5)


def test_per_pixel_without_a_mask_counts_every_pixel_but_the_ignored():
    model = _trained_segmenter()
    x, labels, _ = segmentation_data(seed=1)
    ours = fisher_trace(model, x, fisher="empirical", targets=labels)
    reference = per_pixel_loop(model, x, "empirical", labels, torch.ones_like(labels))
    assert ours.total == pytest.approx(sum(reference.values()), rel=1e-5)


def test_per_pixel_bad_masks_and_targets_are_named():
    model = _trained_segmenter()
    x, labels, mask = segmentation_data()
    with pytest.raises(ValueError, match="mask"):
        fisher_trace(model, x, mask=mask[:, :2])
    with pytest.raises(ValueError, match="targets"):
        fisher_trace(model, x, fisher="empirical", targets=labels[:, :2])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fisher_trace(nn.Conv2d(2, 1, 1), x)  # one class per pixel


class SegmentationModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinySegmenter()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["image"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_monitor_on_a_segmentation_model(tmp_path, fisher):
    x, labels, mask = segmentation_data(n=10, seed=2)
    items = [{"image": x[i], "labels": labels[i], "valid": mask[i]} for i in range(10)]
    torch.manual_seed(0)
    module = SegmentationModule()
    initial = copy.deepcopy(module.model)
    monitor = FisherTraceMonitor(num_samples=6, batch_size=4, every_n_steps=100, fisher=fisher, input_key="image",
                                 target_key="labels", mask_key="valid")
    make_trainer(tmp_path, [monitor], max_steps=1).fit(module, DataLoader(items, batch_size=5))
    chosen = _chosen(6, size=10)
    reference = per_pixel_loop(initial, x[chosen], fisher, labels[chosen], mask[chosen])
    logged = read_scalars(tmp_path / "lightning_logs")
    assert logged["startwell/fisher/trace"][0] == (0, pytest.approx(sum(reference.values()), rel=1e-5))
    for name, value in reference.items():
        assert logged[f"startwell/fisher/layer/model.{name}"][0][1] == pytest.approx(value, rel=1e-4, abs=1e-12)


# --- the batch of InitScheme's LSUV (first_train_batch) goes through the transfer hooks too ---------------------------


class TripledMLP(MLP):
    """``on_before_batch_transfer`` multiplies the inputs by 3: the model trains on 3x."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 3, y


class AtTrainStart(pl.Callback):
    """A copy of the model as training starts (after InitScheme's on_fit_start)."""

    def on_train_start(self, trainer, pl_module):
        self.model = copy.deepcopy(pl_module)


def test_lsuv_batch_goes_through_the_transfer_hooks(tmp_path):
    from conftest import gaussian_loader

    from lightning_startwell.callbacks import InitScheme

    snapshot = AtTrainStart()
    make_trainer(tmp_path, [InitScheme("lsuv", seed=0, lsuv_tol=0.05), snapshot], max_steps=1).fit(
        TripledMLP(depth=3, width=64), gaussian_loader(batch_size=32)
    )
    # LSUV's unit output variances hold on the first batch as training_step gets it: 3x
    z = next(iter(gaussian_loader(batch_size=32)))[0].flatten(1) * 3
    for layer in [m for m in snapshot.model.net if isinstance(m, nn.Linear)]:
        z = layer(z)
        assert abs(z.var().item() - 1) < 0.05
        z = torch.relu(z)


class DenseRegressor(nn.Module):
    """(N, 2, H, W) images to (N, 2, H, W) per-pixel means: a Gaussian in 2 dimensions per pixel."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_per_pixel_gaussian_equals_a_float64_loop(fisher):
    torch.manual_seed(0)
    model = DenseRegressor()
    x, _, mask = segmentation_data(seed=3)
    targets = torch.randn(len(x), 2, H, W, generator=torch.Generator().manual_seed(4))
    ours = fisher_trace(model, x, fisher=fisher, targets=targets, mask=mask, likelihood="gaussian", noise_std=0.5)
    reference = copy.deepcopy(model).double()
    params = list(reference.parameters())
    total = 0.0
    for i in range(len(x)):
        f = reference(x[i : i + 1].double())[0]  # (2, H, W)
        kept = mask[i] != 0
        if fisher == "empirical":  # log N(t | f, 0.5^2 I) summed over the kept pixels
            log_p = -((targets[i].double() - f).square() * kept).sum() / (2 * 0.25)
            total += sum(g.square().sum().item() for g in torch.autograd.grad(log_p, params))
        else:  # tr(J^T J) / s^2: one backward per kept pixel and output dimension
            for d, h, w in itertools.product(range(2), range(H), range(W)):
                if kept[h, w]:
                    grads = torch.autograd.grad(f[d, h, w], params, retain_graph=True)
                    total += sum(g.square().sum().item() for g in grads) / 0.25
    assert ours.total == pytest.approx(total / len(x), rel=1e-5)
