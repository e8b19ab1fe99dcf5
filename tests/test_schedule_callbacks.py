"""DropoutSchedule and StochasticDepthSchedule under a real Trainer: rates per step, accumulation, resume, DDP,
timm and torchvision models, torch.compile, bad arguments."""

from __future__ import annotations

import math
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ddp_spawn_flake, gaussian_loader, make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_fisher_callback import StopAt
from torch import nn

from lightning_startwell.callbacks import DropoutSchedule, StochasticDepthSchedule
from lightning_startwell.models import MLP, Classifier, ResNet


def _official(rate, total, cutoff, mode, shape):
    """facebookresearch/dropout's drop_scheduler, rebuilt with NumPy (plus the cosine of our docs)."""
    if mode == "standard":
        return np.full(total, rate)
    if mode == "late":
        return np.concatenate([np.zeros(cutoff), np.full(total - cutoff, rate)])
    if shape == "constant":
        early = np.full(cutoff, rate)
    elif shape == "linear":
        early = np.linspace(rate, 0, cutoff)
    else:
        early = rate * (1 + np.cos(np.pi * np.arange(cutoff) / (cutoff - 1))) / 2
    return np.concatenate([early, np.zeros(total - cutoff)])


class RecordRates(Callback):
    """Reads, at every training batch (after the schedule has run), every dropout rate of the model."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rates = [m.p for m in pl_module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        rates += [m.dropout for m in pl_module.modules() if isinstance(m, nn.MultiheadAttention)]
        self.seen.append((trainer.global_step, rates))


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("standard", "constant"), ("early", "constant"), ("early", "linear"), ("early", "cosine"), ("late", "constant")],
)
@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_applied_and_logged_dropout_rates_follow_the_formula(tmp_path, mode, shape, accumulate):
    cutoff = {} if mode == "standard" else {"cutoff_epochs": 1}
    record = RecordRates()
    trainer = make_trainer(
        tmp_path, [DropoutSchedule(p=0.2, mode=mode, shape=shape, **cutoff), record],
        max_epochs=3, accumulate_grad_batches=accumulate,
    )
    model = MLP(depth=2, width=16, dropout=0.5)
    trainer.fit(model, gaussian_loader(num=128, batch_size=16))  # 8 batches an epoch
    # With 3, the last optimizer step of an epoch accumulates the 2 micro-batches left: 3 steps an epoch, not 2.
    steps_per_epoch = math.ceil(8 / accumulate)
    expected = _official(0.2, 3 * steps_per_epoch, steps_per_epoch, mode, shape)
    assert [step for step, _ in record.seen] == [
        e * steps_per_epoch + b // accumulate for e in range(3) for b in range(8)
    ]
    for step, rates in record.seen:
        assert rates == pytest.approx([expected[step]] * 2, abs=1e-12)
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/dropout/rate"]
    assert [s for s, _ in logged] == list(range(3 * steps_per_epoch))
    np.testing.assert_allclose([v for _, v in logged], expected, atol=1e-7)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]  # put back after fit


def test_default_cutoff_is_a_sixth_of_training_and_rate_levels_quantise_applied_and_logged_rates(tmp_path):
    record = RecordRates()
    schedule = DropoutSchedule(p=0.3, mode="early", shape="linear", rate_levels=4)
    make_trainer(tmp_path, [schedule, record], max_epochs=3).fit(
        MLP(depth=1, width=8, dropout=0.5), gaussian_loader(num=256, batch_size=16)
    )
    # 48 optimizer steps; the paper's 50 of 300 epochs is 8 steps; levels 0, 0.1, 0.2, 0.3.
    exact = np.concatenate([np.linspace(0.3, 0.0, 8), np.zeros(40)])
    expected = np.round(exact / 0.1) * 0.1
    np.testing.assert_allclose([rates[0] for _, rates in record.seen], expected, atol=1e-12)
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/dropout/rate"]
    np.testing.assert_allclose([v for _, v in logged], expected, atol=1e-7)
    assert sorted(set(np.round(expected, 12))) == [0.0, 0.1, 0.2, 0.3]


class TinyTransformer(Classifier):
    def __init__(self) -> None:
        super().__init__(input_shape=(4, 8), num_classes=10)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.encoder(x)
        h = self.drop(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


def test_every_dropout_of_a_transformer_follows_the_schedule(tmp_path):
    record = RecordRates()
    trainer = make_trainer(
        tmp_path, [DropoutSchedule(p=0.3, mode="early", shape="linear", cutoff_steps=5), record], max_steps=8
    )
    trainer.fit(TinyTransformer(), gaussian_loader(num=128, shape=(4, 8)))
    expected = _official(0.3, 8, 5, "early", "linear")
    for step, rates in record.seen:
        assert len(rates) == 6  # dropout, dropout1, dropout2, drop, encoder.self_attn, attn
        assert rates == pytest.approx([expected[step]] * 6, abs=1e-12)


def _same_batches(num_batches=8):
    x, y = next(iter(gaussian_loader()))
    data = torch.utils.data.TensorDataset(x.repeat(num_batches, 1, 1, 1), y.repeat(num_batches))
    return torch.utils.data.DataLoader(data, batch_size=len(x))


@pytest.mark.parametrize("cls", [DropoutSchedule, StochasticDepthSchedule])
def test_mid_epoch_resume_has_the_uninterrupted_rate_trajectory(tmp_path, cls):
    def run(root, max_steps, ckpt_path=None, extra=()):
        callback = cls(0.4, mode="early", shape="linear", cutoff_steps=12)
        model = ResNet(num_blocks=2, width=4, dropout=0.2)
        make_trainer(root, [callback, *extra], max_steps=max_steps, max_epochs=-1).fit(
            model, _same_batches(), ckpt_path=ckpt_path
        )
        return read_scalars(root / "lightning_logs")

    tag = "startwell/dropout/rate" if cls is DropoutSchedule else "startwell/depth/drop_rate"
    full = run(tmp_path / "full", 14)[tag]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "first", 14, extra=[checkpoint, StopAt(5)])  # a run of 14 steps interrupted at step 5
    resumed = run(tmp_path / "second", 14, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")[tag]
    assert [s for s, _ in resumed] == list(range(5, 14))
    assert dict(resumed) == pytest.approx(dict(full[5:]))
    np.testing.assert_allclose([v for _, v in full], _official(0.4, 14, 12, "early", "linear"), atol=1e-7)


class CountZeroSamples(Callback):
    """Counts, per named module, the training samples whose output is all zeros (a dropped residual branch). Its hooks
    are registered at train start, after the schedule's own, so they see the output after dropping."""

    def __init__(self, names) -> None:
        self.names = list(names)
        self.dropped = dict.fromkeys(self.names, 0)
        self.samples = dict.fromkeys(self.names, 0)
        self.handles = []

    def on_train_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        self.handles = [modules[name].register_forward_hook(self._count(name)) for name in self.names]

    def _count(self, name):
        def hook(module, inputs, output):
            if module.training:
                zero = (output.flatten(1) == 0).all(1)
                self.dropped[name] += int(zero.sum())
                self.samples[name] += len(zero)

        return hook

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()

    def assert_rates(self, expected):
        """Each module's drop frequency within 4 binomial standard errors of its expected rate."""
        for name, rate in zip(self.names, expected, strict=True):
            n = self.samples[name]
            assert n > 0, name
            assert abs(self.dropped[name] / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n), (name, rate)


