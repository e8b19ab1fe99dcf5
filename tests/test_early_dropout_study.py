"""examples/early_dropout_study.py end to end on a tiny budget: every arm trains, the report's paired statistics are
those of the results table, and a second call trains nothing (resumable)."""

from __future__ import annotations

import csv
import importlib.util
import statistics

import pytest
from conftest import REPO


def load_study():
    spec = importlib.util.spec_from_file_location("early_dropout_study", REPO / "examples" / "early_dropout_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_study_runs_reports_and_resumes(tmp_path, capsys):
    study = load_study()
    args = ["--out", str(tmp_path), "--seeds", "0", "1", "--epochs", "1", "--batch-size", "256", "--every-n-steps", "1"]
    study.main(args)
    assert capsys.readouterr().out.count("] ") == 8  # 4 arms x 2 seeds trained
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted((a, s) for a in study.ARMS for s in ("0", "1"))
    report = (tmp_path / "report.md").read_text()
    none = [float(r["train_loss"]) for r in rows if r["arm"] == "none"]
    assert f"| train_loss | none | {statistics.mean(none):.4g} ± {statistics.stdev(none):.2g} |" in report
    for figure in ("final.png", "dynamics.png", "training.png"):
        assert (tmp_path / figure).stat().st_size > 0
    tags = {r["tag"] for r in csv.DictReader(open(tmp_path / "dynamics.csv"))}
    assert tags == set(study.DYNAMICS)
    study.main(args)
    assert "] " not in capsys.readouterr().out.replace("report: ", "")  # nothing trained again
