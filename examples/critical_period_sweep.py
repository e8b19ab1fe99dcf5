"""Critical learning periods on embedded data (Achille et al. 2017): a deficit during the first N epochs, then a fixed
number of clean epochs; final test accuracy against N.

For every N in ``--removal-epochs`` and every seed, the same seeded 1-D ConvNet trains on MNIST-1D with the deficit on
epochs [0, N), then ``--clean-epochs`` epochs of clean data (the paper's protocol: the total is N + clean epochs), with
SGD, momentum 0.9, weight decay 5e-4 and the learning rate decayed by 0.97 each epoch as in the paper. Writes, under
``--out``: ``results.csv`` (one row per run), ``summary.csv`` (mean and spread over seeds per N),
``critical_period.png`` (final test accuracy against N), ``fisher_trace.png`` (the trace of the Fisher information
over training for each N, mean over seeds, measured by FisherTraceMonitor on 256 training signals every epoch; off with
``--no-fisher``) and the TensorBoard runs in ``tensorboard/``.

    python examples/critical_period_sweep.py                       # defaults: ~10 minutes on 2 CPU cores
    python examples/critical_period_sweep.py --deficit vertical_flip
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_startwell import ConvNet, DeficitInjector, FisherTraceMonitor, MNIST1DDataModule
from lightning_startwell.deficits import DEFICITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deficit", choices=DEFICITS, default="blur")
    parser.add_argument("--size", type=int, default=2, help="blur resolution (of 40 samples)")
    parser.add_argument("--noise-std", type=float, default=1.0)
    parser.add_argument("--removal-epochs", type=int, nargs="+", default=[0, 20, 40, 60])
    parser.add_argument("--clean-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lr-decay", type=float, default=0.97)
    parser.add_argument("--out", type=Path, default=Path("critical_period_runs"))
    parser.add_argument("--no-fisher", dest="fisher", action="store_false", help="skip the Fisher trace curves")
    return parser.parse_args(argv)


def train_one(args: argparse.Namespace, removal_epoch: int, seed: int) -> dict[str, float]:
    """One run: deficit on epochs [0, removal_epoch), then the clean epochs; returns the final accuracies."""
    pl.seed_everything(seed, verbose=False)
    model = ConvNet(
        input_shape=MNIST1DDataModule.input_shape,
        num_classes=10,
        channels=[32, 64, 64],
        kernel_size=5,
        optimizer=lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=args.lr_decay),
    )
    callbacks = []
    if removal_epoch > 0:
        callbacks.append(
            DeficitInjector(args.deficit, start_epoch=0, end_epoch=removal_epoch, size=args.size,
                            noise_std=args.noise_std, seed=seed, lr_warning_ratio=0.0)
        )
    if args.fisher:
        callbacks.append(FisherTraceMonitor(num_samples=256, batch_size=128, every_n_epochs=1, seed=seed))
    logger = TensorBoardLogger(args.out / "tensorboard", name=f"{args.deficit}_N{removal_epoch}", version=f"seed{seed}")
    trainer = pl.Trainer(
        max_epochs=removal_epoch + args.clean_epochs, accelerator="cpu", devices=1, logger=logger,
        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=10, deterministic=True,
    )
    datamodule = MNIST1DDataModule(batch_size=128, seed=seed)
    trainer.fit(model, datamodule)
    val_acc = float(trainer.callback_metrics["val/acc"])
    test = trainer.test(model, datamodule, verbose=False)[0]
    return {"test_acc": test["test/acc"], "val_acc": val_acc}


def write_outputs(args: argparse.Namespace, rows: list[dict[str, float]]) -> list[dict[str, float]]:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = []
    for n in args.removal_epochs:
        accs = [r["test_acc"] for r in rows if r["removal_epoch"] == n]
        summary.append({
            "removal_epoch": n, "mean_test_acc": statistics.mean(accs),
            "std_test_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min_test_acc": min(accs), "max_test_acc": max(accs), "seeds": len(accs),
        })
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return summary


def plot(args: argparse.Namespace, rows: list[dict[str, float]], summary: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter([r["removal_epoch"] for r in rows], [100 * r["test_acc"] for r in rows], s=12, alpha=0.5,
               label="one seed")
    ax.errorbar([s["removal_epoch"] for s in summary], [100 * s["mean_test_acc"] for s in summary],
                yerr=[100 * s["std_test_acc"] for s in summary], marker="o", capsize=3, label="mean ± std")
    ax.set_xlabel(f"deficit removed at epoch N ({args.deficit}), then {args.clean_epochs} clean epochs")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Critical period on MNIST-1D")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "critical_period.png", dpi=120)


def plot_fisher(args: argparse.Namespace) -> None:
    """Mean over seeds of the logged Fisher trace against the optimizer step, one curve per removal epoch N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for n in args.removal_epochs:
        curves = []
        for seed in args.seeds:
            run_dir = args.out / "tensorboard" / f"{args.deficit}_N{n}" / f"seed{seed}"
            acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
            acc.Reload()
            curves.append([(e.step, e.value) for e in acc.Scalars("startwell/fisher/trace")])
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, label=f"N = {n}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("trace of the Fisher information")
    ax.set_yscale("log")
    ax.set_title(f"Fisher trace, {args.deficit} removed at epoch N")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fisher_trace.png", dpi=120)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    rows = []
    start = time.time()
    for n in args.removal_epochs:
        for seed in args.seeds:
            result = train_one(args, n, seed)
            rows.append({"deficit": args.deficit, "removal_epoch": n, "seed": seed, **result})
            print(f"N={n:3d} seed={seed}: test acc {result['test_acc']:.4f}  ({time.time() - start:.0f} s)", flush=True)
    summary = write_outputs(args, rows)
    plot(args, rows, summary)
    if args.fisher:
        plot_fisher(args)
    for s in summary:
        print(f"N={s['removal_epoch']:3d}: test acc {s['mean_test_acc']:.4f} ± {s['std_test_acc']:.4f} over {s['seeds']} seeds")
    return summary


if __name__ == "__main__":
    main()