def test_stochastic_depth_in_a_fit_drops_at_the_scheduled_rates(tmp_path):
    branches = ["blocks.0.branch", "blocks.1.branch", "blocks.2.branch"]
    counter = CountZeroSamples(branches)
    model = ResNet(num_blocks=3, width=4)
    reference = ResNet(num_blocks=3, width=4)
    trainer = make_trainer(
        tmp_path,
        [StochasticDepthSchedule(drop_rate=0.6, rule="linear"), counter],
        max_epochs=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, gaussian_loader(num=1024, batch_size=128), gaussian_loader(num=16, batch_size=16))
    assert all(counter.samples[name] == 3 * 1024 for name in branches)
    counter.assert_rates([0.6 * block / 3 for block in range(1, 4)])
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/depth/expected_depth"]
    assert logged[0][1] == pytest.approx(sum(1 - 0.6 * block / 3 for block in range(1, 4)))
    # After fit: no hook left, and eval output is that of the same weights without the callback.
    reference.load_state_dict(model.state_dict())
    model.eval(), reference.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), reference(x))
    assert all(not m._forward_hooks for m in model.modules())


class Wrapped(Classifier):
    def __init__(self, net, input_shape):
        super().__init__(input_shape=input_shape, num_classes=10)
        self.net = net


def _fit_and_count(tmp_path, model, names, drop_rate, shape, samples=768, batch_size=256):
    counter = CountZeroSamples(names)
    callback = StochasticDepthSchedule(drop_rate=drop_rate, rule="linear")
    make_trainer(tmp_path, [callback, counter], max_steps=samples // batch_size).fit(
        model, gaussian_loader(num=samples, shape=shape, batch_size=batch_size)
    )
    return counter


