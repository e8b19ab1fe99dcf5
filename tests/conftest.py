from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Two-process gloo runs under ddp_spawn now and then lose a worker to SIGABRT in gloo's teardown, a known flake of
# Lightning's own test suite (Lightning-AI/pytorch-lightning#20620, #20933). Rerun only on that crash: a failed
# assertion inside a worker is reported as a different error and still fails the test.
ddp_spawn_flake = pytest.mark.flaky(reruns=2, only_rerun=["ProcessExitedException"])
QUICKSTART = REPO / "examples" / "configs" / "quickstart.yaml"


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``log_dir``, as ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def read_images(log_dir: Path) -> dict[str, list[tuple[int, np.ndarray]]]:
    """All images of the TensorBoard event files under ``log_dir``, decoded from their PNG, as
    ``{tag: [(step, (H, W, C) uint8 array), ...]}``."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images: dict[str, list] = {}
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            for event in acc.Images(tag):
                with Image.open(io.BytesIO(event.encoded_image_string)) as picture:
                    assert picture.format == "PNG"
                    pixels = np.asarray(picture)
                assert pixels.shape[:2] == (event.height, event.width)
                images.setdefault(tag, []).append((event.step, pixels))
    return images


@pytest.fixture(autouse=True)
def stand_in_pictures(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the tests marked ``pictures`` (and the subprocesses of the CLI and DDP tests), the callbacks' pictures
    are a small grey stand-in, still written to TensorBoard: the drawing is tested where it is the subject, and would
    elsewhere add about a second per measurement to the suite."""
    if request.node.get_closest_marker("pictures"):
        return
    import numpy as np

    from lightning_startwell.callbacks import _schedule_overview, fisher_monitor, init_scheme, signal_propagation

    def stand_in(*args: object, **kwargs: object) -> np.ndarray:
        return np.full((4, 6, 3), 128, dtype=np.uint8)

    for module, name in (
        (fisher_monitor, "fisher_heatmap"),
        (signal_propagation, "signal_profile"),
        (init_scheme, "signal_profile"),
        (_schedule_overview, "schedule_overview"),
    ):
        monkeypatch.setattr(module, name, stand_in)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def gaussian_loader(num: int = 64, shape: tuple[int, ...] = (1, 8, 8), batch_size: int = 16, seed: int = 0):
    """A fixed-order loader of Gaussian inputs and random labels (10 classes)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(num, *shape, generator=g), torch.randint(0, 10, (num,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_trainer(root: Path, callbacks: list, **kwargs):
    import lightning.pytorch as pl

    options = dict(
        default_root_dir=root, accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
