"""The study's report: the verdict of every claim of the study first, then per experiment a figure (PNG, matplotlib's
Agg backend) and a table of mean ± std per cell with the paired test against the cell's reference, in ``report.md``."""

from __future__ import annotations

import dataclasses
import math
import statistics
import textwrap
from pathlib import Path
from typing import Any, Optional, cast

from lightning_startwell.study.config import NO_DEFICIT, PARAMETERS, Claim, ClaimComparison, Experiment, RunSpec, Study
from lightning_startwell.study.results import read_curves, read_fisher, read_results
from lightning_startwell.study.stats import ALPHA, Comparison, detectable_effect, holm, paired_comparison


def method_statement(seed_counts: list[int]) -> str:
    """How the cells are compared, with the seed counts and degrees of freedom that ``seed_counts`` (the number of
    paired seeds of each comparison) actually have, and the power they give."""
    counts = sorted(set(seed_counts))
    if not counts:
        return "No comparison has finished runs yet."
    seeds = " or ".join(str(n) for n in counts)
    dfs = " or ".join(str(n - 1) for n in counts)
    power = "; ".join(
        f"{n} seeds: {detectable_effect(n, 1.0):.2g} standard deviations" for n in counts if n >= 2
    )
    return (
        f"Each cell is compared with its reference seed by seed (same seed: same initialisation, split and data order)"
        f" on the final test accuracy, by a two-sided paired t-test (scipy.stats.ttest_rel) with its 95 % confidence"
        f" interval, and by the exact sign-flip permutation test, which needs no normality and is the one used where"
        f" every per-seed difference is the same (the t-test is then undefined). A difference is called significant"
        f" when its p-value, Holm–Bonferroni adjusted over the comparisons of its experiment, is below {ALPHA}. The"
        f" comparisons here pair {seeds} seeds: the t-test has {dfs} degrees of freedom, and detects with 80 % power"
        f" a mean difference of ({power}) of the per-seed differences (the column 'detectable' gives it in points);"
        f" 'not significant' does not mean 'no effect'."
    )


@dataclasses.dataclass(frozen=True)
class CellResult:
    """A cell of an experiment, its comparison with its reference and the Holm-adjusted p-value."""

    cell: RunSpec
    reference: RunSpec
    comparison: Comparison
    p_holm: float


#: The rows of a study by cell (seed -1) and seed.
BySeed = dict[RunSpec, dict[int, dict[str, Any]]]


def _by_seed(rows: list[dict[str, Any]]) -> BySeed:
    cells: BySeed = {}
    fields = [f.name for f in dataclasses.fields(RunSpec)]
    for row in rows:
        run = RunSpec(**{f: row[f] for f in fields})
        cells.setdefault(run.without_seed(), {})[run.seed] = row
    return cells


def experiment_results(study: Study, experiment: Experiment, rows: list[dict[str, Any]]) -> list[CellResult]:
    """Every cell of ``experiment`` with at least one finished run, compared with its reference."""
    by_cell = _by_seed(rows)
    pairs = []
    for cell in experiment.cells(study.defaults):
        reference = experiment.reference_of(cell, study.defaults)
        runs, reference_runs = by_cell.get(cell, {}), by_cell.get(reference, {})
        if runs:
            accuracy = {seed: row["test_acc"] for seed, row in runs.items()}
            reference_accuracy = {seed: row["test_acc"] for seed, row in reference_runs.items()}
            pairs.append((cell, reference, paired_comparison(accuracy, reference_accuracy)))
    adjusted = holm([c.p if cell != reference else math.nan for cell, reference, c in pairs])
    return [CellResult(cell, reference, c, p) for (cell, reference, c), p in zip(pairs, adjusted, strict=True)]


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"


def _label(experiment: Experiment, cell: RunSpec) -> str:
    parts = [f"{experiment.x} = {getattr(cell, experiment.x)}"]
    if experiment.series:
        parts.append(f"{experiment.series} = {getattr(cell, experiment.series)}")
    if cell.deficit != NO_DEFICIT and experiment.x != "deficit":
        parts.append(cell.deficit)
    if cell.fisher_probe != "clean" and "fisher_probe" not in (experiment.x, experiment.series):
        parts.append(f"Fisher probe {cell.fisher_probe}")
    return ", ".join(parts)