def test_timm_vit_built_with_drop_path_rate_zero_drops_each_slot_at_its_block_rate(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        num_classes=10,
        depth=4,
        drop_path_rate=0.0,
        in_chans=1,
        embed_dim=32,
        num_heads=2,
    )
    model = Wrapped(vit, (1, 16, 16))
    slots = [f"net.blocks.{i}.drop_path{j}" for i in range(4) for j in (1, 2)]
    counter = _fit_and_count(tmp_path, model, slots, 0.8, (1, 16, 16))
    counter.assert_rates([0.8 * (i + 1) / 4 for i in range(4) for _ in (1, 2)])  # Huang et al.'s l / L per block
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/depth/expected_depth"]
    assert logged[0][1] == pytest.approx(sum(1 - 0.8 * block / 4 for block in range(1, 5)))


def test_torchvision_resnet_drops_each_basic_block_at_its_rate(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = Wrapped(torchvision.models.resnet18(num_classes=10), (3, 8, 8))
    # torchvision adds the shortcut right after bn2: a dropped branch is an all-zero bn2 output.
    branches = [f"net.layer{k}.{j}.bn2" for k in range(1, 5) for j in range(2)]
    counter = _fit_and_count(tmp_path, model, branches, 0.8, (3, 8, 8), samples=512)
    counter.assert_rates([0.8 * block / 8 for block in range(1, 9)])


def test_torchvision_convnext_stochastic_depth_modules_drop_at_the_schedule_and_are_restored(tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]
    model = Wrapped(ConvNeXt(settings, stochastic_depth_prob=0.1, num_classes=10), (3, 16, 16))
    names = [n for n, m in model.named_modules() if type(m).__name__ == "StochasticDepth"]
    before = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
    assert len(names) == 4 and before != [0.0] * 4
    counter = _fit_and_count(tmp_path, model, names, 0.6, (3, 16, 16))
    counter.assert_rates([0.6 * block / 4 for block in range(1, 5)])  # not the model's own 0.1 spread, nor on top of it
    assert [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"] == before


def _count_compiles(model, schedule_callback, steps, shape):
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    trainer = types.SimpleNamespace(
        num_training_batches=steps,
        accumulate_grad_batches=1,
        estimated_stepping_batches=steps,
        fast_dev_run=False,
        fit_loop=types.SimpleNamespace(setup_data=lambda: None),
        is_global_zero=True,
        loggers=[],
        global_step=0,
    )
    schedule_callback.on_fit_start(trainer, model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, *shape)
    model.train()
    for step in range(steps):
        schedule_callback.apply_rate(model, schedule_callback.rate_at(step))
        compiled(x)
    torch._dynamo.reset()
    return len(compiles)


def test_torch_compile_recompilations_stay_bounded_over_a_full_early_linear_schedule():
    mlp = MLP(depth=2, width=16, dropout=0.1)
    dropout = DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=40, rate_levels=5)
    assert _count_compiles(mlp, dropout, 60, (1, 8, 8)) <= 6
    resnet = ResNet(num_blocks=3, width=4)
    depth = StochasticDepthSchedule(drop_rate=0.5, mode="early", shape="linear", cutoff_steps=40)
    assert _count_compiles(resnet, depth, 60, (1, 8, 8)) <= 2


@pytest.mark.parametrize(
    ("cls", "kwargs", "named"),
    [
        (DropoutSchedule, {"p": 1.0}, "`p`"),
        (DropoutSchedule, {"mode": "middle"}, "mode"),
        (DropoutSchedule, {"shape": "step"}, "shape"),
        (DropoutSchedule, {"cutoff_epochs": 2, "cutoff_steps": 5}, "cutoff_epochs"),
        (DropoutSchedule, {"cutoff_steps": -1}, "cutoff_steps"),
        (DropoutSchedule, {"rate_levels": 1}, "rate_levels"),
        (StochasticDepthSchedule, {"drop_rate": -0.5}, "drop_rate"),
        (StochasticDepthSchedule, {"rule": "exponential"}, "rule"),
        (StochasticDepthSchedule, {"mode": "late", "shape": "linear"}, "shape"),
    ],
)
def test_bad_arguments_at_construction(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(**kwargs)


class FailIfTrained(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("training started")


@pytest.mark.parametrize(
    ("callback", "model", "named"),
    [
        (DropoutSchedule(include=["head.*"]), MLP(), "include"),
        (StochasticDepthSchedule(blocks=["layer9.*"]), ResNet(), "blocks"),
        (StochasticDepthSchedule(), MLP(), "no residual block"),
    ],
)
def test_bad_fit_configurations_fail_before_training(tmp_path, callback, model, named):
    trainer = make_trainer(tmp_path, [callback, FailIfTrained()], max_epochs=2)
    with pytest.raises(ValueError, match=named):
        trainer.fit(model, gaussian_loader())


def test_a_model_without_dropout_is_refused(tmp_path):
    class NoDropout(Classifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    with pytest.raises(ValueError, match="no dropout"):
        make_trainer(tmp_path, [DropoutSchedule()]).fit(NoDropout(), gaussian_loader())


class AssertSameRatesAcrossRanks(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        p = torch.tensor([m.p for m in pl_module.modules() if isinstance(m, nn.Dropout)])
        hooks = trainer.callbacks[1]._hooks
        rates = torch.cat([p, hooks.rates])
        gathered = trainer.strategy.all_gather(rates)
        assert torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_applies_the_same_rates(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[
            DropoutSchedule(p=0.3, mode="early", cutoff_steps=4),
            StochasticDepthSchedule(drop_rate=0.4, mode="early", cutoff_steps=4),
            AssertSameRatesAcrossRanks(),
        ],
    )
    trainer.fit(ResNet(num_blocks=2, width=4, dropout=0.1), gaussian_loader())
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/dropout/rate"]
    np.testing.assert_allclose([v for _, v in logged], _official(0.3, 6, 4, "early", "linear"), atol=1e-7)


def test_our_drop_path_modules_are_driven_by_the_schedule_and_restored(tmp_path):
    from lightning_startwell.drop_path import DropPath

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(64, 64)
            self.drop_path = DropPath(0.1)

        def forward(self, x):
            return x + self.drop_path(torch.relu(self.f(x)))

    class Net(Classifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), Residual(), Residual(), nn.Linear(64, 10))

    class SeesZero(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert [m.drop_prob for m in pl_module.modules() if isinstance(m, DropPath)] == [0.0, 0.0]

    model = Net()
    make_trainer(tmp_path, [StochasticDepthSchedule(drop_rate=0.3), SeesZero()], max_steps=2).fit(
        model, gaussian_loader()
    )
    assert [m.drop_prob for m in model.modules() if isinstance(m, DropPath)] == [0.1, 0.1]
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/depth/expected_depth"]
    assert logged[0][1] == pytest.approx((1 - 0.15) + (1 - 0.3))
