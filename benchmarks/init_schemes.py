"""Early training with each initialisation scheme, side by side: the demo ResNet (3 blocks, width 32, dropout 0.1) on
the embedded digits, SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64; validation accuracy after each of the
first ``--epochs`` epochs, mean over ``--seeds``.

    python benchmarks/init_schemes.py [--epochs 3] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import lightning.pytorch as pl
import torch

from lightning_startwell import DigitsDataModule, InitScheme, ResNet

SCHEMES = {
    "PyTorch default": None,
    "he_normal": {"scheme": "he_normal"},
    "he_normal + zero_init_residual": {"scheme": "he_normal", "zero_init_residual": True},
    "orthogonal (relu gain)": {"scheme": "orthogonal", "nonlinearity": "relu"},
    "fixup": {"scheme": "fixup"},
    "lsuv": {"scheme": "lsuv"},
}


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class ValAccuracy(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val/acc"]))


def run(init: dict | None, seed: int, epochs: int) -> list[float]:
    pl.seed_everything(seed, verbose=False)
    record = ValAccuracy()
    callbacks = [record] + ([InitScheme(seed=seed, **init)] if init else [])
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(ResNet(num_blocks=3, width=32, dropout=0.1, optimizer=sgd), DigitsDataModule(batch_size=64, seed=seed))
    return record.values


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("| init | " + " | ".join(f"val acc after epoch {e + 1}" for e in range(args.epochs)) + " |")
    print("|---|" + "---|" * args.epochs)
    for name, init in SCHEMES.items():
        curves = [run(init, seed, args.epochs) for seed in args.seeds]
        cells = []
        for epoch in range(args.epochs):
            values = [100 * c[epoch] for c in curves]
            cells.append(f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
