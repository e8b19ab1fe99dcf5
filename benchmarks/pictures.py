"""Cost of the TensorBoard pictures: per picture (drawing and PNG encoding into the event file), next to what each
picture accompanies in a real quickstart run (a Fisher measurement, a training step), and at larger sizes.

1. The quickstart (``examples/configs/quickstart.yaml``, every callback) runs in this process with the pictures'
   writer (``log_image`` as each callback calls it) timed per tag; the Fisher measurements (``FisherTraceMonitor``'s
   ``_measure``, its picture included) and every training step are timed too. ``--runs`` repeats the fit.
2. Each drawing function, with ``SummaryWriter.add_image``, on synthetic data at the quickstart's sizes and at the size
   of a large model and a long run (median of ``--repeats``).

    python benchmarks/pictures.py [--runs 1] [--repeats 5] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import matplotlib
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_startwell.callbacks import _schedule_overview, fisher_monitor, init_scheme, signal_propagation
from lightning_startwell.cli import main as startwell
from lightning_startwell.figures import fisher_heatmap, schedule_overview, signal_profile
from lightning_startwell.schedules import block_drop_rates, scheduled_rate

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "configs" / "quickstart.yaml"
SIGNAL_EVERY = 20  # the quickstart's SignalPropagationMonitor(every_n_steps=20)
WRITERS = (fisher_monitor, signal_propagation, init_scheme, _schedule_overview)  # the modules that call log_image


class StepTimer(pl.Callback):
    """Times every training step (batch start to batch end), keyed by the optimizer step it starts at."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._start = 0.0

    def on_train_batch_start(self, trainer, *args) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001
        self.times[trainer.global_step - 1] = time.perf_counter() - self._start