def _describe(cell: RunSpec) -> str:
    deficit = (
        "no deficit"
        if cell.deficit == NO_DEFICIT
        else f"{cell.deficit} on epochs [{cell.onset}, {cell.onset + cell.length})"
    )
    lr = f"lr {cell.lr:g} x {cell.lr_decay:g}/epoch" if cell.lr_schedule == "decay" else f"constant lr {cell.lr:g}"
    if cell.lr_offset:
        lr += f" from epoch {cell.lr_offset} of the decay"
    if cell.lr_schedule == "cosine":
        lr = f"lr {cell.lr:g}, {cell.warmup_epochs}-epoch warm-up then cosine"
    probe = ", Fisher on the training inputs" if cell.fisher_probe == "training" else ""
    optimizer = ", AdamW" if cell.optimizer == "adamw" else ""
    return (
        f"{deficit}, {cell.epochs} epochs, wd {cell.weight_decay:g}{_timing(cell, 'wd')}, depth {cell.depth}, {lr}"
        f"{optimizer}{probe}" + (f", dropout {cell.dropout:g}{_timing(cell, 'dropout')}" if cell.dropout else "")
    )


def _timing(cell: RunSpec, which: str) -> str:
    """`` early until 0.1667`` / `` late from the detected end of the critical period``: when a schedule applies."""
    mode = cell.wd_mode if which == "wd" else cell.dropout_mode
    if mode in ("throughout", "standard"):
        return ""
    shape = " (linear decay)" if which == "dropout" and cell.dropout_shape == "linear" else ""
    cutoff = {
        "fixed": f"{cell.cutoff:g} of training",
        "critical_period": "the detected end of the critical period",
        "random": "a random fraction of training",
    }[cell.cutoff_signal]
    return f" {mode}{shape} {'until' if mode == 'early' else 'from'} {cutoff}"


def _p(p: float, same: bool) -> str:
    return "–" if same or math.isnan(p) else f"{p:.3g}"


def _points(value: float, scale: float = 100.0) -> str:
    return "–" if math.isnan(value) else f"{scale * value:.2f}" if scale == 100 else f"{scale * value:.4f}"


def _interval(low: float, high: float, scale: float = 100.0) -> str:
    return "–" if math.isnan(low) else f"[{_points(low, scale)}, {_points(high, scale)}]"


