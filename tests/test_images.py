"""The TensorBoard pictures under a real Trainer: one per measurement, read back from the event files as PNG; what they
draw equals the logged numbers and the schedule formulas; rank 0 only under DDP; none without a TensorBoard logger or
with ``log_images=False``; kept across a resume."""

from __future__ import annotations

import importlib.util

import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import REPO, ddp_spawn_flake, gaussian_loader, make_trainer, read_images, read_scalars
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from test_fisher_callback import StopAt
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
    _schedule_overview,
    fisher_monitor,
    init_scheme,
    signal_propagation,
)
from lightning_startwell.models import MLP, ResNet

TAGS = ("startwell/init/profile", "startwell/signal/profile", "startwell/fisher/heatmap", "startwell/schedule/overview")


def every_callback(**images):
    """Every callback: 4 steps per epoch (64 items, batch 16), 2 epochs. Measurements: the signal at steps 0, 3, 6,
    the Fisher trace at 0, 4, 8 (each epoch); the schedules switch at step 4, the deficit is on in epoch 0."""
    return [
        InitScheme(seed=0, **images),
        SignalPropagationMonitor(every_n_steps=3, **images),
        DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=4, **images),
        StochasticDepthSchedule(drop_rate=0.2, mode="late", cutoff_steps=4, **images),
        DeficitInjector("noise", start_epoch=0, end_epoch=1, **images),
        FisherTraceMonitor(num_samples=32, every_n_epochs=1, **images),
    ]


def fit(root, callbacks, **kwargs):
    pl.seed_everything(0)
    model = ResNet(num_blocks=2, width=8, dropout=0.1)
    make_trainer(root, callbacks, **{"max_epochs": 2, **kwargs}).fit(model, gaussian_loader(num=64))


