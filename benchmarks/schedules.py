"""Overhead per training step of DropoutSchedule and StochasticDepthSchedule against the bare model, in one run.

Each configuration trains the same seeded demo ResNet on the embedded digits under a real Trainer; a timing callback
measures every training step (batch start to batch end, optimizer step included). Configurations are interleaved over
several rounds so drifts of the machine hit all of them alike; the median step time per configuration is reported.

    python benchmarks/schedules.py [--steps 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_startwell import DigitsDataModule, DropoutSchedule, ResNet, StochasticDepthSchedule


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


CONFIGS = {
    "bare model": lambda: [],
    "DropoutSchedule (early linear)": lambda: [
        DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_fraction=0.5)
    ],
    "StochasticDepthSchedule (0.1, linear rule)": lambda: [StochasticDepthSchedule(drop_rate=0.1)],
}


def time_config(make_callbacks, steps: int) -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*make_callbacks(), timer],
    )
    model = ResNet(num_blocks=8, width=32, dropout=0.1)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return statistics.median(timer.times[10:])  # past the warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, make in CONFIGS.items():
            results[name].append(time_config(make, args.steps))
    bare = statistics.median(results["bare model"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}"
    )
    print(
        f"model: demo ResNet, 8 blocks, width 32, digits batch 64; median of {args.steps - 10} steps"
        f" x {args.rounds} rounds"
    )
    print("| configuration | ms / step (median of rounds) | spread over rounds (ms) | overhead vs bare |")
    print("|---|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        spread = max(values) - min(values)
        print(f"| {name} | {1e3 * median:.2f} | {1e3 * spread:.2f} | {100 * (median / bare - 1):+.1f}% |")


if __name__ == "__main__":
    main()