def table(experiment: Experiment, results: list[CellResult], rows: list[dict[str, Any]]) -> str:
    """The markdown table of an experiment."""
    lines = [
        "| cell | seeds | test accuracy (%) | reference | reference accuracy (%) | difference (points)"
        " | 95 % CI (points) | detectable (points) | p (paired t) | p (sign-flip) | p (Holm) | significant"
        " | train accuracy (%) | train loss | cutoff applied (fraction) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_cell = _by_seed(rows)
    for r in results:
        c = r.comparison
        same = r.cell == r.reference
        significant = "–" if same or math.isnan(r.p_holm) else ("yes" if r.p_holm < ALPHA else "no")
        difference = "–" if same else _pct(c.difference_mean, c.difference_std)
        lines.append(
            f"| {_label(experiment, r.cell)} | {c.seeds} | {_pct(c.mean, c.std)} |"
            f" {'itself' if same else _describe(r.reference)} | {_pct(c.reference_mean, c.reference_std)} |"
            f" {difference} | {'–' if same else _interval(c.ci_low, c.ci_high)} |"
            f" {'–' if same else _points(c.detectable)} | {_p(c.p_t, same)} | {_p(c.p_sign_flip, same)} |"
            f" {_p(r.p_holm, same)} | {significant} | {_cell_mean(by_cell, r.cell, 'train_acc', 100)} |"
            f" {_cell_mean(by_cell, r.cell, 'train_loss', 1)} | {_cutoffs(by_cell, r.cell)} |"
        )
    return "\n".join(lines)


def _cell_values(by_cell: BySeed, cell: RunSpec, column: str) -> list[float]:
    return [row[column] for row in by_cell.get(cell, {}).values() if not math.isnan(row[column])]


def _cell_mean(by_cell: BySeed, cell: RunSpec, column: str, scale: float) -> str:
    values = _cell_values(by_cell, cell, column)
    if not values:
        return "–"
    spread = f" ± {scale * statistics.stdev(values):.3g}" if len(values) > 1 else ""
    return f"{scale * statistics.mean(values):.3g}{spread}"


def _cutoffs(by_cell: BySeed, cell: RunSpec) -> str:
    """The cutoff a cell's schedules switched at (mean ± std over its seeds, and how many runs never reached one)."""
    if not cell.has_cutoff:
        return "–"
    runs = len(by_cell.get(cell, {}))
    reached = _cell_values(by_cell, cell, "cutoff_used")
    never = f"; {runs - len(reached)} of {runs} runs none" if len(reached) < runs else ""
    return (_cell_mean(by_cell, cell, "cutoff_used", 1) if reached else "none") + never


VERDICT_RULE = (
    "A claim's comparisons are one family: their p-values (paired t-test, or the exact sign-flip test where every"
    " per-seed difference is equal) are Holm–Bonferroni adjusted within the claim only, and a trained run is tested"
    " once in a family. A comparison is **reproduced** when its adjusted p is below {alpha} in the expected direction"
    " (`lower`: a negative mean difference, `higher`: a positive one), **opposite** when it is below {alpha} in the"
    " other direction, and **inconclusive** otherwise. For `no_loss` (no lasting loss) it is **reproduced** when the"
    " lower bound of the 95 % confidence interval of the difference is above minus the claim's margin, else"
    " **opposite** when the difference is a significant loss (adjusted p below {alpha}, negative mean), else"
    " **inconclusive**. A comparison with fewer than 2 seeds where all its runs finished says **runs missing**. A claim"
    " is reproduced when every comparison is, opposite when at least one is and none is reproduced, runs missing"
    " when every comparison is, inconclusive otherwise; a claim without a paired comparison is **not tested**, with"
    " the reason. Effects are the mean of the"
    " per-seed differences of the claim's measure (points of accuracy, nats of loss), with their 95 % confidence"
    " interval; 'detectable' is the"
    " smallest true difference the design finds with 80 % power at the measured spread of the differences"
    " (stats.detectable_effect): an inconclusive claim whose effect is below it was not given the power to decide."
)


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    """One comparison of a claim: its paired comparison, its Holm-adjusted p within the claim, its verdict, and the
    number of its runs (seeds x runs compared) that finished and that the study asks for."""

    comparison: ClaimComparison
    result: Comparison
    p_holm: float
    verdict: str
    runs_done: int
    runs_expected: int


#: How a measure's differences are shown: the factor applied and the unit (accuracies in points, losses in nats).
UNITS = {"test_acc": (100.0, "points"), "train_acc": (100.0, "points"), "train_loss": (1.0, "nats")}


def comparison_verdict(
    expect: str, result: Comparison, p_holm: float, margin: float = 0.0, measure: str = "test_acc"
) -> str:
    """The verdict of one comparison (see ``VERDICT_RULE``); ``margin`` in the measure's unit (points of accuracy,
    nats of loss), for ``no_loss``."""
    if result.seeds < 2:
        return "runs missing"
    significant = not math.isnan(p_holm) and p_holm < ALPHA
    mean = result.difference_mean
    if expect == "no_loss":
        if not math.isnan(result.ci_low) and UNITS[measure][0] * result.ci_low > -margin:
            return "reproduced"
        return "opposite" if significant and mean < 0 else "inconclusive"
    if not significant or mean == 0:
        return "inconclusive"
    return "reproduced" if (mean < 0) == (expect == "lower") else "opposite"


def claim_verdict(claim: Claim, results: list[ClaimResult]) -> str:
    """The claim's verdict from its comparisons' (see ``VERDICT_RULE``)."""
    if not claim.comparisons:
        return "not tested"
    verdicts = [r.verdict for r in results]
    if all(v == "runs missing" for v in verdicts):
        return "runs missing"
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    if "opposite" in verdicts and "reproduced" not in verdicts:
        return "opposite"
    return "inconclusive"


def claim_results(study: Study, claim: Claim, rows: list[dict[str, Any]]) -> list[ClaimResult]:
    """Every comparison of ``claim`` on the finished runs in ``rows``, Holm-adjusted within the claim."""
    by_cell = _by_seed(rows)

    def accuracy(cell: RunSpec) -> dict[int, float]:
        return {seed: row[claim.measure] for seed, row in by_cell.get(cell, {}).items() if seed in study.seeds}

    measured = []
    for comparison in claim.comparisons:
        runs = [accuracy(cell) for cell in comparison.runs()]
        seeds = sorted(set.intersection(*(set(r) for r in runs)))
        if comparison.versus:  # (cell - reference) against (versus cell - versus reference), seed by seed
            first = {s: runs[0][s] - runs[1][s] for s in seeds}
            second = {s: runs[2][s] - runs[3][s] for s in seeds}
        else:  # cell against reference
            first, second = {s: runs[0][s] for s in seeds}, {s: runs[1][s] for s in seeds}
        done = sum(len(r) for r in runs)
        measured.append((comparison, paired_comparison(first, second), done, len(runs) * len(study.seeds)))
    adjusted = holm([c.p if c.seeds >= 2 else math.nan for _, c, _, _ in measured])
    return [
        ClaimResult(
            comparison, c, p, comparison_verdict(claim.expect, c, p, claim.margin, claim.measure), done, expected
        )
        for (comparison, c, done, expected), p in zip(measured, adjusted, strict=True)
    ]


def _value(run: RunSpec, name: str) -> str:
    value = getattr(run, name)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _differences(a: RunSpec, b: RunSpec) -> list[str]:
    """The parameters where ``a`` and ``b`` differ, ``name a vs b`` (the blur size only where both blur)."""
    skip = {"seed", "size"} if a.deficit != b.deficit else {"seed"}
    differ = [k for k in PARAMETERS if k not in skip and getattr(a, k) != getattr(b, k)]
    return [f"{k} {_value(a, k)} vs {_value(b, k)}" for k in differ]


def _setting(a: RunSpec, b: RunSpec) -> str:
    return ", ".join(f"{k} {_value(a, k)}" for k in PARAMETERS if k != "seed" and getattr(a, k) != getattr(b, k))


def comparison_label(comparison: ClaimComparison, defaults: Optional[dict[str, Any]] = None) -> str:
    """What a claim's comparison compares, in words: the experiment, the parameters that differ, and (with the
    study's ``defaults``) the parameters both sides share that are not the defaults' (a constant rate, a long clean
    phase)."""
    cell, reference = comparison.cell, comparison.reference
    label = "; ".join(_differences(cell, reference))
    if comparison.versus:
        other = comparison.versus[0]
        label = f"({label}) at {_setting(cell, other)} minus the same at {_setting(other, cell)}"
    if defaults is not None:
        shown = {k for k in PARAMETERS if getattr(cell, k) != getattr(reference, k)}
        if comparison.versus:
            shown |= {k for k in PARAMETERS if getattr(cell, k) != getattr(comparison.versus[0], k)}
        base = RunSpec(**{**defaults, "seed": -1})
        shared = [f"{k} {_value(cell, k)}" for k in PARAMETERS
                  if k not in shown | {"seed", "epochs", "size", "deficit", "fisher_probe"}
                  and getattr(cell, k) != getattr(base, k)]
        if shared:
            label += f" (both: {', '.join(shared)})"
    return f"{comparison.experiment}: {label}"


def verdict_table(study: Study, rows: list[dict[str, Any]]) -> str:
    """The verdict of every claim of ``study`` on ``rows``: a markdown table, its rule below it."""
    if not study.claims:
        return "This study declares no claims (a `claims:` section in its YAML, docs/study.md)."
    lines = [
        "| claim | the paper reports | comparison | our effect [95 % CI] | p (Holm, within the claim)"
        " | detectable at 80 % power | verdict | claim's verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for claim in study.claims:
        results = claim_results(study, claim, rows)
        verdict = claim_verdict(claim, results)
        scale, unit = UNITS[claim.measure]
        margin = f", margin {claim.margin:g} {unit}" if claim.expect == "no_loss" else ""
        expected = f"{claim.measure.replace('_', ' ')}, expected: {claim.expect}{margin}"
        if not results:
            lines.append(f"| {claim.name} | {claim.paper} | – ({claim.not_tested}) | – | – | – | – | {verdict} |")
        for i, r in enumerate(results):
            c = r.result
            effect = (
                "–" if c.seeds < 2
                else f"{_points(c.difference_mean, scale)} {_interval(c.ci_low, c.ci_high, scale)} {unit}"
            )
            missing = (f" ({r.runs_expected - r.runs_done} of {r.runs_expected} runs missing)"
                       if r.runs_done < r.runs_expected else "")
            first = i == 0
            lines.append(
                f"| {claim.name if first else ''} | {claim.paper + ' (' + expected + ')' if first else ''} |"
                f" {comparison_label(r.comparison, study.defaults)} | {effect} | {_p(r.p_holm, False)}"
                f"{f' (of {len(results)})' if not math.isnan(r.p_holm) else ''} |"
                f" {_points(c.detectable, scale)} {unit} |"
                f" {r.verdict}{missing} | {verdict if first else ''} |"
            )
    return "\n".join(lines) + "\n\n" + VERDICT_RULE.format(alpha=ALPHA)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy(experiment: Experiment, results: list[CellResult], rows: list[dict[str, Any]], path: Path) -> None:
    """``curve``: test accuracy against the x parameter, a line per series; ``bars``: a bar per cell. Seeds as dots,
    references not among the cells as dashed lines (mean) over a band (± std)."""
    plt = _pyplot()
    by_cell = _by_seed(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    series_values = sorted({getattr(r.cell, experiment.series) for r in results}) if experiment.series else [None]
    shown_references = set()
    for i, value in enumerate(series_values):
        series = cast(str, experiment.series)  # a value other than None only when there is a series
        chosen = [r for r in results if value is None or getattr(r.cell, series) == value]
        if experiment.plot == "bars":
            xs = list(range(len(chosen)))
            ax.set_xticks(xs, [str(getattr(r.cell, experiment.x)) for r in chosen], rotation=20)
        else:
            xs = [getattr(r.cell, experiment.x) for r in chosen]
        means = [100 * r.comparison.mean for r in chosen]
        stds = [100 * (r.comparison.std if not math.isnan(r.comparison.std) else 0) for r in chosen]
        label = f"{experiment.series} = {value}" if value is not None else "mean ± std over seeds"
        color = f"C{i}"
        if experiment.plot == "bars":
            ax.bar(xs, means, yerr=stds, capsize=3, color=color, alpha=0.6, label=label)
        else:
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=color, label=label)
        for x, r in zip(xs, chosen, strict=True):
            seeds = by_cell.get(r.cell, {})
            ax.scatter(
                [x] * len(seeds), [100 * row["test_acc"] for row in seeds.values()], s=10, color=color, alpha=0.5
            )
        for r in chosen:
            if r.reference in {c.cell for c in results} or r.reference in shown_references:
                continue
            shown_references.add(r.reference)
            c = r.comparison
            ax.axhline(
                100 * c.reference_mean,
                color=color,
                linestyle="--",
                linewidth=1,
                label=f"reference: {_describe(r.reference)}",
            )
            if not math.isnan(c.reference_std):
                ax.axhspan(
                    100 * (c.reference_mean - c.reference_std),
                    100 * (c.reference_mean + c.reference_std),
                    color=color,
                    alpha=0.1,
                )
    ax.set_xlabel(experiment.x)
    ax.set_ylabel("final test accuracy (%)")
    _finish(fig, ax, experiment, path)


def _finish(fig: Any, ax: Any, experiment: Experiment, path: Path) -> None:
    ax.set_title(textwrap.fill(experiment.title, 75), fontsize=9)  # long titles wrap inside the figure
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _mean_curves(cell: RunSpec, seeds: list[int], fisher: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per layer (and ``total``), the mean over the seeds that have it of the Fisher curve of ``cell``."""
    curves: dict[str, list[list[float]]] = {}
    for seed in seeds:
        for layer, values in fisher.get(dataclasses.replace(cell, seed=seed).run_id, {}).items():
            curves.setdefault(layer, []).append(values)
    # the epochs every seed reached: a seed's curve may be shorter (strict=False keeps the old truncation)
    return {layer: [statistics.mean(v) for v in zip(*runs, strict=False)] for layer, runs in curves.items()}


def _plot_curves(
    study: Study, experiment: Experiment, results: list[CellResult], curves: dict[str, list[float]], path: Path
) -> bool:
    """The test accuracy after every epoch (mean over the seeds, a band of ± std) of every cell of ``experiment`` and
    of the references it is compared with: recovery after a deficit, and whether it levelled off. False (nothing
    drawn) when no run of the experiment recorded its curve."""
    cells = list(dict.fromkeys([c for r in results for c in (r.cell, r.reference)]))
    drawn = []
    for cell in cells:
        run_ids = [dataclasses.replace(cell, seed=s).run_id for s in study.seeds]
        runs = [curves[run_id] for run_id in run_ids if run_id in curves]
        if runs:
            drawn.append((cell, runs))
    if not drawn:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for i, (cell, runs) in enumerate(drawn):
        length = min(len(r) for r in runs)
        means = [100 * statistics.mean(r[e] for r in runs) for e in range(length)]
        stds = [100 * statistics.stdev(r[e] for r in runs) if len(runs) > 1 else 0.0 for e in range(length)]
        epochs = range(1, length + 1)
        color = f"C{i % 10}"
        ax.plot(epochs, means, color=color, linewidth=1, label=textwrap.fill(_describe(cell), 80))
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], color=color, alpha=0.12)
        if cell.deficit != NO_DEFICIT:
            ax.axvline(cell.onset + cell.length, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("epoch (dotted: the end of a deficit)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    title = f"Test accuracy after every epoch — {experiment.title}"
    ax.set_title(textwrap.fill(title, 85), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _shade_deficit(ax: Any, cell: RunSpec) -> None:
    if cell.deficit != NO_DEFICIT:
        ax.axvspan(cell.onset, cell.onset + cell.length, color="grey", alpha=0.15)


def _plot_fisher(study: Study, experiment: Experiment, fisher: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, cell in enumerate(experiment.cells(study.defaults)):
        total = _mean_curves(cell, study.seeds, fisher).get("total")
        if total:
            ax.plot(range(len(total)), total, color=f"C{i}", label=textwrap.fill(_describe(cell), 70))
            _shade_deficit(ax, cell)
    ax.set_yscale("log")
    ax.set_xlabel("epoch (0: initialisation; shaded: deficit)")
    ax.set_ylabel("trace of the Fisher information")
    _finish(fig, ax, experiment, path)


def _plot_fisher_layers(study: Study, experiment: Experiment, fisher: dict[str, Any], path: Path) -> None:
    """A heatmap per cell, layer x epoch, each layer divided by its largest value over all the cells shown (so a
    layer's colours compare across the panels, and every layer uses the whole scale)."""
    plt = _pyplot()
    cells = experiment.cells(study.defaults)
    curves = [_mean_curves(cell, study.seeds, fisher) for cell in cells]
    layers = sorted({layer for c in curves for layer in c if layer != "total"}, key=_layer_order)
    if not layers:
        return
    peak = {layer: max(max(c.get(layer, [0.0])) for c in curves) or 1.0 for layer in layers}
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 0.35 * len(layers) + 1.8), squeeze=False)
    for ax, cell, curve in zip(axes[0], cells, curves, strict=True):
        width = max(len(v) for v in curve.values()) if curve else 1
        grid = [[v / peak[layer] for v in curve.get(layer, [math.nan] * width)] for layer in layers]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xlabel("epoch (0: initialisation)")
        ax.set_title(textwrap.fill(_describe(cell), 45), fontsize=7)
        if cell.deficit != NO_DEFICIT:
            ax.axvline(cell.onset + cell.length, color="white", linestyle="--", linewidth=1)
    fig.colorbar(image, ax=axes[0].tolist(), label="Fisher trace of the layer / its peak over the panels")
    fig.suptitle(textwrap.fill(experiment.title, 110), fontsize=10, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _layer_order(name: str) -> tuple[Any, ...]:
    """Layers in network order: numeric parts of the module path compared as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def seconds_per_epoch(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Measured wall seconds per training epoch (fit time / epochs, Fisher measurements included), mean by depth."""
    by_depth: dict[int, list[float]] = {}
    for row in rows:
        by_depth.setdefault(row["depth"], []).append(row["seconds"] / row["epochs"])
    return {depth: statistics.mean(v) for depth, v in sorted(by_depth.items())}


def per_epoch_at(depth: int, per_epoch: dict[int, float]) -> float:
    """Seconds per epoch at ``depth`` from the depths measured in ``per_epoch``: the measurement itself, linear
    interpolation between the two measured depths around it, or the nearest measured depth outside their range. Not
    proportional to depth: loading, validation and the Fisher measurement cost as much as the layers (measured on
    the `full` profile's cells: 0.71 s per epoch at depth 3, 0.79-0.92 s at depth 6)."""
    if depth in per_epoch:
        return per_epoch[depth]
    below = [d for d in per_epoch if d < depth]
    above = [d for d in per_epoch if d > depth]
    if not below or not above:
        return per_epoch[min(per_epoch, key=lambda d: abs(d - depth))]
    low, high = max(below), min(above)
    return per_epoch[low] + (per_epoch[high] - per_epoch[low]) * (depth - low) / (high - low)


def estimate_seconds(study: Study, per_epoch: dict[int, float]) -> Optional[float]:
    """Training time of every run of ``study`` at the measured ``per_epoch`` seconds (see :func:`per_epoch_at`)."""
    if not per_epoch:
        return None
    return sum((run.epochs or 0) * per_epoch_at(run.depth, per_epoch) for run in study.runs())


def write_report(study: Study, out: Path, command: str = "") -> Path:
    """Write ``out/report.md`` and its figures ``out/<experiment>.png`` from the tables in ``out``."""
    rows = read_results(out)
    fisher = read_fisher(out)
    curves = read_curves(out)
    runs = study.runs()
    done = {row["run_id"] for row in rows}
    per_epoch = seconds_per_epoch(rows)
    lines = [
        f"# Study `{study.name}`",
        "",
        f"{len(done & {r.run_id for r in runs})} of {len(runs)} runs finished ({len(study.seeds)} seeds:"
        f" {study.seeds}). " + (f"Command: `{command}`." if command else ""),
        "",
        "## Verdicts",
        "",
        verdict_table(study, rows),
        "",
        "Measured training time per epoch (fit wall time / epochs, the callbacks' measurements included), by depth: "
        + ", ".join(f"depth {d}: {s:.2f} s" for d, s in per_epoch.items())
        + f"; {sum(r['seconds'] for r in rows) / 60:.1f} min of training in all.",
        "",
        "Defaults of every run: " + ", ".join(f"{k} = {v}" for k, v in study.defaults.items()) + ".",
        "",
        "**Statistics.** " + method_statement(
            [r.comparison.seeds for e in study.experiments for r in experiment_results(study, e, rows)
             if r.cell != r.reference]
        ),
        "",
    ]
    for experiment in study.experiments:
        results = experiment_results(study, experiment, rows)
        figure = out / f"{experiment.name}.png"
        if experiment.plot in ("curve", "bars") and results:
            _plot_accuracy(experiment, results, rows, figure)
        elif experiment.plot == "fisher":
            _plot_fisher(study, experiment, fisher, figure)
        elif experiment.plot == "fisher_layers":
            _plot_fisher_layers(study, experiment, fisher, figure)
        lines += [f"## {experiment.title}", ""]
        if experiment.note:
            lines += [experiment.note.strip(), ""]
        if figure.exists():
            lines += [f"![{experiment.title}]({figure.name})", ""]
        recovery = out / f"{experiment.name}_curves.png"
        if experiment.plot in ("curve", "bars") and _plot_curves(study, experiment, results, curves, recovery):
            lines += [f"![Test accuracy after every epoch: {experiment.title}]({recovery.name})", ""]
        if results:
            lines += [table(experiment, results, rows), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
