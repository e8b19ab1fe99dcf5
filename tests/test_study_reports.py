"""The committed studies recompute from their CSVs: each report under docs/ is what the runner writes from the tables
beside it, and the verdict table quoted in each docs page is the report's, cell for cell."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO

from lightning_startwell.study.config import load_study
from lightning_startwell.study.report import verdict_table, write_report
from lightning_startwell.study.results import read_results

DOCS = REPO / "docs"
#: profile -> (its committed directory, the docs page that quotes its verdicts)
COMMITTED = {
    "quick": (DOCS / "critical_period" / "quick", DOCS / "deficits.md"),
    "standard": (DOCS / "critical_period", DOCS / "deficits.md"),
    "fisher_no_norm": (DOCS / "critical_period" / "fisher_no_norm", DOCS / "deficits.md"),
    "early_dropout": (DOCS / "early_dropout", DOCS / "early_dropout.md"),
    "weight_decay": (DOCS / "weight_decay", DOCS / "weight_decay.md"),
}


def _quoted(page: Path, profile: str) -> str:
    """The verdict table a docs page quotes between ``<!-- verdicts: <profile> -->`` and ``<!-- /verdicts -->``."""
    match = re.search(rf"<!-- verdicts: {profile} -->\n(.*?)\n<!-- /verdicts -->", page.read_text(), re.S)
    assert match, f"{page.name} quotes no verdict table of the {profile} profile"
    return match.group(1).strip()


@pytest.mark.parametrize("profile", sorted(COMMITTED))
def test_committed_report_is_what_its_tables_give(profile, tmp_path):
    directory, _ = COMMITTED[profile]
    study = load_study(profile=profile)
    rows = read_results(directory)
    assert {r["run_id"] for r in rows} == {r.run_id for r in study.runs()}  # run end to end, every run once
    for name in ("results.csv", "curves.csv", "fisher.csv"):
        if (directory / name).exists():
            shutil.copy(directory / name, tmp_path / name)
    committed = (directory / "report.md").read_text()
    command = re.search(r"Command: `(.*?)`", committed)
    assert command, "the report says the command that made it"
    assert write_report(study, tmp_path, command.group(1)).read_text() == committed


@pytest.mark.parametrize("profile", sorted(COMMITTED))
def test_docs_quote_the_verdicts_of_the_committed_tables(profile):
    directory, page = COMMITTED[profile]
    table = verdict_table(load_study(profile=profile), read_results(directory))
    verdicts = table.split("\n\n")[0].strip()  # the table, without the rule printed under it
    assert _quoted(page, profile) == verdicts
