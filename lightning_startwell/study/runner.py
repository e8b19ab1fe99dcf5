"""Run a study: every run not yet in ``results.csv`` is trained by ``startwell fit --config`` of its cell, in this
process or in ``jobs`` worker processes side by side, and appended by this process as soon as it finishes; a study
stopped at any point starts again where it stopped."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Generator
from contextlib import closing
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


MAX_DEFAULT_JOBS = 8  # each worker holds its own torch (about 1 GB here): more only when asked for
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def default_jobs() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a SLURM or container allocation), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_DEFAULT_JOBS))


class Progress:
    """Runs done / total and an ETA from the wall time per epoch since the study (re)started, which counts runs
    trained side by side."""

    def __init__(self, runs: list[RunSpec], done: set[str], stream: TextIO) -> None:
        self.total = len(runs)
        self.done = len(done)
        self.epochs_left = sum(run.epochs or 0 for run in runs if run.run_id not in done)
        self.epochs_trained = 0
        self.started = time.time()
        self.stream = stream

    def update(self, run: RunSpec, seconds: float, test_acc: float) -> None:
        self.done += 1
        self.epochs_left -= run.epochs or 0
        self.epochs_trained += run.epochs or 0
        eta = (time.time() - self.started) / max(self.epochs_trained, 1) * self.epochs_left
        print(
            f"[{self.done}/{self.total}] {run.run_id}: test acc {test_acc:.4f} in {seconds:.1f} s;"
            f" ETA {format_seconds(eta)}",
            file=self.stream,
            flush=True,
        )


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this process when its parent dies (a killed study must not leave a worker writing into a run
    directory that the restarted study re-creates); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _start_worker(parent: int, threads: int) -> None:
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def _fit_in_worker(fit: Callable[[Path], None], cell: Path) -> Path:
    """``fit(cell)`` in a pool worker. A ``SystemExit`` (a config the CLI refuses, Lightning's Ctrl-C handling) would
    end the worker without an answer and leave the pool waiting for it: it comes back as an error instead."""
    try:
        fit(cell)
    except BaseException as error:  # noqa: BLE001 - re-raised as an Exception the pool returns
        raise RuntimeError(f"the run of {cell} failed: {error!r}") from None
    return cell


def _fit_in_pool(
    cells: list[Path], fit: Callable[[Path], None], jobs: int, threads: int
) -> Generator[Path, None, None]:
    """Train ``cells`` with ``fit`` in ``jobs`` spawned worker processes of ``threads`` torch threads each; yields each
    cell as its run finishes. Leaving early (an error, Ctrl-C) kills the workers."""
    context = multiprocessing.get_context("spawn")  # fork after torch's threads started is unsafe
    pool = context.Pool(jobs, initializer=_start_worker, initargs=(os.getpid(), threads))
    try:
        yield from pool.imap_unordered(functools.partial(_fit_in_worker, fit), cells)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def run_study(
    study: Study,
    out: Path,
    fit: Callable[[Path], None] = fit_cell,
    stream: TextIO = sys.stdout,
    jobs: int = 1,
    threads: int = 1,
) -> int:
    """Train every run of ``study`` that ``out`` does not hold yet; returns how many were trained here.

    With ``jobs`` > 1 the runs are trained by that many worker processes (never more than the runs left), each with
    ``threads`` torch threads (``fit`` must then pickle: a module-level function). This process alone writes the
    tables, in the order runs finish. Finished runs found under ``out/runs`` but not yet in the tables (a study killed
    between a run's end and its row) are merged, not trained again; a run stopped half-way is started afresh.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"`jobs` must be a positive integer, got {jobs!r}.")
    out.mkdir(parents=True, exist_ok=True)
    runs = study.runs()
    merge(out, runs)
    done = {row["run_id"] for row in read_results(out)}
    progress = Progress(runs, done, stream)
    print(f"{len(done)}/{len(runs)} runs already done in {out}; {progress.epochs_left} epochs to train.", file=stream)
    pending = {}
    for run in runs:
        if run.run_id in done:
            continue
        run_dir = out / "runs" / run.run_id
        if run_dir.exists():  # left half-way by a stopped study
            shutil.rmtree(run_dir)
        pending[write_cell(study, run, run_dir)] = run
    jobs = min(jobs, len(pending))
    if jobs > 1:
        print(f"training {len(pending)} runs in {jobs} worker processes.", file=stream, flush=True)
        finished = _fit_in_pool(list(pending), fit, jobs, threads)
    else:
        finished = _fit_each(list(pending), fit)
    with closing(finished):  # a failure here stops the workers at once
        for cell in finished:
            run, run_dir = pending[cell], cell.parent
            if not run_finished(run_dir):
                raise RuntimeError(f"run {run.run_id} ended without writing {run_dir / 'result.json'}.")
            row, fisher, curve = read_run(run, run_dir)
            append_run(out, row, fisher, curve)
            progress.update(run, row["seconds"], row["test_acc"])
    return len(pending)


def _fit_each(cells: list[Path], fit: Callable[[Path], None]) -> Generator[Path, None, None]:
    for cell in cells:
        fit(cell)
        yield cell
