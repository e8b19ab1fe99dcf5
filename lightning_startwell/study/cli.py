"""``python -m lightning_startwell.study``: run, spread, merge and report a critical-period study.

    python -m lightning_startwell.study run                     # the quick profile into critical_period_study/
    python -m lightning_startwell.study run --jobs 4            # 4 runs at a time (default: the cores, at most 8)
    python -m lightning_startwell.study run --profile full --out full_study
    python -m lightning_startwell.study cells --out big         # only write runs/<id>/cell.yaml and cells.txt
    python -m lightning_startwell.study merge --out big --from /scratch/runs   # gather runs trained elsewhere
    python -m lightning_startwell.study report --out big        # rewrite report.md and the figures
    python -m lightning_startwell.study plan --profile full --seconds-per-epoch 0.4

``run`` is resumable: run it again after a stop and it trains only what is missing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from lightning_startwell.study.config import PROFILES, load_study
from lightning_startwell.study.report import estimate_seconds, write_report
from lightning_startwell.study.results import merge
from lightning_startwell.study.runner import default_jobs, format_seconds, run_study, write_cells

COMMANDS = ("run", "cells", "merge", "report", "plan")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightning_startwell.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--profile", choices=PROFILES, default="quick", help="built-in study (default: quick)")
    parser.add_argument("--config", type=Path, help="a study YAML instead of a built-in profile")
    parser.add_argument("--out", type=Path, default=Path("critical_period_study"), help="the study's directory")
    parser.add_argument("--from", dest="sources", type=Path, nargs="*", default=[],
                        help="merge: directories holding run directories <run_id>/ trained elsewhere")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="run: runs trained at a time, each in its own process (default: the CPU cores this"
                             " process may use, at most 8; 1 trains in this process)")
    parser.add_argument("--seconds-per-epoch", type=float, help="plan: measured seconds per epoch at the default depth")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    study = load_study(args.config, args.profile)
    source = f"--config {args.config}" if args.config else f"--profile {args.profile}"
    command = f"python -m lightning_startwell.study run {source} --out {shlex.quote(str(args.out))}"
    if args.command == "plan":
        runs = study.runs()
        print(f"{len(runs)} runs, {study.total_epochs()} epochs.")
        if args.seconds_per_epoch:
            depth = int(study.defaults.get("depth", 3))
            estimate = estimate_seconds(study, {depth: args.seconds_per_epoch})
            print(f"Estimated training time at {args.seconds_per_epoch} s per epoch: {format_seconds(estimate or 0)}.")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "cells":
        cells = write_cells(study, args.out.resolve())  # absolute paths: a task may start in another directory
        print(f"{len(cells)} cells listed in {args.out / 'cells.txt'}; each runs with `startwell fit --config <cell>`.")
        return
    if args.command == "run":
        import torch

        torch.set_num_threads(args.threads)
        jobs = default_jobs() if args.jobs is None else args.jobs
        run_study(study, args.out, jobs=jobs, threads=args.threads)
    elif args.command == "merge":
        merged = merge(args.out, study.runs(), args.sources)
        print(f"merged {len(merged)} finished runs into {args.out / 'results.csv'}.")
    path = write_report(study, args.out, command)
    print(f"report: {path}", file=sys.stdout)


if __name__ == "__main__":
    main()