@contextlib.contextmanager
def patched(module, name: str, replacement):  # noqa: ANN001
    original = getattr(module, name)
    setattr(module, name, replacement(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def quickstart(log_dir: Optional[Path]) -> dict:
    """One quickstart fit: wall time, seconds per picture (by tag), per Fisher measurement (its picture included) and
    per training step (by the optimizer step it starts at). Logs go to ``log_dir`` (kept) or a temporary folder."""
    picture_times: dict[str, list[float]] = defaultdict(list)
    fisher_times: list[float] = []

    def timed_log_image(original):  # noqa: ANN001, ANN202
        def log_image(trainer, tag, draw, step):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            original(trainer, tag, draw, step)
            picture_times[tag].append(time.perf_counter() - start)

        return log_image

    def timed_measure(original):  # noqa: ANN001, ANN202
        def measure(self, trainer, pl_module):  # noqa: ANN001, ANN202
            start = time.perf_counter()
            original(self, trainer, pl_module)
            fisher_times.append(time.perf_counter() - start)

        return measure

    timer = StepTimer()
    with contextlib.ExitStack() as stack:
        root = log_dir or stack.enter_context(tempfile.TemporaryDirectory())
        for module in WRITERS:
            stack.enter_context(patched(module, "log_image", timed_log_image))
        stack.enter_context(patched(fisher_monitor.FisherTraceMonitor, "_measure", timed_measure))
        stack.enter_context(patched(pl.Trainer, "fit", lambda fit: _with_callback(fit, timer)))
        start = time.perf_counter()
        startwell(["fit", "--config", str(QUICKSTART), f"--trainer.default_root_dir={root}",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"])
        wall = time.perf_counter() - start
    return {"wall": wall, "pictures": dict(picture_times), "fisher": fisher_times, "steps": timer.times}


def _with_callback(fit, callback: pl.Callback):  # noqa: ANN001, ANN202
    """``Trainer.fit`` with ``callback`` added to the trainer's callbacks (the CLI builds the trainer)."""

    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN202
        self.callbacks.append(callback)
        return fit(self, *args, **kwargs)

    return wrapped


def synthetic(repeats: int) -> list[tuple[str, str, float]]:
    """Median seconds per picture (drawing + add_image) of each drawing function at two sizes."""
    rng = np.random.default_rng(0)

    def fisher(layers: int, measurements: int):  # noqa: ANN202
        names = [f"layer{i // 3}.block{i % 3}.conv" for i in range(layers)]
        return lambda: fisher_heatmap(list(range(0, 10 * measurements, 10)), names, rng.random((layers, measurements)))

    def signal(layers: int, measurements: int, backward: bool = True):  # noqa: ANN202
        names = [f"layer{i // 3}.block{i % 3}.conv" for i in range(layers)]
        data = [
            (
                10 * m,
                dict(zip(names, rng.random(layers) + 0.1, strict=True)),
                dict(zip(names, rng.random(layers) + 0.1, strict=True)) if backward else {},
            )
            for m in range(measurements)
        ]
        return lambda: signal_profile(data)

    def schedule(total: int, blocks: int):  # noqa: ANN202
        steps = np.unique(np.linspace(0, total - 1, min(total, _schedule_overview.MAX_POINTS)).round()).astype(int)
        dropout = [scheduled_rate(int(s), 0.1, "early", "linear", total // 3) for s in steps]
        rates = [block_drop_rates(scheduled_rate(int(s), 0.2, "late", "constant", total // 2), blocks) for s in steps]
        return lambda: schedule_overview(steps.tolist(), dropout, rates, [(0, total // 15, "blur")], now=total)

    cases = [
        ("startwell/fisher/heatmap", "quickstart: 15 layers x 16 measurements", fisher(15, 16)),
        ("startwell/fisher/heatmap", "160 layers x 100 measurements", fisher(160, 100)),
        ("startwell/signal/profile", "quickstart: 8 layers, 15 measurements", signal(8, 15)),
        ("startwell/signal/profile", "50 layers, 100 measurements (24 drawn behind)", signal(50, 100)),
        ("startwell/init/profile", "quickstart: 8 layers, forward only", signal(8, 1, backward=False)),
        ("startwell/schedule/overview", "quickstart: 300 steps, 3 blocks", schedule(300, 3)),
        ("startwell/schedule/overview", "300,000 steps (2,000 drawn), 16 blocks", schedule(300_000, 16)),
    ]
    results = []
    with tempfile.TemporaryDirectory() as root:
        writer = SummaryWriter(root)
        for tag, size, draw in cases:
            draw()  # warm-up: fonts and caches
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                writer.add_image(tag, draw(), global_step=0, dataformats="HWC")
                times.append(time.perf_counter() - start)
            results.append((tag, size, statistics.median(times)))
        writer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--log-dir", type=Path, help="keep the quickstart's logs here (pictures for the docs)")
    args = parser.parse_args()
    runs = [quickstart(args.log_dir) for _ in range(args.runs)]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}, matplotlib {matplotlib.__version__}"
    )
    print(f"\nquickstart, {args.runs} run(s); medians over all runs")
    print("| picture | per run | ms per picture | s per run |\n|---|---|---|---|")
    for tag in sorted(runs[0]["pictures"]):
        per_picture = [t for r in runs for t in r["pictures"][tag]]
        per_run = statistics.median(sum(r["pictures"][tag]) for r in runs)
        count = len(runs[0]["pictures"][tag])
        print(f"| {tag} | {count} | {1e3 * statistics.median(per_picture):.0f} | {per_run:.2f} |")
    heatmaps = [t for r in runs for t in r["pictures"]["startwell/fisher/heatmap"]]
    fisher = statistics.median(t for r in runs for t in r["fisher"])
    measured = [t for r in runs for s, t in r["steps"].items() if s % SIGNAL_EVERY == 0]
    plain = [t for r in runs for s, t in r["steps"].items() if s % SIGNAL_EVERY]
    pictures = statistics.median(sum(map(sum, r["pictures"].values())) for r in runs)
    wall = statistics.median(r["wall"] for r in runs)
    print("\n| in the same run | ms (median) |\n|---|---|")
    print(f"| one Fisher measurement, its heatmap included | {1e3 * fisher:.0f} |")
    print(f"| the heatmap alone | {1e3 * statistics.median(heatmaps):.0f} |")
    print(f"| a step with a signal measurement, its picture included | {1e3 * statistics.median(measured):.0f} |")
    print(f"| a training step without a measurement | {1e3 * statistics.median(plain):.1f} |")
    print(f"\nfit wall time {wall:.1f} s, of which pictures {pictures:.1f} s ({100 * pictures / wall:.0f}%)")
    print(f"\nsynthetic, median of {args.repeats} (drawing + SummaryWriter.add_image)")
    print("| picture | size | ms per picture |\n|---|---|---|")
    for tag, size, seconds in synthetic(args.repeats):
        print(f"| {tag} | {size} | {1e3 * seconds:.0f} |")


if __name__ == "__main__":
    main()
