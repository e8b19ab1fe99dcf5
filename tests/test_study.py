"""The critical-period study runner on a tiny grid (digits, a 4-channel ConvNet, 2 batches an epoch): the grid, the
cells as plain ``startwell fit`` configs, resuming after an interruption and after a kill, merging runs trained
elsewhere, the paired statistics and the report."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO

from lightning_startwell.cli import main as startwell
from lightning_startwell.study import config as study_config
from lightning_startwell.study.config import RunSpec, load_study, parse_study
from lightning_startwell.study.record import accuracy
from lightning_startwell.study.report import (
    claim_results,
    claim_verdict,
    estimate_seconds,
    per_epoch_at,
    verdict_table,
    write_report,
)
from lightning_startwell.study.results import (
    RESULT_COLUMNS,
    append_run,
    merge,
    read_curves,
    read_fisher,
    read_results,
)
from lightning_startwell.study.runner import fit_cell, run_study, write_cells
from lightning_startwell.study.stats import detectable_effect, holm, paired_comparison, sign_flip_p

TINY = {
    "name": "tiny",
    "seeds": [0, 1, 2],
    "defaults": {"deficit": "blur", "size": 2, "clean_epochs": 1, "depth": 1},
    "base": {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "deterministic": True, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1, "limit_train_batches": 2, "limit_val_batches": 1,
        },
        "model": {"class_path": "lightning_startwell.ConvNet", "init_args": {"channels": [4]}},
        "data": {"class_path": "lightning_startwell.DigitsDataModule", "init_args": {"batch_size": 32}},
    },
    "fisher": {"num_samples": 16, "batch_size": 16},
    "experiments": [
        {"name": "length", "title": "length", "plot": "curve", "x": "length", "grid": {"length": [0, 1]}},
        {"name": "layers", "title": "per layer", "plot": "fisher_layers", "x": "length", "grid": {"length": [0, 1]}},
    ],
}


def tiny(**changes):
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    raw.update(changes)
    return parse_study(raw)


def test_grid_runs_each_once_with_the_references_they_need():
    study = tiny(experiments=[
        {"name": "length", "plot": "curve", "x": "length", "grid": {"length": [0, 2]}},
        {"name": "onset", "plot": "curve", "x": "onset", "grid": {"onset": [1, 3]},
         "fixed": {"length": 2, "epochs": 8}},
        {"name": "fresh", "plot": "bars", "x": "lr_offset", "grid": {"lr_offset": [5]}, "reference": {"lr_offset": 0}},
    ])
    cells = [(c.deficit, c.onset, c.length, c.epochs, c.lr_offset) for c in study.cells()]
    assert cells == [
        ("none", 0, 0, 1, 0),  # length 0: the reference of the length experiment and of `fresh`
        ("blur", 0, 2, 3, 0),
        ("none", 0, 0, 8, 0),  # the onset experiment's reference: no deficit, the same 8 epochs
        ("blur", 1, 2, 8, 0),
        ("blur", 3, 2, 8, 0),
        ("none", 0, 0, 1, 5),
    ]
    runs = study.runs()
    assert len(runs) == 6 * 3 and len({r.run_id for r in runs}) == 18
    assert {r.seed for r in runs} == {0, 1, 2}


def test_cell_config_is_the_run():
    study = tiny()
    run = RunSpec(deficit="deprivation", onset=1, length=2, clean_epochs=3, weight_decay=1e-3, depth=2, lr=0.1,
                  lr_decay=0.9, lr_offset=2, seed=7).normalised()
    config = study_config.cell_config(study, run, study_config.Path("runs/x"))
    assert config["seed_everything"] == 7 and config["data"]["init_args"]["seed"] == 7
    assert config["trainer"]["max_epochs"] == 6
    assert config["model"]["init_args"]["channels"] == [4, 4]
    assert config["model"]["init_args"]["optimizer"]["init_args"] == pytest.approx(
        {"lr": 0.1 * 0.9**2, "momentum": 0.9, "weight_decay": 1e-3})
    injector = config["trainer"]["callbacks"][0]["init_args"]
    assert (injector["deficit"], injector["start_epoch"], injector["end_epoch"]) == ("deprivation", 1, 3)
    # the Fisher trace is measured only in the runs of an experiment that plots it (`layers`: length 0 and 1)
    assert [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]] == [
        "DeficitInjector", "StudyRecord"]
    measured = RunSpec(deficit="blur", size=2, length=1, clean_epochs=1, depth=1, seed=7).normalised()
    fisher = study_config.cell_config(study, measured, study_config.Path("w"))["trainer"]["callbacks"][1]["init_args"]
    assert (fisher["probe"], fisher["num_samples"], fisher["seed"]) == ("clean", 16, 7)
    training = dataclasses.replace(measured, fisher_probe="training")
    assert "FisherTraceMonitor" not in _callbacks(study, training)[0]  # not a run of the Fisher experiment
    through = tiny(fisher={"num_samples": 16, "probe": "training"})
    assert _callbacks(through, training)[0]["FisherTraceMonitor"]["probe"] == "training"
    assert training.run_id != measured.run_id
    assert RunSpec(fisher_probe="training").normalised() == RunSpec().normalised()  # no deficit: the probes agree
    assert parse_study({**TINY, "fisher": {"probe": "training"}}).defaults["fisher_probe"] == "training"
    baseline = RunSpec(size=2, clean_epochs=1, depth=1, lr_schedule="constant").normalised()
    constant = study_config.cell_config(study, baseline, study_config.Path("y"))
    assert constant["model"]["init_args"]["lr_scheduler"] is None
    assert [c["class_path"].rsplit(".", 1)[-1] for c in constant["trainer"]["callbacks"]] == ["StudyRecord"]


def _callbacks(study, run):
    config = study_config.cell_config(study, run.normalised(), study_config.Path("r"))
    return {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in config["trainer"]["callbacks"]}, config


def test_regularisation_timing_cells_are_the_schedules_they_name():
    study = tiny(critical_period={"signal": "fisher", "every_n_steps": 5}, random_cutoff=[0.1, 0.3])
    early, _ = _callbacks(study, RunSpec(dropout=0.2, dropout_mode="early", dropout_shape="linear", cutoff=0.25))
    assert early["DropoutSchedule"] == {"p": 0.2, "mode": "early", "log_images": False, "shape": "linear",
                                        "cutoff_fraction": 0.25}
    standard, _ = _callbacks(study, RunSpec(dropout=0.1, dropout_mode="standard", cutoff=0.5))
    assert standard["DropoutSchedule"] == {"p": 0.1, "mode": "standard", "log_images": False}
    detected, _ = _callbacks(study, RunSpec(wd_mode="early", cutoff_signal="critical_period", seed=3))
    assert list(detected) == ["CriticalPeriodMonitor", "WeightDecaySchedule", "StudyRecord"]
    assert detected["WeightDecaySchedule"] == {"mode": "early", "cutoff_signal": "critical_period"}
    assert detected["CriticalPeriodMonitor"] == {"seed": 3, "signal": "fisher", "every_n_steps": 5}
    drawn = [_callbacks(study, RunSpec(wd_mode="late", cutoff_signal="random", seed=s))[0]["WeightDecaySchedule"]
             ["cutoff_fraction"] for s in range(20)]
    assert all(0.1 <= f <= 0.3 for f in drawn) and len(set(drawn)) == 20  # one draw per seed, in the range
    assert drawn[4] == _callbacks(study, RunSpec(wd_mode="late", cutoff_signal="random", seed=4))[0][
        "WeightDecaySchedule"]["cutoff_fraction"]  # the same in every process
    _, adamw = _callbacks(study, RunSpec(optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="cosine",
                                         warmup_epochs=2, epochs=10))
    assert adamw["model"]["init_args"]["optimizer"] == {
        "class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.05}}
    assert adamw["model"]["init_args"]["lr_scheduler"] == {
        "class_path": "lightning_startwell.schedules.WarmupCosineLR",
        "init_args": {"warmup_epochs": 2, "max_epochs": 10}}


def test_timing_parameters_are_normalised_and_name_their_runs():
    # without the regulariser, the timing parameters are void: one run, with the old run id
    assert RunSpec(dropout=0.0, dropout_mode="early", cutoff=0.3).normalised() == RunSpec().normalised()
    assert RunSpec(weight_decay=0.0, wd_mode="late", cutoff=0.3).normalised() == RunSpec(weight_decay=0.0).normalised()
    assert RunSpec().normalised().run_id == "none_on0_len0_ep20_wd0.0005_d3_lr0.05x0.97+0_s0"
    ids = {RunSpec(dropout=0.1, dropout_mode=m, cutoff=c, cutoff_signal=k).normalised().run_id
           for m, c, k in [("early", 0.1, "fixed"), ("early", 0.2, "fixed"), ("late", 0.1, "fixed"),
                           ("early", 0.0, "critical_period"), ("early", 0.0, "random"), ("standard", 0.0, "fixed")]}
    assert len(ids) == 6
    assert RunSpec(dropout=0.1, dropout_mode="early", cutoff=0.4, cutoff_signal="random").normalised().cutoff == 0.0
    with pytest.raises(ValueError, match="dropout_shape"):
        tiny(experiments=[{"name": "a", "plot": "bars", "x": "dropout", "grid": {"dropout": [0.1]},
                           "fixed": {"dropout_mode": "early", "dropout_shape": "linear",
                                     "cutoff_signal": "critical_period"}}])


def test_warmup_cosine_against_the_formula():
    from lightning_startwell.schedules import WarmupCosineLR

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.4)
    scheduler = WarmupCosineLR(optimizer, warmup_epochs=2, max_epochs=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up epochs 0, 1: (e + 1) / 2; then t = e - 2 of T = 4 decay epochs: (1 + cos(pi t / 4)) / 2
    expected = [0.2, 0.4, 0.4, 0.2 * (1 + math.sqrt(0.5)), 0.2, 0.2 * (1 - math.sqrt(0.5))]
    assert rates == pytest.approx(expected)
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupCosineLR(optimizer, warmup_epochs=6, max_epochs=6)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"defaults": {"depht": 3}}, "depht"),
        ({"experiments": [{"name": "a", "plot": "curve", "x": "length", "grid": {"deficit": ["blurr"]}}]}, "deficit"),
        ({"experiments": [{"name": "a", "plot": "pie", "x": "length", "grid": {"length": [1]}}]}, "plot"),
        ({"experiments": []}, "experiments"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"defaults": {"fisher_probe": "blurred"}}, "fisher_probe"),
        ({"defaults": {"dropout": 1.0}}, "dropout"),
        ({"defaults": {"cutoff": 1.5}}, "cutoff"),
        ({"defaults": {"wd_mode": "sometimes"}}, "wd_mode"),
        ({"defaults": {"cutoff_signal": "fisher"}}, "cutoff_signal"),
        ({"random_cutoff": [0.5, 0.1]}, "random_cutoff"),
        ({"critical_period": [1]}, "critical_period"),
    ],
)
def test_bad_study_yaml_names_the_part(change, named):
    with pytest.raises(ValueError, match=named):
        tiny(**change)


# Claims: a grid of blur lengths (and of weight decay) whose cells the claims compare.
CLAIM_EXPERIMENTS = [
    {"name": "length", "plot": "curve", "x": "length", "grid": {"length": [0, 1, 2, 3]}},
    {"name": "wd", "plot": "curve", "x": "length", "series": "weight_decay",
     "grid": {"length": [0, 1], "weight_decay": [0.0, 0.001]}},
    {"name": "fisher", "plot": "fisher", "x": "length",
     "grid": {"length": [0, 1], "fisher_probe": ["clean", "training"]}},
]


def claim(name="c", expect="lower", comparisons=None, **more):
    comparisons = comparisons or [{"experiment": "length", "cell": {"length": 1}}]
    return {"name": name, "paper": "what the paper says", "expect": expect, "comparisons": comparisons, **more}


def claims_study(*claims):
    return tiny(experiments=CLAIM_EXPERIMENTS, claims=list(claims))


def test_claims_are_parsed_to_the_runs_they_compare():
    study = claims_study(
        claim("chain", comparisons=[
            {"experiment": "length", "cell": {"length": 2}, "reference": {"length": 1}},
            {"experiment": "length", "cell": {"length": 3}, "reference": {"length": 2}}]),
        claim("wd", comparisons=[{"experiment": "wd", "cell": {"length": 1, "weight_decay": 0.001},
                                  "versus": {"weight_decay": 0.0}}]),
        claim("kept", expect="no_loss", margin=1.5),
        {"name": "fisher", "paper": "rises then falls", "not_tested": "no paired comparison"},
    )
    assert len(study.runs()) == len(claims_study().runs())  # claims add no run
    chain, wd, kept, fisher = study.claims
    second = chain.comparisons[1]
    assert (second.cell.length, second.cell.epochs, second.reference.length, second.reference.epochs) == (3, 4, 2, 3)
    (interaction,) = wd.comparisons
    assert (interaction.cell.weight_decay, interaction.reference.length) == (0.001, 0)
    assert [(r.length, r.weight_decay) for r in interaction.versus] == [(1, 0.0), (0, 0.0)]
    assert (kept.expect, kept.margin, kept.comparisons[0].reference.deficit) == ("no_loss", 1.5, "none")
    assert (fisher.comparisons, fisher.not_tested) == ([], "no paired comparison")


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (claim(colour="red"), "unknown key.*colour"),
        ({"name": "c", "expect": "lower", "comparisons": [{"experiment": "length", "cell": {"length": 1}}]}, "paper"),
        (claim(expect="smaller"), "`expect` must be one of"),
        (claim(expect="no_loss"), "needs a positive `margin`"),
        (claim(margin=1.0), "`margin` is for `expect: no_loss` only"),
        (claim(comparisons=[{"experiment": "lenght", "cell": {"length": 1}}]), "`experiment` must be one of"),
        (claim(comparisons=[{"experiment": "length", "cell": {"length": 7}}]), "`cell`.*matches 0 cells"),
        (claim(comparisons=[{"experiment": "wd", "cell": {"length": 1}}]), "`cell`.*matches 2 cells"),
        (claim(comparisons=[{"experiment": "length", "cell": {"lenght": 1}}]), "`cell`.*unknown run parameter"),
        (claim(comparisons=[{"experiment": "length", "cell": {"length": 1}, "reference": {"depth": 5}}]),
         "reference of the cell .* is not a run of the study"),
        (claim(comparisons=[{"experiment": "length", "cell": {"length": 1}, "reference": {"length": 1}}]),
         "compared with itself"),
        (claim(comparisons=[{"experiment": "length", "cell": {"length": 1}, "versus": {"length": 9}}]), "`versus`"),
        (claim(comparisons=[{"experiment": "length", "cel": {"length": 1}}]), "comparisons` 1: needs"),
        ({"name": "c", "paper": "p"}, "`not_tested`"),
        (claim(not_tested="no reason"), "`not_tested`"),
    ],
)
def test_bad_claims_name_the_part(bad, named):
    with pytest.raises(ValueError, match=f"claim 'c'.*{named}"):
        claims_study(bad)


def test_claim_names_are_distinct():
    with pytest.raises(ValueError, match="`claims`: names must be distinct"):
        claims_study(claim(), claim())


def test_a_trained_run_is_tested_once_in_a_family():
    # The training-probe arm is the clean-probe arm's model (the probe changes the measurement only): refused, not
    # silently deduplicated -- the profile says what it tests.
    fisher_twice = claim(comparisons=[{"experiment": "fisher", "cell": {"length": 1, "fisher_probe": p}}
                                      for p in ("clean", "training")])
    with pytest.raises(ValueError, match="`comparisons` 1 and 2 test the same trained run blur2_on0_len1"):
        claims_study(fisher_twice)
    same_arm = claim(comparisons=[{"experiment": "length", "cell": {"length": 2}},
                                  {"experiment": "length", "cell": {"length": 2}, "reference": {"length": 1}}])
    with pytest.raises(ValueError, match="counted once"):
        claims_study(same_arm)
    reversed_pair = claim(comparisons=[{"experiment": "length", "cell": {"length": 2}, "reference": {"length": 1}},
                                       {"experiment": "length", "cell": {"length": 1}, "reference": {"length": 2}}])
    with pytest.raises(ValueError, match="the same runs"):
        claims_study(reversed_pair)
    # A shared reference is allowed (a common control, as within an experiment), and so is a run in two families.
    shared = claim(comparisons=[{"experiment": "length", "cell": {"length": n}} for n in (1, 2, 3)])
    assert len(claims_study(shared, {**shared, "name": "again"}).claims[0].comparisons) == 3


def _hand_rows(study, accuracy):
    """results.csv rows of every run of ``study``: ``accuracy(cell, seed)`` the test accuracy."""
    import dataclasses

    return [{"run_id": run.run_id, **dataclasses.asdict(run), "test_acc": accuracy(run.without_seed(), run.seed),
             "val_acc": 0.0, "seconds": 1.0} for run in study.runs()]


# Per-seed differences with the no-deficit run: length 1 a clear loss, 2 no clear sign, 3 a small spread near 0.
DIFFERENCES = {0: (0.0, 0.0, 0.0), 1: (-0.10, -0.11, -0.12), 2: (-0.05, 0.03, -0.01), 3: (0.01, 0.0, 0.02)}


def _length_accuracy(cell, seed):
    extra = 0.02 if cell.weight_decay == 0.0 else 0.0  # weight decay 0: 2 points more loss from the blur
    return 0.80 + 0.01 * seed + DIFFERENCES[cell.length][seed] - (extra if cell.length else 0.0)


def test_verdicts_against_a_hand_computation():
    from scipy.stats import t as student

    comparison = [{"experiment": "length", "cell": {"length": 1}}]
    study = claims_study(
        claim("loss", "lower", comparison),
        claim("gain", "higher", comparison),
        claim("unclear", "lower", [{"experiment": "length", "cell": {"length": 2}}]),
        claim("kept", "no_loss", [{"experiment": "length", "cell": {"length": 3}}], margin=2.0),
        claim("kept_narrow", "no_loss", [{"experiment": "length", "cell": {"length": 3}}], margin=1.0),
        claim("kept_not", "no_loss", comparison, margin=2.0),
        claim("wd", "higher", [{"experiment": "wd", "cell": {"length": 1, "weight_decay": 0.001},
                                "versus": {"weight_decay": 0.0}}]),
    )
    rows = _hand_rows(study, _length_accuracy)
    results = {c.name: claim_results(study, c, rows) for c in study.claims}
    # length 1: d = (-0.10, -0.11, -0.12), mean -0.11, sd 0.01, t = -0.11 / (0.01 / sqrt 3) = -19.05, df 2
    (loss,) = results["loss"]
    t = -0.11 / (0.01 / math.sqrt(3))
    assert loss.result.difference_mean == pytest.approx(-0.11) and loss.result.t == pytest.approx(t)
    assert loss.p_holm == pytest.approx(2 * student.sf(-t, df=2)) and loss.p_holm < 0.01
    assert loss.verdict == "reproduced" and results["gain"][0].verdict == "opposite"
    # length 2: d = (-0.05, 0.03, -0.01), mean -0.01, sd 0.04, t = -0.433: p = 0.71
    assert results["unclear"][0].p_holm == pytest.approx(2 * student.sf(0.01 / (0.04 / math.sqrt(3)), df=2))
    assert results["unclear"][0].verdict == "inconclusive"
    # length 3: d = (0.01, 0, 0.02), mean 0.01, sd 0.01; 95 % CI 0.01 ± 4.3027 x 0.01 / sqrt 3 = [-1.48, 3.48] points
    kept = results["kept"][0].result
    assert 100 * kept.ci_low == pytest.approx(1.0 - 4.302652729911275 / math.sqrt(3))
    assert results["kept"][0].verdict == "reproduced"  # -1.48 > -2
    assert results["kept_narrow"][0].verdict == "inconclusive"  # -1.48 < -1, and no significant loss
    assert results["kept_not"][0].verdict == "opposite"  # a significant loss of 11 points
    # The interaction: the blur's cost at weight decay 0.001 minus its cost at 0, seed by seed: +0.02 every seed
    (wd,) = results["wd"]
    assert wd.result.difference_mean == pytest.approx(0.02) and (wd.result.ci_low, wd.result.ci_high) == pytest.approx(
        (0.02, 0.02))
    assert wd.result.p == pytest.approx(2 / 8) and wd.verdict == "inconclusive"  # sign-flip: 3 seeds can say no more
    verdicts = {c.name: claim_verdict(c, results[c.name]) for c in study.claims}
    assert verdicts == {"loss": "reproduced", "gain": "opposite", "unclear": "inconclusive", "kept": "reproduced",
                        "kept_narrow": "inconclusive", "kept_not": "opposite", "wd": "inconclusive"}
    table = verdict_table(study, rows)
    assert ("| loss | what the paper says (test acc, expected: lower) | length: deficit blur vs none; length 1 vs 0"
            in table)
    assert "| -11.00 [-13.48, -8.52] points |" in table and "**reproduced** when" in table


def test_the_report_opens_with_the_verdicts(tmp_path):
    study = claims_study(claim("loss"), {"name": "fisher", "paper": "rises, falls", "not_tested": "no paired test"})
    for row in _hand_rows(study, _length_accuracy):  # the tables as the runner writes them, no training
        append_run(tmp_path, {c: row.get(c, math.nan) for c in RESULT_COLUMNS}, [])
    report = write_report(study, tmp_path).read_text()
    assert report.index("## Verdicts") < report.index("**Statistics.**") < report.index("## length")
    assert "| loss |" in report and "| fisher | rises, falls | – (no paired test) |" in report
    assert "not tested |" in report and "declares no claims" in write_report(tiny(), tmp_path).read_text()


def test_one_holm_family_per_claim():
    three = claim("three", comparisons=[{"experiment": "length", "cell": {"length": n}} for n in (1, 2, 3)])
    study = claims_study(three, claim("one", comparisons=[{"experiment": "length", "cell": {"length": 2}}]))
    rows = _hand_rows(study, _length_accuracy)
    raw = [r.result.p for r in claim_results(study, study.claims[0], rows)]
    # Holm by hand over the 3 p-values of this claim only: sorted p(1) < p(2) < p(3), adjusted 3 p(1), then
    # max(3 p(1), 2 p(2)), then max(that, p(3)), capped at 1.
    p1, p2, p3 = raw[0], raw[2], raw[1]  # length 1 (-11 points, tight), length 3, length 2 (-1 point, spread)
    assert p1 < p2 < p3
    first, second = min(1.0, 3 * p1), max(min(1.0, 3 * p1), min(1.0, 2 * p2))
    expected = [first, max(second, min(1.0, p3)), second]  # in the claim's order: length 1, 2, 3
    assert [r.p_holm for r in claim_results(study, study.claims[0], rows)] == pytest.approx(expected)
    # The same comparison in a family of its own is not adjusted for the other claim's comparisons.
    (alone,) = claim_results(study, study.claims[1], rows)
    assert alone.p_holm == pytest.approx(raw[1])


def test_a_claim_with_runs_missing_says_so():
    study = claims_study(claim("length", comparisons=[{"experiment": "length", "cell": {"length": n}} for n in (1, 3)]))
    rows = [r for r in _hand_rows(study, _length_accuracy)
            if not (r["length"] == 3 or (r["length"] == 1 and r["seed"] == 2))]
    first, second = claim_results(study, study.claims[0], rows)
    assert first.result.seeds == 2 and (first.runs_done, first.runs_expected) == (5, 6)
    assert second.verdict == "runs missing" and math.isnan(second.p_holm)
    table = verdict_table(study, rows)
    assert "(1 of 6 runs missing)" in table and "runs missing (3 of 6 runs missing)" in table
    assert claim_verdict(study.claims[0], [first, second]) == "inconclusive"
    nothing = claim_results(study, study.claims[0], [])  # no run at all: every comparison missing, no crash
    assert claim_verdict(study.claims[0], nothing) == "runs missing" and "| runs missing |" in verdict_table(study, [])


def test_profiles_load_and_cover_the_five_figures_and_the_controls():
    for profile in ("standard", "full"):
        study = load_study(profile=profile)
        assert {c.name for c in study.claims} == {
            "length", "onset", "fisher_rises_then_falls", "fisher_per_layer", "weight_decay", "depth",
            "deprivation_vs_blur", "low_level_statistics_kept", "permanence", "not_the_learning_rate"}
        assert [c.name for c in study.claims if not c.comparisons] == ["fisher_rises_then_falls", "fisher_per_layer"]
        plots = {e.plot for e in study.experiments}
        assert plots == {"curve", "bars", "fisher", "fisher_layers"} and len(study.seeds) >= 8
        grids = {k for e in study.experiments for k in (*e.grid, *e.fixed)}
        assert {"length", "onset", "weight_decay", "depth", "deficit", "lr_schedule", "size"} <= grids
        # the onset windows are followed by the same clean phase and compared with a clean run as long
        onset = next(c for c in study.claims if c.name == "onset")
        for comparison in onset.comparisons:
            late, late_clean, early, early_clean = comparison.runs()
            assert late.clean_epochs == early.clean_epochs and late.onset > early.onset
            assert (late_clean.epochs, early_clean.epochs) == (late.epochs, early.epochs)
    quick = load_study(profile="quick")
    assert len(quick.seeds) >= 4 and quick.defaults == load_study(profile="standard").defaults


def test_timing_profiles_test_their_papers_and_the_detected_cutoff():
    dropout = load_study(profile="early_dropout")
    assert len(dropout.seeds) >= 8 and {"early_dropout_helps", "robust_to_the_cutoff", "robust_to_the_rate",
                                        "detected_cutoff_as_good_as_the_default",
                                        "detected_cutoff_beats_a_random_one"} <= {c.name for c in dropout.claims}
    signals = {c.cutoff_signal for c in dropout.cells()}
    assert signals == {"fixed", "critical_period", "random"}
    late = [c for c in dropout.cells() if c.dropout_mode == "late"]
    assert all(late[0] not in comparison.runs() for claim in dropout.claims for comparison in claim.comparisons)
    decay = load_study(profile="weight_decay")
    assert {c.wd_mode for c in decay.cells()} == {"throughout", "early", "late"}
    assert {c.weight_decay for c in decay.cells()} == {0.0, 5e-3} and len(decay.seeds) >= 8


def test_accuracy_against_a_count():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [2.0], [1.0], [0.0]])
    y = torch.tensor([0, 1, 1, 1, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    assert accuracy(Fixed(), loader, torch.device("cpu")) == 3 / 5


def test_paired_t_test_against_the_formula():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}, {0: 0.5, 1: 1.0, 2: 2.9}
    result = paired_comparison(a, b)  # seed 3 has no partner: left out
    d = [0.5, 1.0, 0.1]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    from scipy.stats import t as student

    assert result.seeds == 3 and result.difference_mean == pytest.approx(mean) and result.t == pytest.approx(t)
    assert result.p_t == pytest.approx(2 * student.sf(t, df=2)) and result.p == result.p_t
    half_width = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2} from a printed table of Student's t
    assert (result.ci_low, result.ci_high) == pytest.approx((mean - half_width, mean + half_width))
    assert result.std == pytest.approx(1.0) and result.reference_std == pytest.approx(statistics.stdev([0.5, 1, 2.9]))
    assert math.isnan(paired_comparison({0: 1.0}, {0: 0.5}).p)


def test_sign_flip_test_counts_the_sign_patterns():
    # d = (0.5, 1.0, 0.1), sum 1.6: of the 8 sign patterns only (+,+,+) and its negation reach |sum| >= 1.6
    # ((+,+,-) gives 1.4).
    assert paired_comparison({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.9}).p_sign_flip == pytest.approx(2 / 8)
    # d = (1, -1, 2, 3), sum 5: (+,+,+,+) = 5, (+,-,+,+) = 7, (-,-,+,+) = 5 and their negations: 6 of 16.
    assert sign_flip_p([1.0, -1.0, 2.0, 3.0]) == pytest.approx(6 / 16)
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0


def test_a_difference_without_spread_is_not_p_zero():
    # The same difference on every seed (reachable on a 0.1-point accuracy grid): the t-test is undefined, and the
    # exact test says what 2 or 8 equal signs can say: p = 2 / 2^n.
    two = paired_comparison({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})
    assert math.isnan(two.p_t) and math.isnan(two.t) and two.p == pytest.approx(0.5)
    eight = paired_comparison({s: 0.9 for s in range(8)}, {s: 0.8 for s in range(8)})
    assert eight.p == pytest.approx(2 / 256) and (eight.ci_low, eight.ci_high) == pytest.approx((0.1, 0.1))
    assert math.isnan(eight.detectable)  # no spread: no power statement
    assert paired_comparison({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}).p == 1.0


def test_detectable_effect_has_the_power_it_claims():
    # Monte Carlo, independent of the non-central t: at the returned effect, the paired t-test on normal
    # differences rejects at 5 % in 80 % of 20,000 simulated designs, for 3 and 10 seeds.
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    for seeds in (3, 10):
        effect = detectable_effect(seeds, 2.0)
        d = rng.normal(effect, 2.0, size=(20_000, seeds))
        t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(seeds))
        rejected = np.mean(2 * stats.t.sf(np.abs(t), df=seeds - 1) < 0.05)
        assert rejected == pytest.approx(0.8, abs=0.012)
    # Textbook value (Cohen 1988; G*Power): a paired t-test with 10 pairs has 80 % power at d = 1.0.
    assert detectable_effect(10, 1.0) == pytest.approx(1.0, abs=0.01)
    assert math.isnan(detectable_effect(1, 1.0)) and math.isnan(detectable_effect(5, 0.0))


def test_cost_per_epoch_is_measured_or_interpolated_not_proportional_to_depth():
    measured = {3: 0.71, 6: 0.85}
    assert per_epoch_at(3, measured) == 0.71 and per_epoch_at(6, measured) == 0.85
    assert per_epoch_at(4, measured) == pytest.approx(0.71 + 0.14 / 3)
    assert per_epoch_at(2, measured) == 0.71 and per_epoch_at(8, measured) == 0.85  # nearest, not scaled by depth
    study = tiny(defaults={"deficit": "blur", "size": 2, "clean_epochs": 1, "depth": 6})
    epochs = sum(run.epochs for run in study.runs())
    assert estimate_seconds(study, {3: 0.71}) == pytest.approx(epochs * 0.71)  # was epochs * 0.71 * 6 / 3


def test_holm_against_a_hand_computed_example():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


class Counting:
    """Trains cells like the runner does; counts them; raises KeyboardInterrupt at the ``stop_at``-th call."""

    def __init__(self, stop_at=None):
        self.calls = []
        self.stop_at = stop_at

    def __call__(self, cell):
        self.calls.append(cell.parent.name)
        if len(self.calls) == self.stop_at:
            raise KeyboardInterrupt
        fit_cell(cell)


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def interrupted_study(tmp_path_factory):
    """The tiny study stopped by a KeyboardInterrupt in its 3rd run, then run again to the end."""
    out = tmp_path_factory.mktemp("study")
    study = tiny()
    first = Counting(stop_at=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study's workers train (`--threads 1`): their runs compare bit for bit
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(study, out, fit=first)
        finished = _rows(out)
        second = Counting()
        trained = run_study(study, out, fit=second)
    finally:
        torch.set_num_threads(threads)
    return study, out, first, finished, second, trained


def test_interrupted_study_resumes_without_redoing_finished_runs(interrupted_study):
    study, out, first, finished, second, trained = interrupted_study
    assert [r["run_id"] for r in finished] == first.calls[:2]
    # the stopped run afresh, then the rest
    assert trained == 4 and second.calls == [r.run_id for r in study.runs()][2:]
    rows = _rows(out)
    assert rows[:2] == finished and sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in study.runs())
    assert run_study(study, out, fit=Counting()) == 0


@pytest.mark.slow
def test_two_worker_processes_train_the_study_once_as_one_process_does(interrupted_study, tmp_path):
    study, serial_out = interrupted_study[:2]
    out = tmp_path / "parallel"
    stream = io.StringIO()
    assert run_study(study, out, stream=stream, jobs=2) == 6
    assert "6 runs in 2 worker processes" in stream.getvalue() and stream.getvalue().count("test acc") == 6
    serial, parallel = {r["run_id"]: r for r in read_results(serial_out)}, {r["run_id"]: r for r in read_results(out)}
    assert sorted(parallel) == sorted(serial) == sorted(r.run_id for r in study.runs())
    for run_id, row in parallel.items():  # one torch thread in the workers and in the fixture: the same run
        assert row["test_acc"] == serial[run_id]["test_acc"], run_id
    serial_fisher, parallel_fisher = read_fisher(serial_out), read_fisher(out)
    for run_id, curves in parallel_fisher.items():
        assert curves.keys() == serial_fisher[run_id].keys()
        for layer, values in curves.items():
            assert values == pytest.approx(serial_fisher[run_id][layer], rel=1e-6), (run_id, layer)
    assert run_study(study, out, jobs=2) == 0


def test_a_failing_run_in_a_worker_stops_the_study_with_its_error(tmp_path):
    broken = yaml.safe_load(yaml.safe_dump(TINY["base"]))
    broken["model"]["init_args"]["channels"] = "four"  # refused by the CLI with SystemExit, in the worker
    study = tiny(seeds=[0, 1], experiments=[TINY["experiments"][0]], base=broken)
    with pytest.raises(RuntimeError, match="the run of .*cell.yaml failed: SystemExit"):
        run_study(study, tmp_path, jobs=2)
    assert not (tmp_path / "results.csv").exists()


def test_bad_jobs_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="`jobs` must be a positive integer, got 0"):
        run_study(tiny(), tmp_path, jobs=0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_parent():
    grandchild = (
        "import os, time; from lightning_startwell.study.runner import _die_with_parent;"
        " _die_with_parent(os.getppid()); print('ready', flush=True); time.sleep(300)"
    )
    parent_code = (
        "import subprocess, sys, time;"
        f" child = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE);"
        " child.stdout.readline(); print(child.pid, flush=True); time.sleep(300)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.time() + 60
    while _alive(worker):  # without the request the worker sleeps on for 300 s
        assert time.time() < deadline, "the worker outlived its killed parent by 60 s"
        time.sleep(0.05)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie waits for init to reap it: it runs no more
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_study_resumes(tmp_path, jobs):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "seeds": [0, 1], "experiments": TINY["experiments"][:1]}))
    command = [sys.executable, "-m", "lightning_startwell.study", "run", "--config", str(config), "--out", "out",
               "--jobs", str(jobs)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = tmp_path / "out" / "results.csv"
    deadline = time.time() + 900  # seconds on an idle machine; minutes on a shared one
    while not (results.exists() and len(results.read_text().splitlines()) >= 2) and process.poll() is None:
        assert time.time() < deadline, "the study wrote no result in 900 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # with 2 jobs its workers die with it
    process.wait()
    before = _rows(tmp_path / "out")
    assert 1 <= len(before) < 4
    # a worker may have finished a run after the parent's last row: the restart reads it back from its directory
    finished_unlisted = [d for d in (tmp_path / "out" / "runs").iterdir()
                         if (d / "result.json").exists() and d.name not in {r["run_id"] for r in before}]
    done = len(before) + len(finished_unlisted)
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert f"{done}/4 runs already done" in again.stdout
    assert again.stdout.count("test acc") == 4 - done
    assert "[4/4]" in again.stdout and "ETA" in again.stdout
    after = _rows(tmp_path / "out")
    assert after[: len(before)] == before and len({r["run_id"] for r in after}) == len(after) == 4


def test_cells_run_elsewhere_by_startwell_fit_are_merged(tmp_path):
    study = tiny(seeds=[0, 1], experiments=[TINY["experiments"][1]])  # a Fisher experiment: every run measures it
    remote = tmp_path / "cluster"
    cells = write_cells(study, remote)
    assert (remote / "cells.txt").read_text().split() == [str(c) for c in cells] and len(cells) == 4
    for cell in cells[:3]:  # what each task of a scheduler's array does
        startwell(["fit", "--config", str(cell)])
    home = tmp_path / "home"
    merged = merge(home, study.runs(), [remote])
    assert merged == [r.run_id for r in study.runs()][:3]
    assert merge(home, study.runs(), [remote]) == []  # nothing twice
    fisher = read_fisher(home)
    epochs = {r.run_id: r.epochs for r in study.runs()}
    assert len(fisher) == 3 and all(len(c["total"]) == epochs[run] + 1 for run, c in fisher.items())  # init + epochs
    for curves in fisher.values():
        layers = [sum(v) for v in zip(*(c for name, c in curves.items() if name != "total"), strict=True)]
        assert layers == pytest.approx(curves["total"], rel=1e-6)
    assert [r["run_id"] for r in read_results(home)] == merged
    curves = read_curves(home)  # the test accuracy after every epoch, the last one the run's final test accuracy
    assert sorted(curves) == sorted(merged) and all(len(curves[run]) == epochs[run] for run in merged)
    assert all(curves[r["run_id"]][-1] == r["test_acc"] for r in read_results(home))


def test_report_tables_and_figures(interrupted_study):
    study, out = interrupted_study[:2]
    report = write_report(study, out).read_text()
    rows = read_results(out)
    blurred = [r["test_acc"] for r in rows if r["deficit"] == "blur"]
    clean = [r["test_acc"] for r in rows if r["deficit"] == "none"]
    assert f"{100 * statistics.mean(blurred):.2f} ± {100 * statistics.stdev(blurred):.2f}" in report
    assert f"{100 * statistics.mean(clean):.2f} ± {100 * statistics.stdev(clean):.2f}" in report
    assert "paired t-test" in report and "Holm" in report
    # The seed count and degrees of freedom come from the data, and so does the power statement.
    assert "pair 3 seeds: the t-test has 2 degrees of freedom" in report
    assert "a mean difference of (3 seeds: 3.3 standard deviations)" in report
    blur_row = next(line for line in report.splitlines() if line.startswith("| length = 1"))
    d = [b - c for b, c in zip(blurred, clean, strict=True)]  # rows come in seed order for both cells
    assert f"{100 * statistics.mean(d):.2f} ± {100 * statistics.stdev(d):.2f}" in blur_row
    for name in ("length", "layers"):
        assert f"]({name}.png)" in report and (out / f"{name}.png").stat().st_size > 5_000


def test_a_table_written_before_a_parameter_existed_reads_with_its_default(tmp_path):
    run = RunSpec(length=1, seed=2).normalised()
    new = {"fisher_probe", "optimizer", "dropout", "wd_mode", "cutoff_signal", "train_acc", "train_loss", "cutoff_used"}
    old_columns = [c for c in RESULT_COLUMNS if c not in new]
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({"run_id": run.run_id, **{c: getattr(run, c) for c in old_columns[1:-3]},
                         "test_acc": 0.5, "val_acc": 0.25, "seconds": 3})
    (row,) = read_results(tmp_path)
    assert row["fisher_probe"] == "clean" and row["length"] == 1 and row["seed"] == 2 and row["test_acc"] == 0.5
    timing = (row["optimizer"], row["dropout"], row["wd_mode"], row["cutoff_signal"])
    assert timing == ("sgd", 0.0, "throughout", "fixed")
    assert math.isnan(row["train_acc"]) and math.isnan(row["cutoff_used"])


def test_study_record_measures_without_changing_the_run(tmp_path):
    """The per-epoch test accuracy draws nothing from the training streams (a dropout model trains to the same
    weights with and without it), and the result holds the training split's measures and the cutoff applied."""
    import lightning.pytorch as pl

    from lightning_startwell import MLP, DigitsDataModule, WeightDecaySchedule
    from lightning_startwell.study.record import StudyRecord, evaluate

    def fit(callbacks):
        pl.seed_everything(3, verbose=False)
        model = MLP(input_shape=(1, 8, 8), depth=1, width=16, dropout=0.5,
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3))
        data = DigitsDataModule(batch_size=32)
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks)
        trainer.fit(model, data)
        return model, data

    path = tmp_path / "result.json"
    recorded, data = fit([WeightDecaySchedule(mode="early", cutoff_fraction=0.5), StudyRecord(str(path))])
    plain, _ = fit([WeightDecaySchedule(mode="early", cutoff_fraction=0.5)])
    for a, b in zip(recorded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    result = json.loads(path.read_text())
    assert len(result["curve"]) == 2 and result["curve"][-1] == result["test_acc"]
    assert result["cutoff_used"] == 3 / 6  # the schedule switched at step 3 of 6
    # the training split's accuracy and mean cross-entropy against a direct float64 computation
    x, y = data.train_set.tensors
    recorded.eval()
    with torch.no_grad():
        logits = recorded(x).double()
    assert result["train_acc"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
    assert result["train_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-6)
    assert evaluate(recorded, [(x, y)], torch.device("cpu")) == pytest.approx((result["train_acc"],
                                                                               result["train_loss"]))
