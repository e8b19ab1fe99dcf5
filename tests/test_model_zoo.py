"""The model zoo: twelve model families built from configs (nothing downloaded, see ``zoo.py``) times every callback,
then times the run modes a user reaches for first. Every cell either does its job — checked on what it did — or
refuses before changing anything, with an error that names the argument to set or says what is unsupported. The
expectation table ``EXPECTED`` is the one in docs/own_model.md ("Model zoo"): a change of behaviour fails here.

Budget (2 CPU cores): one tiny fit per (family, callback), 2 optimizer steps; then one fit per (family, mode) with
every callback that works for the family attached at once."""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from typing import Any

import pytest
import torch
from conftest import make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from zoo import FAMILIES, tensors_of  # noqa: E402

from lightning_startwell.callbacks import (  # noqa: E402
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.callbacks.critical_period import CriticalPeriodMonitor  # noqa: E402
from lightning_startwell.callbacks.weight_decay import WeightDecaySchedule  # noqa: E402
from lightning_startwell.deficits import class_permutation  # noqa: E402

CALLBACKS = {
    "InitScheme": (InitScheme, {"seed": 0}),
    "SignalPropagationMonitor": (SignalPropagationMonitor, {"every_n_steps": 1}),
    "DropoutSchedule": (DropoutSchedule, {"p": 0.2, "mode": "early", "cutoff_steps": 1}),
    "StochasticDepthSchedule": (StochasticDepthSchedule, {"drop_rate": 0.2}),
    "FisherTraceMonitor": (FisherTraceMonitor, {"num_samples": 8, "batch_size": 4, "every_n_steps": 2}),
    "DeficitInjector": (DeficitInjector, {"start_epoch": 0, "end_epoch": 1, "size": 4, "noise_std": 0.5}),
    "GradientDynamicsMonitor": (GradientDynamicsMonitor, {"num_batches": 2, "batch_size": 4, "every_n_steps": 1}),
    "WeightDecaySchedule": (WeightDecaySchedule, {"mode": "early", "cutoff_steps": 1}),
    "CriticalPeriodMonitor": (CriticalPeriodMonitor, {"every_n_steps": 1, "min_measurements": 1}),
}
PREFIX = {
    "InitScheme": "startwell/init/",
    "SignalPropagationMonitor": "startwell/signal/",
    "DropoutSchedule": "startwell/dropout/",
    "StochasticDepthSchedule": "startwell/depth/",
    "FisherTraceMonitor": "startwell/fisher/",
    "DeficitInjector": "startwell/deficit/",
    "GradientDynamicsMonitor": "startwell/dynamics/",
    "WeightDecaySchedule": "startwell/weight_decay/",
    "CriticalPeriodMonitor": "startwell/critical_period/",
}

WORKS = "works"
# family x callback -> "works", or the argument (or method) the refusal's message names in backticks; the table of
# docs/own_model.md ("Model zoo"), checked against this one below.
_NO_DROPOUT = "attributes"
_NO_BLOCKS = "blocks"
_NO_FORWARD = "startwell_forward"
EXPECTED: dict[str, dict[str, str]] = {
    "timm_convnext": {},
    "timm_vit": {},
    "tv_mobilenet_v3": {"StochasticDepthSchedule": _NO_BLOCKS},
    "tv_resnet": {"DropoutSchedule": _NO_DROPOUT},
    "hf_bert": {},
    "hf_gpt2": {},
    "hf_vit": {},
    "lstm_text": {"StochasticDepthSchedule": _NO_BLOCKS},
    "unet_segmentation": {"StochasticDepthSchedule": _NO_BLOCKS},
    "mlp_regression": {"StochasticDepthSchedule": _NO_BLOCKS, "CriticalPeriodMonitor": "signal"},
    "namedtuple_own_loss": {"StochasticDepthSchedule": _NO_BLOCKS},
    "no_forward": {"StochasticDepthSchedule": _NO_BLOCKS, "FisherTraceMonitor": _NO_FORWARD,
                   "GradientDynamicsMonitor": _NO_FORWARD, "CriticalPeriodMonitor": _NO_FORWARD},
}
EXPECTED = {family: {cb: EXPECTED[family].get(cb, WORKS) for cb in CALLBACKS} for family in FAMILIES}
# Cells that crash because of a library bug, while it is open: the expected behaviour stays in EXPECTED, the crash is a
# strict expected failure (the fix shows up here, and the cell then joins the run modes). None open: the zoo's two
# (GPT-2 x GradientDynamicsMonitor, LSTM x FisherTraceMonitor) are fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
REFUSAL_WORDS = re.compile(r"`\w+`|unsupported|does not support")


def make_callback(family: str, name: str) -> Callback:
    cls, args = CALLBACKS[name]
    args = {**args, **FAMILIES[family].args.get(name, {})}
    if name == "DeficitInjector":
        return cls(FAMILIES[family].deficit, **args)
    return cls(**args)


class Snapshot(Callback):
    """The weights as training starts (after every callback's ``on_fit_start``)."""

    def on_train_start(self, trainer, pl_module):
        self.params = weights(pl_module)


class RateProbe(Callback):
    """The model's dropout and drop-path rates as every training batch starts (after the schedules set them)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(rates(pl_module))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)}


def hooks(module: nn.Module) -> dict[str, int]:
    """How many hooks every submodule and parameter holds (and the global module hooks)."""
    from torch.nn.modules import module as torch_module

    counts = {}
    for name, m in module.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            counts[f"{name}:{kind}"] = len(getattr(m, kind))
    for name, p in module.named_parameters():
        counts[f"{name}:tensor"] = len(p._backward_hooks or {})
        counts[f"{name}:post_accumulate"] = len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        counts[kind] = len(getattr(torch_module, kind))
    return counts


def rates(module: nn.Module) -> dict[str, float]:
    """Every dropout and drop-path rate the model holds: ``p`` of the dropout modules, float attributes named
    ``*drop*`` (timm ``drop_prob``, ``nn.LSTM.dropout``, attention ``dropout`` floats)."""
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            found[f"{name}.p"] = float(m.p)
        for attr, value in vars(m).items():
            if "drop" in attr and isinstance(value, float):
                found[f"{name}.{attr}"] = value
    return found


def clean_batches(family: str) -> list[dict[Any, torch.Tensor]]:
    return [tensors_of(b) for b in FAMILIES[family].loader()]


def keys_of(family: str) -> tuple[Any, Any]:
    args = {**CALLBACKS["DeficitInjector"][1], **FAMILIES[family].args.get("DeficitInjector", {})}
    return args.get("input_key", 0), args.get("target_key", 1)


def assert_deficit_reached_training_step(family: str, seen: list[dict[Any, torch.Tensor]]) -> None:
    """Every batch ``training_step`` saw in the deficit window is a clean batch with the deficit applied: the other
    tensor unchanged, and the inputs changed (input deficits) or the classes permuted, -100 kept (label_permutation)."""
    assert seen, "training_step saw no batch"
    input_key, target_key = keys_of(family)
    clean = clean_batches(family)
    label = FAMILIES[family].deficit == "label_permutation"
    kept_key, changed_key = (input_key, target_key) if label else (target_key, input_key)
    for batch in seen:
        matches = [c for c in clean if torch.equal(c[kept_key], batch[kept_key])]
        assert matches, "a batch training_step saw is no clean batch with the deficit applied"
        original = matches[0][changed_key]
        if label:
            num_classes = FAMILIES[family].args["DeficitInjector"]["num_classes"]
            permutation = class_permutation(num_classes, seed=0)
            ignored = original < 0
            assert ignored.any() == (family in ("hf_gpt2", "unet_segmentation"))
            assert torch.equal(batch[changed_key][ignored], original[ignored])  # -100 kept
            assert torch.equal(batch[changed_key][~ignored], permutation[original[~ignored]])
        else:
            assert batch[changed_key].shape == original.shape
            assert not torch.equal(batch[changed_key], original), "the deficit did not reach training_step"


def finite_tags(scalars: dict, prefix: str) -> list[str]:
    tags = [t for t in scalars if t.startswith(prefix)]
    assert tags, (prefix, sorted(scalars))
    bad = {t: v for t in tags for _, v in scalars[t] if not math.isfinite(v)}
    assert not bad, bad
    return tags


def assert_did_its_job(family: str, name: str, callback: Callback, module, before: dict, started: dict,
                       scalars: dict, steps: int, probe: RateProbe) -> None:
    """What callback ``name`` must have done in a fit of ``steps`` optimizer steps (``scalars`` None: no logger), the
    rates ``probe`` saw at the first training batch."""
    if scalars is not None:
        finite_tags(scalars, PREFIX[name])
    if name == "InitScheme":
        assert callback.applied
        exclude = FAMILIES[family].args.get("InitScheme", {}).get("exclude") or []
        changed = [n for n in before if not torch.equal(before[n], started[n])]
        assert changed, "InitScheme changed no weight"
        excluded = [n for n in before if any(fnmatch.fnmatchcase(n.rpartition(".")[0], p) for p in exclude)]
        assert not set(excluded) & set(changed), "excluded weights were initialised"
        if family == "hf_gpt2":
            assert module.gpt.lm_head.weight is module.gpt.transformer.wte.weight  # the tie kept
            assert torch.equal(started["gpt.lm_head.weight"], before["gpt.transformer.wte.weight"])
    elif name == "DropoutSchedule":  # every dropout module, and the named float rates, at p on the first step
        attributes = FAMILIES[family].args.get("DropoutSchedule", {}).get("attributes") or []
        first = probe.seen[0]
        dropout = [k for k in first if k.endswith(".p") and "drop_path" not in k]
        named = [k for k in first if any(fnmatch.fnmatchcase(k, a) for a in attributes)]
        assert dropout or named
        assert all(first[k] == pytest.approx(0.2) for k in dropout + named), first
        if scalars is not None:
            values = [v for _, v in sorted(scalars["startwell/dropout/rate"])]
            assert values[0] == pytest.approx(0.2) and values[-1] == 0.0, values
    elif name == "StochasticDepthSchedule":  # the model's own drop-path rates off while the hooks drop
        own = [k for k in probe.seen[0] if k.endswith("drop_prob")]
        assert all(seen[k] == 0.0 for seen in probe.seen for k in own), own
    elif name == "FisherTraceMonitor" and scalars is not None:
        trace = sorted(scalars["startwell/fisher/trace"])
        assert [s for s, _ in trace] == list(range(0, steps + 1, 2)), trace
        assert all(v > 0 for _, v in trace), trace
    elif name == "WeightDecaySchedule":  # on at step 0, off from the cutoff (step 1), the optimizer's value restored
        if scalars is not None:
            factor = sorted(scalars["startwell/weight_decay/factor"])
            assert factor and all(v == float(step < 1) for step, v in factor), factor  # cutoff_steps=1
        groups = [g for optimizer in module.trainer.optimizers for g in optimizer.param_groups]
        assert groups and all(g["weight_decay"] == 1e-4 for g in groups), groups
    elif name == "DeficitInjector":
        if scalars is not None:
            assert {v for _, v in scalars["startwell/deficit/active"]} == {1.0}
        assert_deficit_reached_training_step(family, module.seen)
    elif name == "GradientDynamicsMonitor" and scalars is not None:
        dynamics = {tag: dict(scalars[f"startwell/dynamics/{tag}"]) for tag in
                    ("grad_norm", "distance", "direction_variance", "direction_error")}
        assert all(v > 0 for v in dynamics["grad_norm"].values()), dynamics
        distance = dynamics["distance"]
        assert len(distance) > 1, distance
        if 0 in distance:  # w_0 is where training starts: no distance yet, then some
            assert distance[0] == 0.0 and distance[max(distance)] > 0, distance
        else:  # resumed: w_0 of the first run, kept in the checkpoint
            assert all(v > 0 for v in distance.values()), distance
        for tag in ("direction_variance", "direction_error"):
            assert all(0 <= v <= 1 for v in dynamics[tag].values()), dynamics


def build(family: str):
    torch.manual_seed(0)
    return FAMILIES[family].build()


def fit(family: str, module, callbacks: list[Callback], root, ckpt_path=None, **trainer_args):
    trainer = make_trainer(root, callbacks, **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, FAMILIES[family].loader(), ckpt_path=ckpt_path)
    return trainer


CELLS = [
    pytest.param(family, name, id=f"{family}-{name}", marks=[pytest.mark.xfail(
        reason=KNOWN_BUGS[family, name], raises=RuntimeError, strict=True)] if (family, name) in KNOWN_BUGS else [])
    for family in FAMILIES for name in CALLBACKS
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), CELLS)
def test_every_callback_alone_works_or_refuses_naming_what_to_set(tmp_path, family, name):
    module = build(family)
    before, hooks_before, rates_before = weights(module), hooks(module), rates(module)
    callback, snapshot, probe = make_callback(family, name), Snapshot(), RateProbe()
    expected = EXPECTED[family][name]
    if expected == WORKS:
        trainer = fit(family, module, [callback, snapshot, probe], tmp_path, max_steps=2)
        assert trainer.global_step == 2
        scalars = read_scalars(tmp_path / "lightning_logs")
        assert_did_its_job(family, name, callback, module, before, snapshot.params, scalars, steps=2, probe=probe)
    else:
        with pytest.raises(Exception) as refusal:  # noqa: B017 (the type is checked below)
            fit(family, module, [callback, snapshot], tmp_path, max_steps=2)
        message = str(refusal.value)
        assert isinstance(refusal.value, (ValueError, NotImplementedError)), repr(refusal.value)
        assert f"`{expected}" in message and REFUSAL_WORDS.search(message), message
        after = weights(module)
        assert all(torch.equal(before[n], after[n]) for n in before), "weights changed by a refused fit"
    assert not any(hooks_before.values())  # the zoo's models come without hooks of their own
    assert not any(hooks(module).values()), "hooks left on the model after fit"
    assert rates(module) == rates_before, "dropout / drop-path rates not restored after fit"


MODES = {
    "fit": {"max_epochs": 1},
    "fast_dev_run": {"fast_dev_run": True},
    "max_steps": {"max_steps": 3},
    "accumulate_grad_batches": {"accumulate_grad_batches": 2},
    "bf16-mixed": {"precision": "bf16-mixed", "max_steps": 2},
    "resume": {"max_steps": 4},  # from a checkpoint at step 2
    "validate_test": {},
}
STEPS = {"fit": 4, "fast_dev_run": 1, "max_steps": 3, "accumulate_grad_batches": 2, "bf16-mixed": 2, "resume": 4}


def working(family: str) -> list[str]:
    return [n for n, expected in EXPECTED[family].items() if expected == WORKS and (family, n) not in KNOWN_BUGS]


MODE_CELLS = [(family, mode) for family in FAMILIES for mode in MODES]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "mode"), MODE_CELLS, ids=[f"{f}-{m}" for f, m in MODE_CELLS])
def test_every_run_mode_with_every_working_callback_together(tmp_path, family, mode):
    module = build(family)
    names = working(family)
    callbacks = {name: make_callback(family, name) for name in names}
    snapshot, probe = Snapshot(), RateProbe()
    before, hooks_before, rates_before = weights(module), hooks(module), rates(module)
    if mode == "validate_test":
        trainer = make_trainer(tmp_path, [*callbacks.values()], limit_val_batches=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (validated,) = trainer.validate(module, FAMILIES[family].loader(), verbose=False)
            (tested,) = trainer.test(module, FAMILIES[family].loader(), verbose=False)
        assert math.isfinite(validated["val/loss"]) and math.isfinite(tested["test/loss"])
        after = weights(module)
        assert all(torch.equal(before[n], after[n]) for n in before), "evaluation changed the weights"
        assert module.seen == []
        scalars = read_scalars(tmp_path / "lightning_logs")
        assert not [t for t in scalars if t.startswith("startwell/")], sorted(scalars)
    else:
        ckpt_path = None
        if mode == "resume":
            every_2 = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_top_k=-1)
            first_callbacks = [make_callback(family, n) for n in names]
            fit(family, module, [*first_callbacks, every_2], tmp_path / "first", max_steps=2)
            ckpt_path = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
            saved = weights(module)
            module = build(family)
            before = weights(module)
        all_callbacks = [*callbacks.values(), snapshot, probe]
        trainer = fit(family, module, all_callbacks, tmp_path, ckpt_path=ckpt_path, **MODES[mode])
        assert trainer.global_step == STEPS[mode]
        if mode == "resume":  # nothing re-initialised: training goes on from the checkpoint's weights
            assert all(torch.equal(saved[n], snapshot.params[n]) for n in saved)
        logged = mode != "fast_dev_run"
        scalars = read_scalars(tmp_path / "lightning_logs") if logged else None
        for name, callback in callbacks.items():
            if mode == "resume" and name == "InitScheme":
                continue  # its state says applied (in the first run); the weights are the checkpoint's (above)
            if mode == "resume" and name == "DropoutSchedule":  # the rate from the global step: past the cutoff
                assert {v for _, v in scalars["startwell/dropout/rate"]} == {0.0}
                continue
            if mode == "resume" and name == "FisherTraceMonitor":
                assert [s for s, _ in sorted(scalars["startwell/fisher/trace"])] == [4]
                continue
            if mode in ("fast_dev_run", "max_steps") and name == "FisherTraceMonitor":
                finite_tags(scalars, PREFIX[name]) if logged else None
                continue
            assert_did_its_job(family, name, callback, module, before, snapshot.params, scalars,
                               steps=STEPS[mode], probe=probe)
    assert not any(hooks_before.values())
    assert not any(hooks(module).values()), "hooks left on the model"
    assert rates(module) == rates_before, "dropout / drop-path rates not restored"


def test_the_docs_table_is_the_expectation_table():
    """docs/own_model.md, "Model zoo": one row per family, one column per callback; a cell is ``works``, ``refuses:
    `argument``` or, for a known bug, ``works`` followed by what crashes today."""
    from conftest import REPO

    text = (REPO / "docs" / "own_model.md").read_text()
    section = text.split("## Model zoo\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    header = next(line for line in section.splitlines() if line.startswith("| family"))
    columns = [c.strip().strip("`") for c in header.strip().strip("|").split("|")][2:]
    assert columns == list(CALLBACKS)
    table = {}
    for row in rows:
        family, cells = row[0].strip().strip("`"), [c.strip() for c in row[2:]]
        table[family] = {}
        for name, cell in zip(columns, cells, strict=True):
            assert ("bug" in cell) == ((family, name) in KNOWN_BUGS), (family, name, cell)
            refusal = re.fullmatch(r"refuses: `(\w+)`", cell)
            table[family][name] = refusal.group(1) if refusal else WORKS if cell.startswith("works") else cell
    assert table == EXPECTED
