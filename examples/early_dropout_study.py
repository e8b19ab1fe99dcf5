"""Early dropout on an underfitting model (Liu et al. 2023): no dropout, standard, early and late dropout, several
seeds; final training loss, validation accuracy and the gradient dynamics of GradientDynamicsMonitor.

Every arm trains the same seeded small MLP on MNIST-1D (generated offline) with the same data order per seed; only the
dropout schedule differs (DropoutSchedule: ``standard`` p all along, ``early`` linear from p to 0 at the cutoff,
``late`` 0 then p; the cutoff is the paper's epoch 50 of 300, 1/6 of training). The monitor measures the gradient norm,
the distance from the initial weights and the gradient direction variance and error on a fixed probe of 8 mini-batches.
After training, the training loss and accuracy are measured on the whole training split in eval mode (no dropout), and
the validation and test accuracy likewise.

Resumable: each run writes ``runs/<arm>_s<seed>/result.json`` last and is skipped when it exists. Writes, under
``--out``: ``results.csv`` (a row per run), ``dynamics.csv`` (the monitor's curves), ``training.csv`` (the logged
training loss per epoch), ``final.png``, ``dynamics.png``, ``training.png`` and ``report.md`` (mean ± std over seeds,
two-sided paired t-tests against no dropout, Holm-adjusted per measure).

    python examples/early_dropout_study.py --out docs/early_dropout      # the committed study
    python examples/early_dropout_study.py --report-only --out docs/early_dropout
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from lightning_startwell import MLP, DropoutSchedule, GradientDynamicsMonitor, MNIST1DDataModule
from lightning_startwell.schedules import DEFAULT_CUTOFF_FRACTION
from lightning_startwell.study.stats import ALPHA, holm, paired_comparison

ARMS = ("none", "standard", "early", "late")
DYNAMICS = ("grad_norm", "distance", "direction_variance", "direction_error")
FINAL = ("train_loss", "train_acc", "val_acc", "test_acc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--p", type=float, default=0.1, help="dropout rate (the paper's early dropout on ViT-T: 0.1)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=10, help="cadence of the gradient dynamics")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("early_dropout_study"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables, figures and report")
    return parser.parse_args(argv)


def schedule(arm: str, p: float) -> list[pl.Callback]:
    if arm == "none":
        return []
    if arm == "standard":
        return [DropoutSchedule(p=p, mode="standard")]
    shape = "linear" if arm == "early" else "constant"
    return [DropoutSchedule(p=p, mode=arm, shape=shape, cutoff_fraction=DEFAULT_CUTOFF_FRACTION)]


def evaluate(model: torch.nn.Module, loader: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over ``loader``."""
    model.eval()
    loss = correct = total = 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(-1) == y).sum())
            total += len(y)
    return loss / total, correct / total


