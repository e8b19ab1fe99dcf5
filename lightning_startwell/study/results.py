"""The study's tables: one row per finished run in ``results.csv``, its Fisher curves in ``fisher.csv``, appended as
runs finish; finished runs read back from their directories (``runs/<run_id>/``), wherever they were trained."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from lightning_startwell.study.config import PARAMETERS, RunSpec

MEASURED = ("test_acc", "val_acc", "train_acc", "train_loss", "cutoff_used", "seconds")
RESULT_COLUMNS = ("run_id", *PARAMETERS, *MEASURED)
FISHER_COLUMNS = ("run_id", "epoch", "layer", "value")
CURVE_COLUMNS = ("run_id", "epoch", "test_acc")
TRACE_TAG = "startwell/fisher/trace"
LAYER_PREFIX = "startwell/fisher/layer/"


def run_finished(run_dir: Path) -> bool:
    """A run is finished when its ``result.json`` exists (written last, after its metrics)."""
    return (run_dir / "result.json").is_file()


def read_run(run: RunSpec, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The results row, the Fisher rows (epoch 0 is the initialisation, epoch k after k epochs) and the test-accuracy
    curve rows (epoch k: after k epochs) of a finished run; what a result written before a measurement existed lacks
    is NaN, or no rows."""
    result = json.loads((run_dir / "result.json").read_text())
    row = {
        "run_id": run.run_id,
        **dataclasses.asdict(run),
        **{k: result.get(k, math.nan) for k in MEASURED},
    }
    curve = [
        {"run_id": run.run_id, "epoch": epoch, "test_acc": value}
        for epoch, value in enumerate(result.get("curve", []), start=1)
    ]
    with open(run_dir / "metrics.csv", newline="") as f:
        measured = [r for r in csv.DictReader(f) if r.get(TRACE_TAG)]
    measured.sort(key=lambda r: int(r["step"]))
    fisher = []
    for epoch, record in enumerate(measured):
        for tag, value in record.items():
            if value and (tag == TRACE_TAG or tag.startswith(LAYER_PREFIX)):
                layer = "total" if tag == TRACE_TAG else tag[len(LAYER_PREFIX) :]
                fisher.append({"run_id": run.run_id, "epoch": epoch, "layer": layer, "value": float(value)})
    return row, fisher, curve


def _append(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def append_run(
    out: Path, row: dict[str, Any], fisher: list[dict[str, Any]], curve: Optional[list[dict[str, Any]]] = None
) -> None:
    """Append a finished run to ``out/results.csv``, ``out/fisher.csv`` and ``out/curves.csv`` (the Fisher and curve
    rows first: a run is in the study once its results row is)."""
    out.mkdir(parents=True, exist_ok=True)
    if fisher:
        _append(out / "fisher.csv", FISHER_COLUMNS, fisher)
    if curve:
        _append(out / "curves.csv", CURVE_COLUMNS, curve)
    _append(out / "results.csv", RESULT_COLUMNS, [row])


def _typed(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = dict(row)
    for field in dataclasses.fields(RunSpec):
        if field.name not in row:  # a table written before the parameter existed holds its default
            typed[field.name] = field.default
            continue
        value = row[field.name]
        if field.name == "epochs":
            typed[field.name] = int(value)
        elif field.type in ("int", int):
            typed[field.name] = int(value)
        elif field.type in ("float", float):
            typed[field.name] = float(value)
    for column in MEASURED:
        value = row.get(column, "")
        typed[column] = float(value) if value not in ("", "nan", None) else math.nan
    return typed


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/results.csv`` (empty if none yet), one per run: a run merged twice counts once."""
    path = out / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = {row["run_id"]: _typed(row) for row in csv.DictReader(f)}
    return list(rows.values())


def read_fisher(out: Path) -> dict[str, dict[str, list[float]]]:
    """``{run_id: {layer: [value at epoch 0, 1, ...]}}`` from ``out/fisher.csv``."""
    path = out / "fisher.csv"
    curves: dict[str, dict[str, dict[int, float]]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                curves.setdefault(row["run_id"], {}).setdefault(row["layer"], {})[int(row["epoch"])] = float(
                    row["value"]
                )
    return {
        run: {layer: [v for _, v in sorted(points.items())] for layer, points in layers.items()}
        for run, layers in curves.items()
    }


def read_curves(out: Path) -> dict[str, list[float]]:
    """``{run_id: [test accuracy after epoch 1, 2, ...]}`` from ``out/curves.csv``."""
    path = out / "curves.csv"
    curves: dict[str, dict[int, float]] = {}
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                curves.setdefault(row["run_id"], {})[int(row["epoch"])] = float(row["test_acc"])
    return {run: [v for _, v in sorted(points.items())] for run, points in curves.items()}


def merge(out: Path, runs: list[RunSpec], sources: Optional[list[Path]] = None) -> list[str]:
    """Append to ``out``'s tables every finished run of ``runs`` not yet there, looked for in ``out/runs/<run_id>``
    and in ``<source>/<run_id>`` (or ``<source>/runs/<run_id>``) for every directory in ``sources``; the run ids
    merged."""
    done = {row["run_id"] for row in read_results(out)}
    merged = []
    for run in runs:
        if run.run_id in done:
            continue
        for root in [out / "runs", *(sources or [])]:
            found = next((d for d in (root / run.run_id, root / "runs" / run.run_id) if run_finished(d)), None)
            if found is not None:
                append_run(out, *read_run(run, found))
                merged.append(run.run_id)
                break
    return merged
