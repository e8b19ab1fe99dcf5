"""Fixup on the network it was made for: a deep ResNet without normalisation (Zhang et al. 2019).

The demo ResNet with ``norm: none`` (Fixup's scalar biases and multiplier, no BatchNorm anywhere), ``--blocks`` residual
blocks of width ``--width``, on the embedded digits; SGD lr 0.1, momentum 0.9, weight decay 5e-4 (Zhang et al.'s
CIFAR-10 settings), batch 64, gradients not clipped. Three arms, the same seeds: ``he_normal`` and ``fixup`` on the
normalisation-free network, and ``he_normal`` on the same depth with BatchNorm (``norm: batch``) as the reference a
normalised network gives. Per arm: the mean training loss of the first and last epoch, validation accuracy after the
last epoch, and how many seeds diverged (a non-finite loss: that run stops there), mean ± std over seeds.

    python benchmarks/fixup.py [--blocks 32] [--width 8] [--epochs 8] [--seeds 0 1 2] [--arms he fixup batch]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch

from lightning_startwell import DigitsDataModule, InitScheme, ResNet

ARMS = {
    "he": ("norm: none, he_normal", "none", "he_normal"),
    "fixup": ("norm: none, fixup", "none", "fixup"),
    "batch": ("norm: batch, he_normal (reference)", "batch", "he_normal"),
}


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


class Record(pl.Callback):
    """Mean training loss of each epoch (non-finite if any step was) and validation accuracy after each epoch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val_acc: list[float] = []
        self._epoch: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch.append(float(outputs["loss"]))
        if not math.isfinite(self._epoch[-1]):  # diverged: the rest would be NaN arithmetic, slow and meaningless
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.losses.append(sum(self._epoch) / len(self._epoch))
        self._epoch = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.val_acc.append(float(trainer.callback_metrics["val/acc"]))


def run(norm: str, scheme: str, blocks: int, width: int, seed: int, epochs: int) -> Record:
    pl.seed_everything(seed, verbose=False)
    record = Record()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[InitScheme(scheme, seed=seed), record],
    )
    model = ResNet(num_blocks=blocks, width=width, norm=norm, optimizer=sgd)
    trainer.fit(model, DigitsDataModule(batch_size=64, seed=seed))
    return record


def summary(values: list[float], scale: float = 1.0) -> str:
    finite = [scale * v for v in values if math.isfinite(v)]
    if not finite:
        return "not finite"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    text = f"{statistics.mean(finite):.3g} ± {std:.2g}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)} finite)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    header = ["arm", "train loss, epoch 1", f"train loss, epoch {args.epochs}", "final val acc (%)", "diverged"]
    header.append("s per run")
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for name, norm, scheme in (ARMS[arm] for arm in args.arms):
        start = time.perf_counter()
        records = [run(norm, scheme, args.blocks, args.width, seed, args.epochs) for seed in args.seeds]
        seconds = (time.perf_counter() - start) / len(args.seeds)
        diverged = [r for r in records if len(r.losses) < args.epochs or not math.isfinite(r.losses[-1])]
        finished = [r for r in records if r not in diverged]
        cells = [summary([r.losses[0] for r in records])]
        cells += [summary([r.losses[-1] for r in finished]) if finished else "—"]
        cells += [summary([r.val_acc[-1] for r in finished], 100) if finished else "—"]
        cells += [f"{len(diverged)} of {len(records)}", f"{seconds:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