class Spy:
    """Stands in for a drawing function: records its arguments, returns a small picture."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return np.full((4, 6, 3), 128, dtype=np.uint8)


@pytest.fixture
def spies(monkeypatch):
    drawn = {"heatmap": Spy(), "signal": Spy(), "init": Spy(), "schedule": Spy()}
    monkeypatch.setattr(fisher_monitor, "fisher_heatmap", drawn["heatmap"])
    monkeypatch.setattr(signal_propagation, "signal_profile", drawn["signal"])
    monkeypatch.setattr(init_scheme, "signal_profile", drawn["init"])
    monkeypatch.setattr(_schedule_overview, "schedule_overview", drawn["schedule"])
    return drawn


@pytest.mark.slow
@pytest.mark.pictures
def test_every_picture_is_a_png_written_once_per_measurement(tmp_path):
    fit(tmp_path, every_callback())
    images = read_images(tmp_path / "lightning_logs")
    assert sorted(images) == sorted(TAGS)
    steps = {tag: [step for step, _ in images[tag]] for tag in TAGS}
    assert steps == {
        "startwell/init/profile": [0],
        "startwell/signal/profile": [0, 3, 6],
        "startwell/fisher/heatmap": [0, 4, 8],
        "startwell/schedule/overview": [0, 8],  # the plan at the start, again at the end
    }
    for tag in TAGS:
        for _, pixels in images[tag]:
            assert 300 <= pixels.shape[0] <= 1600 and 400 <= pixels.shape[1] <= 1000
            assert pixels.std() > 0

    spec = importlib.util.spec_from_file_location("export", REPO / "examples" / "export_pictures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.export(tmp_path / "lightning_logs", tmp_path / "png")
    assert sorted(p.name for p in written) == ["fisher_heatmap.png", "init_profile.png", "schedule_overview.png",
                                               "signal_profile.png"]
    for path in written:  # the last picture of its tag
        last = images["startwell/" + path.stem.replace("_", "/", 1)][-1][1]
        with Image.open(path) as picture:
            np.testing.assert_array_equal(np.asarray(picture), last)


def test_the_pictures_draw_the_logged_numbers_and_the_schedule_formulas(tmp_path, spies):
    fit(tmp_path, every_callback())
    scalars = read_scalars(tmp_path / "lightning_logs")

    (steps, layers, values), _ = spies["heatmap"].calls[-1]
    assert len(spies["heatmap"].calls) == 3 and steps == [0, 4, 8]
    assert layers[0] == "stem.0" and layers[-1] == "head.2"  # forward order, not alphabetical ("blocks..." first)
    for name, row in zip(layers, values, strict=True):
        assert row == pytest.approx([v for _, v in scalars[f"startwell/fisher/layer/{name}"]], rel=1e-6)

    (measurements,), _ = spies["signal"].calls[-1]
    assert len(spies["signal"].calls) == 3 and [m[0] for m in measurements] == [0, 3, 6]
    for step, forward, backward in measurements:
        assert list(forward)[0] == "stem.0" and list(forward)[-1] == "head.2"
        for direction, variances in (("forward", forward), ("backward", backward)):
            for name, value in variances.items():
                assert value == pytest.approx(dict(scalars[f"startwell/signal/{direction}/{name}"])[step], rel=1e-6)

    ((measurement,),), _ = spies["init"].calls[0]
    assert measurement[0] == 0 and measurement[2] == {}
    ratios = {n: v / next(iter(measurement[1].values())) for n, v in measurement[1].items()}
    for name, ratio in ratios.items():
        assert scalars[f"startwell/init/forward_ratio/{name}"][0][1] == pytest.approx(ratio, rel=1e-6)

    assert [kwargs["now"] for _, kwargs in spies["schedule"].calls] == [0, 8]
    (steps,), plan = spies["schedule"].calls[0]
    assert steps == list(range(8))
    assert plan["dropout"] == pytest.approx([0.1 * (1 - s / 3) for s in range(4)] + [0.0] * 4)  # linspace(0.1, 0, 4)
    huang = [[0.0, 0.0]] * 4 + [[0.1, 0.2]] * 4  # block l of L drops with (l / L) 0.2 from step 4
    np.testing.assert_allclose(plan["block_rates"], huang)
    assert plan["windows"] == [(0, 4, "noise")]


def test_no_picture_without_a_tensorboard_logger(tmp_path, spies):
    fit(tmp_path, every_callback(), logger=CSVLogger(tmp_path))
    assert all(not spy.calls for spy in spies.values())


def test_log_images_false_writes_no_picture_and_the_same_scalars(tmp_path):
    fit(tmp_path, every_callback(log_images=False), max_epochs=1)
    assert read_images(tmp_path / "lightning_logs") == {}
    assert "startwell/fisher/trace" in read_scalars(tmp_path / "lightning_logs")


@pytest.mark.parametrize(
    "make",
    [InitScheme, SignalPropagationMonitor, DropoutSchedule, StochasticDepthSchedule, DeficitInjector,
     FisherTraceMonitor],
)
@pytest.mark.parametrize("value", ["no", 0, None])
def test_log_images_must_be_a_bool(make, value):
    with pytest.raises(ValueError, match="`log_images` must be True or False"):
        make(log_images=value)


def test_a_resumed_run_draws_the_whole_history(tmp_path, spies):
    x, y = next(iter(gaussian_loader()))
    # 10 identical batches: a mid-epoch resume sees the same data as the uninterrupted run.
    same_batches = DataLoader(TensorDataset(x.repeat(10, 1, 1, 1), y.repeat(10)), batch_size=len(x))

    def run(root, ckpt_path=None, extra=()):
        pl.seed_everything(0)
        callbacks = [SignalPropagationMonitor(every_n_steps=2), FisherTraceMonitor(num_samples=32, every_n_steps=2)]
        trainer = make_trainer(root, [*callbacks, *extra], max_steps=9, max_epochs=-1)
        trainer.fit(MLP(depth=2, width=16), same_batches, ckpt_path=ckpt_path)
        (steps, layers, values), _ = spies["heatmap"].calls[-1]
        (measurements,), _ = spies["signal"].calls[-1]
        return steps, dict(zip(layers, values, strict=True)), measurements

    full = run(tmp_path / "full")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "first", extra=[checkpoint, StopAt(5)])
    resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    assert full[0] == resumed[0] == [0, 2, 4, 6, 8]
    for name, row in full[1].items():
        assert resumed[1][name] == pytest.approx(row, rel=1e-5)
    assert [m[0] for m in resumed[2]] == [m[0] for m in full[2]] == [0, 2, 4, 6, 8]


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_writes_each_picture_once(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[
            SignalPropagationMonitor(every_n_steps=2),
            DropoutSchedule(p=0.1, mode="early", cutoff_steps=2),
            FisherTraceMonitor(num_samples=32, every_n_steps=2),
        ],
    )
    trainer.fit(MLP(depth=2, width=16, dropout=0.1), gaussian_loader(num=128))
    images = read_images(tmp_path / "lightning_logs")
    assert {tag: [step for step, _ in pictures] for tag, pictures in images.items()} == {
        "startwell/signal/profile": [0, 2],
        "startwell/fisher/heatmap": [0, 2, 4],
        "startwell/schedule/overview": [0, 4],
    }
