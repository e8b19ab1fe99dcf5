"""Run a study: every run not yet in ``results.csv`` is trained by ``startwell fit --config`` of its cell, in this
process, and appended as soon as it finishes; a study stopped at any point starts again where it stopped."""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lightning_startwell.study.config import RunSpec, Study, write_cell
from lightning_startwell.study.results import append_run, merge, read_results, read_run, run_finished


def fit_cell(cell: Path) -> None:
    """``startwell fit --config cell``, in this process, with Lightning's per-run messages kept to warnings."""
    from lightning_startwell.cli import main

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # the run directory holds cell.yaml
        logging.getLogger("lightning").setLevel(logging.WARNING)
        main(["fit", "--config", str(cell)])


def write_cells(study: Study, out: Path) -> list[Path]:
    """Write the cell config of every run under ``out/runs/<run_id>/cell.yaml`` and their list, one a line, in
    ``out/cells.txt`` (line i is task i of a scheduler's array); the paths written."""
    cells = [write_cell(study, run, out / "runs" / run.run_id) for run in study.runs()]
    (out / "cells.txt").write_text("".join(f"{cell}\n" for cell in cells))
    return cells


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Runs done / total and an ETA from the seconds per epoch of the runs trained so far in this session."""

    def __init__(self, runs: list[RunSpec], done: set[str], stream: TextIO) -> None:
        self.total = len(runs)
        self.done = len(done)
        self.epochs_left = sum(run.epochs or 0 for run in runs if run.run_id not in done)
        self.epochs_trained = 0
        self.seconds = 0.0
        self.stream = stream

    def update(self, run: RunSpec, seconds: float, test_acc: float) -> None:
        self.done += 1
        self.epochs_left -= run.epochs or 0
        self.epochs_trained += run.epochs or 0
        self.seconds += seconds
        eta = self.seconds / max(self.epochs_trained, 1) * self.epochs_left
        print(
            f"[{self.done}/{self.total}] {run.run_id}: test acc {test_acc:.4f} in {seconds:.1f} s;"
            f" ETA {format_seconds(eta)}",
            file=self.stream,
            flush=True,
        )


def run_study(
    study: Study,
    out: Path,
    fit: Callable[[Path], None] = fit_cell,
    stream: TextIO = sys.stdout,
) -> int:
    """Train every run of ``study`` that ``out`` does not hold yet; returns how many were trained here.

    Finished runs found under ``out/runs`` but not yet in the tables (a study killed between a run's end and its
    row) are merged, not trained again; a run stopped half-way is started afresh.
    """
    out.mkdir(parents=True, exist_ok=True)
    runs = study.runs()
    merge(out, runs)
    done = {row["run_id"] for row in read_results(out)}
    progress = Progress(runs, done, stream)
    print(f"{len(done)}/{len(runs)} runs already done in {out}; {progress.epochs_left} epochs to train.", file=stream)
    trained = 0
    for run in runs:
        if run.run_id in done:
            continue
        run_dir = out / "runs" / run.run_id
        if run_dir.exists():  # left half-way by a stopped study
            shutil.rmtree(run_dir)
        cell = write_cell(study, run, run_dir)
        start = time.time()
        fit(cell)
        if not run_finished(run_dir):
            raise RuntimeError(f"run {run.run_id} ended without writing {run_dir / 'result.json'}.")
        row, fisher = read_run(run, run_dir)
        append_run(out, row, fisher)
        trained += 1
        progress.update(run, time.time() - start, row["test_acc"])
    return trained
