"""Cost of CriticalPeriodMonitor per training step, side by side with the bare run and with FisherTraceMonitor at its
default, under a real ``Trainer.fit`` (issue 21, item 4: at most 5 % at the default cadence).

For each model, each arm trains the same ``--steps`` optimizer steps from the same weights on the same synthetic
batches (random inputs and labels made here: nothing is downloaded): ``bare`` (no callback), ``CriticalPeriodMonitor``
(defaults: the Fisher penalty on the training batch every 10 steps) and ``FisherTraceMonitor`` (defaults: 256 probe
samples, measured at the start of training and after every epoch; the run here is one epoch). The time of an arm is
the wall time from the first training batch's start to the last one's end, over the steps, so fit set-up and the
callbacks' fit-start work are left out (both are paid once per fit, not per step). After one warm-up fit, arms are
interleaved over ``--rounds`` rounds and the table gives the median over rounds and the spread (max - min).

    python benchmarks/critical_period.py [--rounds 3] [--steps 40] [--resnet18]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import CriticalPeriodMonitor, FisherTraceMonitor
from lightning_startwell.models import ResNet


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepClock(pl.Callback):
    """Wall time from the first training batch's start to the last one's end."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if self.steps == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.steps += 1
        self.end = time.perf_counter()


def models(resnet18: bool) -> dict[str, tuple[nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    found = {"demo ResNet (8 blocks, width 32, 1x8x8), batch 128": (ResNet(num_blocks=8, width=32), (1, 8, 8), 128)}
    if resnet18:
        import torchvision

        found["torchvision ResNet-18 (3x32x32), batch 64"] = (
            torchvision.models.resnet18(num_classes=10), (3, 32, 32), 64
        )
    return found


ARMS: dict[str, Callable[[], list[pl.Callback]]] = {
    "bare": lambda: [],
    "CriticalPeriodMonitor (defaults)": lambda: [CriticalPeriodMonitor()],
    "FisherTraceMonitor (defaults)": lambda: [FisherTraceMonitor(log_images=False)],
}


def seconds_per_step(net: nn.Module, shape: tuple[int, ...], batch: int, steps: int, arm: str) -> float:
    g = torch.Generator().manual_seed(1)
    n = batch * steps
    data = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*ARMS[arm](), clock],
    )
    trainer.fit(Classifier(copy.deepcopy(net)), DataLoader(data, batch_size=batch))
    return (clock.end - clock.start) / clock.steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resnet18", action="store_true")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    print(f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch"
          f" {torch.__version__}; load average before: {os.getloadavg()[0]:.2f}")
    for name, (net, shape, batch) in models(args.resnet18).items():
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        seconds_per_step(net, shape, batch, 3, "bare")  # warm-up, not counted (first-call allocations)
        for _ in range(args.rounds):
            for arm in ARMS:
                times[arm].append(seconds_per_step(net, shape, batch, args.steps, arm))
        bare = statistics.median(times["bare"])
        print(f"\n### {name}, {args.steps} steps, {args.rounds} rounds\n")
        print("| arm | ms per step | spread over rounds (ms) | x bare |")
        print("|---|---|---|---|")
        for arm, values in times.items():
            median = statistics.median(values)
            print(f"| {arm} | {1e3 * median:.1f} | {1e3 * (max(values) - min(values)):.1f} | {median / bare:.3f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