def train_one(args: argparse.Namespace, arm: str, seed: int, run_dir: Path) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    datamodule = MNIST1DDataModule(batch_size=args.batch_size, seed=seed)
    model = MLP(
        input_shape=MNIST1DDataModule.input_shape, num_classes=10, depth=args.depth, width=args.width, dropout=0.0,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
    )
    monitor = GradientDynamicsMonitor(num_batches=8, every_n_steps=args.every_n_steps, seed=seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=CSVLogger(run_dir, name="", version=""),
        callbacks=[*schedule(arm, args.p), monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=args.every_n_steps, deterministic=True,
    )
    start = time.time()
    trainer.fit(model, datamodule)
    seconds = time.time() - start
    datamodule.setup("test")
    train_loss, train_acc = evaluate(model, datamodule.train_dataloader())
    _, val_acc = evaluate(model, datamodule.val_dataloader())
    _, test_acc = evaluate(model, datamodule.test_dataloader())
    steps = trainer.global_step
    return {"arm": arm, "seed": seed, "train_loss": train_loss, "train_acc": train_acc, "val_acc": val_acc,
            "test_acc": test_acc, "steps": steps, "cutoff_step": round(DEFAULT_CUTOFF_FRACTION * steps),
            "seconds": round(seconds, 1)}


def run_all(args: argparse.Namespace) -> None:
    runs = [(arm, seed) for seed in args.seeds for arm in ARMS]
    for i, (arm, seed) in enumerate(runs, start=1):
        run_dir = args.out / "runs" / f"{arm}_s{seed}"
        if (run_dir / "result.json").exists():
            continue
        result = train_one(args, arm, seed, run_dir)
        aside = run_dir / "result.tmp"
        aside.write_text(json.dumps(result, indent=1))
        os.replace(aside, run_dir / "result.json")  # written last: a run without it is trained again
        print(f"[{i}/{len(runs)}] {arm} seed {seed}: train loss {result['train_loss']:.4f}, val acc"
              f" {result['val_acc']:.4f} in {result['seconds']} s", flush=True)


def read_runs(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Results, dynamics rows and training-loss rows of every finished run under ``out/runs``."""
    results, dynamics, training = [], [], []
    for result_path in sorted((out / "runs").glob("*/result.json")):
        result = json.loads(result_path.read_text())
        results.append(result)
        with open(result_path.parent / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                for tag in DYNAMICS:
                    value = row.get(f"startwell/dynamics/{tag}")
                    if value:
                        dynamics.append({"arm": result["arm"], "seed": result["seed"], "step": int(row["step"]),
                                         "tag": tag, "value": float(value)})
                if row.get("train/loss"):
                    training.append({"arm": result["arm"], "seed": result["seed"], "epoch": int(row["epoch"]),
                                     "value": float(row["train/loss"])})
    return results, dynamics, training


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def curves(rows: list[dict[str, Any]], arm: str, tag: str | None, x: str) -> dict[int, dict[int, float]]:
    """``{seed: {x: value}}`` of one arm (and one dynamics tag)."""
    found: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["arm"] == arm and (tag is None or row.get("tag") == tag):
            found.setdefault(row["seed"], {})[row[x]] = row["value"]
    return found


def early_phase_means(dynamics: list[dict[str, Any]], cutoff: int) -> dict[str, dict[str, dict[int, float]]]:
    """Per tag and arm, ``{seed: mean of the curve over the steps before the cutoff}`` (step 0 left out for the
    distance, which is 0 there by definition)."""
    means: dict[str, dict[str, dict[int, float]]] = {}
    for tag in DYNAMICS:
        for arm in ARMS:
            for seed, points in curves(dynamics, arm, tag, "step").items():
                values = [v for s, v in points.items() if s < cutoff and (s > 0 or tag != "distance")]
                if values:  # a cadence coarser than the cutoff measures nothing before it
                    means.setdefault(tag, {}).setdefault(arm, {})[seed] = statistics.mean(values)
    return means


def comparison_table(measure: str, by_arm: dict[str, dict[int, float]], scale: float = 1.0) -> list[str]:
    """Rows ``arm | mean ± std | difference vs none | p | p (Holm)`` for one measure."""
    others = [arm for arm in ARMS if arm != "none" and arm in by_arm]
    comparisons = {arm: paired_comparison(by_arm[arm], by_arm["none"]) for arm in others}
    adjusted = dict(zip(others, holm([comparisons[arm].p for arm in others]), strict=True))
    fmt = lambda mean, std: f"{scale * mean:.4g} ± {scale * std:.2g}"  # noqa: E731
    none_values = list(by_arm["none"].values())
    lines = [f"| {measure} | none | {fmt(statistics.mean(none_values), statistics.stdev(none_values))} | – | – | – |"]
    for arm in others:
        c = comparisons[arm]
        significant = "**" if adjusted[arm] < ALPHA else ""
        lines.append(
            f"| {measure} | {arm} | {fmt(c.mean, c.std)} | {significant}{scale * c.difference_mean:+.3g} ±"
            f" {scale * c.difference_std:.2g}{significant} | {c.p:.3g} | {adjusted[arm]:.3g} |"
        )
    return lines


def plot(out: Path, results: list[dict[str, Any]], dynamics: list[dict[str, Any]],
         training: list[dict[str, Any]], cutoff: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax: Any, runs: dict[int, dict[int, float]], color: str, label: str) -> None:
        xs = sorted(set.intersection(*(set(points) for points in runs.values())))
        values = [[runs[seed][x] for seed in runs] for x in xs]
        mean = [statistics.mean(v) for v in values]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.plot(xs, mean, color=color, label=label, linewidth=1.2)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=color,
            alpha=0.15,
        )

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, tag in zip(axes.flat, DYNAMICS, strict=True):
        for i, arm in enumerate(ARMS):
            band(ax, curves(dynamics, arm, tag, "step"), f"C{i}", arm)
        ax.axvline(cutoff, color="grey", linestyle="--", linewidth=1)
        ax.set_title(tag.replace("_", " "), fontsize=10)
        ax.set_xlabel("optimizer step (dashed: the early/late cutoff)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gradient dynamics, mean ± std over seeds (GradientDynamicsMonitor)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "dynamics.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, arm in enumerate(ARMS):
        band(ax, curves(training, arm, None, "epoch"), f"C{i}", arm)
    ax.set_xlabel("epoch")
    ax.set_ylabel("logged training loss (train mode, epoch mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, measure, label in (
        (axes[0], "train_loss", "final training loss (eval mode)"),
        (axes[1], "val_acc", "final validation accuracy"),
    ):
        for i, arm in enumerate(ARMS):
            values = [r[measure] for r in results if r["arm"] == arm]
            ax.bar(
                i,
                statistics.mean(values),
                yerr=statistics.stdev(values) if len(values) > 1 else 0,
                capsize=3,
                color=f"C{i}",
                alpha=0.6,
            )
            ax.scatter([i] * len(values), values, s=10, color="black")
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        lows = [r[measure] for r in results]
        ax.set_ylim(min(lows) - 0.1 * (max(lows) - min(lows) + 1e-9), max(lows) + 0.1 * (max(lows) - min(lows) + 1e-9))
    fig.tight_layout()
    fig.savefig(out / "final.png", dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, command: str) -> Path:
    out = args.out
    results, dynamics, training = read_runs(out)
    write_csv(out / "results.csv", sorted(results, key=lambda r: (ARMS.index(r["arm"]), r["seed"])))
    write_csv(out / "dynamics.csv", dynamics)
    write_csv(out / "training.csv", training)
    cutoff = results[0]["cutoff_step"]
    plot(out, results, dynamics, training, cutoff)
    seeds = sorted({r["seed"] for r in results})
    lines = [
        "# Early dropout on an underfitting MLP (MNIST-1D)",
        "",
        f"Command: `{command}`. {len(results)} runs, seeds {seeds}; {results[0]['steps']} optimizer steps per run,"
        f" cutoff at step {cutoff}; {sum(r['seconds'] for r in results) / 60:.1f} min of training in all.",
        "",
        "Mean ± std over seeds. Each arm is compared with no dropout seed by seed (same seed: same initialisation,"
        f" split, data order and probe) by a two-sided paired t-test (scipy.stats.ttest_rel), Holm-adjusted over the"
        f" three arms of each measure; bold differences have an adjusted p below {ALPHA}. With {len(seeds)} seeds"
        f" the test has {len(seeds) - 1} degrees of freedom.",
        "",
        "## Final measures (after training, eval mode, whole splits)",
        "",
        "| measure | arm | mean ± std | difference vs none | p (paired t) | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for measure in FINAL:
        by_arm = {arm: {r["seed"]: r[measure] for r in results if r["arm"] == arm} for arm in ARMS}
        lines += comparison_table(measure, by_arm)
    lines += [
        "",
        f"## Gradient dynamics: mean of each curve over the steps before the cutoff (step < {cutoff})",
        "",
        "| measure | arm | mean ± std | difference vs none | p (paired t) | p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for tag, by_arm in early_phase_means(dynamics, cutoff).items():
        lines += comparison_table(tag, by_arm)
    lines += ["", "![final](final.png)", "", "![dynamics](dynamics.png)", "", "![training loss](training.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/early_dropout_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not args.report_only:
        run_all(args)
    print(f"report: {report(args, command.strip())}")


if __name__ == "__main__":
    main()
