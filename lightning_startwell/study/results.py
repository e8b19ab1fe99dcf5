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

RESULT_COLUMNS = ("run_id", *PARAMETERS, "test_acc", "val_acc", "seconds")
FISHER_COLUMNS = ("run_id", "epoch", "layer", "value")
TRACE_TAG = "startwell/fisher/trace"
LAYER_PREFIX = "startwell/fisher/layer/"


def run_finished(run_dir: Path) -> bool:
    """A run is finished when its ``result.json`` exists (written last, after its metrics)."""
    return (run_dir / "result.json").is_file()


def read_run(run: RunSpec, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results row and the Fisher rows of a finished run (epoch 0 is the initialisation, epoch k after k epochs)."""
    result = json.loads((run_dir / "result.json").read_text())
    row = {
        "run_id": run.run_id,
        **dataclasses.asdict(run),
        **{k: result[k] for k in ("test_acc", "val_acc", "seconds")},
    }
    with open(run_dir / "metrics.csv", newline="") as f:
        measured = [r for r in csv.DictReader(f) if r.get(TRACE_TAG)]
    measured.sort(key=lambda r: int(r["step"]))
    fisher = []
    for epoch, record in enumerate(measured):
        for tag, value in record.items():
            if value and (tag == TRACE_TAG or tag.startswith(LAYER_PREFIX)):
                layer = "total" if tag == TRACE_TAG else tag[len(LAYER_PREFIX) :]
                fisher.append({"run_id": run.run_id, "epoch": epoch, "layer": layer, "value": float(value)})
    return row, fisher


def _append(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def append_run(out: Path, row: dict[str, Any], fisher: list[dict[str, Any]]) -> None:
    """Append a finished run to ``out/results.csv`` and ``out/fisher.csv`` (the Fisher rows first: a run is in the
    study once its results row is)."""
    out.mkdir(parents=True, exist_ok=True)
    _append(out / "fisher.csv", FISHER_COLUMNS, fisher)
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
    for column in ("test_acc", "val_acc", "seconds"):
        typed[column] = float(row[column]) if row[column] not in ("", "nan") else math.nan
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
