"""A study: its YAML, the runs its experiments ask for, and the plain ``startwell fit`` config of each run (a cell).

A study YAML has four parts (see ``profiles/quick.yaml``)::

    seeds: [0, 1, 2]
    defaults: {deficit: blur, size: 4, clean_epochs: 20, weight_decay: 5.0e-4, depth: 3, ...}   # every run's parameters
    base: {trainer: {...}, model: {...}, data: {...}}       # the LightningCLI config every cell extends
    fisher: {num_samples: 256, batch_size: 128}             # FisherTraceMonitor, every epoch
    experiments:
      - {name: length, title: ..., plot: curve, x: length, grid: {length: [0, 10, 20, 40]}, reference: {length: 0}}
    claims:                                                 # optional: what the study tests, and how (below)
      - {name: length, paper: ..., expect: lower, comparisons: [{experiment: length, cell: {length: 20},
                                                                 reference: {length: 10}}]}

An experiment is the product of its ``grid`` over the seeds, on top of ``defaults`` and its ``fixed`` values; runs that
two experiments share (the no-deficit baseline) are one run. Each cell of an experiment is compared with its
``reference``: the same parameters with ``reference`` applied on top, seed by seed.

A claim (:class:`Claim`) is a statement of the paper the study tests: its comparisons (a cell of an experiment against a
reference, or the difference of two such comparisons) with the expected direction, one Holm family per claim.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from lightning_startwell.deficits import DEFICITS

PROFILES_DIR = Path(__file__).parent / "profiles"
PROFILES = ("quick", "standard", "full", "early_dropout", "weight_decay", "fisher_no_norm")
PLOTS = ("curve", "bars", "fisher", "fisher_layers")
FISHER_PLOTS = ("fisher", "fisher_layers")
NO_DEFICIT = "none"
EXPECTATIONS = ("lower", "higher", "no_loss")


@dataclass(frozen=True)
class RunSpec:
    """The parameters of one training run.

    The deficit acts on epochs ``[onset, onset + length)``; ``length`` 0 is no deficit. The run lasts ``epochs`` epochs,
    or ``onset + length + clean_epochs`` when ``epochs`` is None. The learning rate is ``lr * lr_decay ** e`` at epoch e
    (``lr_schedule: decay``, the paper's 0.97 per epoch) or ``lr`` throughout (``constant``); ``lr_offset`` starts the
    decay as if that many epochs had passed (a fresh network at the learning rate a deficit arm has when its deficit
    ends); ``cosine`` is a linear warm-up over ``warmup_epochs`` then a cosine decay to 0 at the last epoch (Liu et
    al.'s recipe, per epoch). ``optimizer`` is ``sgd`` (momentum 0.9, L2 weight decay) or ``adamw`` (decoupled
    weight decay).
    ``depth`` is the number of stages (blocks, hidden layers) of the model family in ``base``.
    ``fisher_probe`` is the FisherTraceMonitor's ``probe``: ``clean``, or ``training`` (through the active deficit).

    Timing of regularisation (Liu et al. 2023; Golatkar et al. 2019): ``dropout`` > 0 drives the model's dropout with
    a ``DropoutSchedule`` of mode ``dropout_mode`` and shape ``dropout_shape``; ``wd_mode`` ``early`` / ``late``
    applies the weight decay only before / after the cutoff (``WeightDecaySchedule``). The cutoff of either is
    ``cutoff`` (a fraction of the training steps) with ``cutoff_signal: fixed``; ``critical_period``: the step at
    which the run's ``CriticalPeriodMonitor`` declares the critical period over; ``random``: a fraction drawn per
    seed, uniformly in the study's ``random_cutoff`` range (:func:`random_cutoff`).
    """

    deficit: str = "blur"
    size: int = 4
    onset: int = 0
    length: int = 0
    clean_epochs: int = 20
    epochs: Optional[int] = None
    weight_decay: float = 5e-4
    depth: int = 3
    lr: float = 0.05
    lr_decay: float = 0.97
    lr_schedule: str = "decay"
    lr_offset: int = 0
    fisher_probe: str = "clean"
    optimizer: str = "sgd"
    warmup_epochs: int = 0
    dropout: float = 0.0
    dropout_mode: str = "standard"
    dropout_shape: str = "constant"
    wd_mode: str = "throughout"
    cutoff: float = 0.0
    cutoff_signal: str = "fixed"
    seed: int = 0

    @property
    def has_cutoff(self) -> bool:
        """Whether a schedule of this run switches at a cutoff (early or late dropout or weight decay)."""
        return (self.dropout > 0 and self.dropout_mode != "standard") or (
            self.weight_decay > 0 and self.wd_mode != "throughout"
        )

    def normalised(self) -> RunSpec:
        """The same run written one way: no deficit is ``deficit: none`` with onset and length 0; the total epochs
        resolved; the blur size kept only for blur; the Fisher probe clean (the two probes agree without deficit)."""
        none = self.length == 0 or self.deficit == NO_DEFICIT
        epochs = self.epochs if self.epochs is not None else self.onset + self.length + self.clean_epochs
        dropout_mode = self.dropout_mode if self.dropout > 0 else "standard"
        fixed_cutoff = self.has_cutoff and self.cutoff_signal == "fixed"
        return dataclasses.replace(
            self,
            warmup_epochs=self.warmup_epochs if self.lr_schedule == "cosine" else 0,
            dropout_mode=dropout_mode,
            dropout_shape=self.dropout_shape if dropout_mode != "standard" else "constant",
            wd_mode=self.wd_mode if self.weight_decay > 0 else "throughout",
            cutoff=self.cutoff if fixed_cutoff else 0.0,
            cutoff_signal=self.cutoff_signal if self.has_cutoff else "fixed",
            deficit=NO_DEFICIT if none else self.deficit,
            onset=0 if none else self.onset,
            length=0 if none else self.length,
            size=self.size if self.deficit == "blur" and not none else 0,
            epochs=epochs,
            clean_epochs=epochs - (0 if none else self.onset + self.length),
            fisher_probe="clean" if none else self.fisher_probe,
        )

    @property
    def run_id(self) -> str:
        """A readable name that tells runs apart (and names their directory)."""
        deficit = f"blur{self.size}" if self.deficit == "blur" else self.deficit
        lr = f"lr{self.lr:g}" + {
            "decay": f"x{self.lr_decay:g}+{self.lr_offset}",
            "constant": "const",
            "cosine": f"cos+w{self.warmup_epochs}",
        }[self.lr_schedule]
        return (
            f"{deficit}_on{self.onset}_len{self.length}_ep{self.epochs}_wd{self.weight_decay:g}_d{self.depth}_{lr}"
            + ("" if self.fisher_probe == "clean" else f"_probe{self.fisher_probe}")
            + ("" if self.optimizer == "sgd" else f"_{self.optimizer}")
            + self._regularisation_id()
            + f"_s{self.seed}"
        )

    def _regularisation_id(self) -> str:
        """The dropout and weight-decay timing part of :attr:`run_id` (empty for the defaults, so that the run ids
        of studies written before these parameters existed are unchanged)."""
        parts = ""
        if self.dropout > 0:
            parts += f"_drop{self.dropout:g}{self.dropout_mode}" + ("lin" if self.dropout_shape == "linear" else "")
        if self.wd_mode != "throughout":
            parts += f"_wd{self.wd_mode}"
        if self.has_cutoff:
            parts += {"fixed": f"@{self.cutoff:g}", "critical_period": "@cp", "random": "@random"}[self.cutoff_signal]
        return parts

    def without_seed(self) -> RunSpec:
        return dataclasses.replace(self, seed=-1)


PARAMETERS = tuple(f.name for f in dataclasses.fields(RunSpec))
CHOICES = {
    "lr_schedule": ("decay", "constant", "cosine"),
    "fisher_probe": ("clean", "training"),
    "optimizer": ("sgd", "adamw"),
    "dropout_mode": ("standard", "early", "late"),
    "dropout_shape": ("constant", "linear"),
    "wd_mode": ("throughout", "early", "late"),
    "cutoff_signal": ("fixed", "critical_period", "random"),
}
FRACTIONS = {"dropout": (0.0, 1.0, False), "cutoff": (0.0, 1.0, True)}  # name: (low, high, high included)
DEFAULT_RANDOM_CUTOFF = (0.01, 0.5)  # Liu et al. (2023): early dropout is robust to cutoffs from 1 % to 50 %


def random_cutoff(seed: int, low: float, high: float) -> float:
    """The cutoff fraction of a ``cutoff_signal: random`` run of ``seed``: uniform in [low, high], the same for a
    seed in every process and run (its own generator, seeded by the seed, not the global streams)."""
    return random.Random(f"random cutoff of seed {seed}").uniform(low, high)


@dataclass
class Experiment:
    """A slice of the study: a grid over some parameters, one figure and one table in the report."""

    name: str
    title: str
    plot: str
    x: str
    grid: dict[str, list[Any]]
    fixed: dict[str, Any]
    reference: dict[str, Any]
    series: Optional[str] = None
    note: str = ""

    def cells(self, defaults: dict[str, Any]) -> list[RunSpec]:
        """The runs of one seed (seed -1) of every grid point, in grid order, normalised."""
        keys = list(self.grid)
        cells = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            params = {**defaults, **self.fixed, **dict(zip(keys, values, strict=True)), "seed": -1}
            cell = RunSpec(**params).normalised()
            if cell.cutoff_signal == "critical_period" and cell.dropout_shape == "linear":
                raise ValueError(
                    f"experiment {self.name!r}: `dropout_shape: linear` decays to 0 at the cutoff, which must then be"
                    " known in advance; with `cutoff_signal: critical_period` use `dropout_shape: constant`."
                )
            if cell not in cells:
                cells.append(cell)
        return cells

    def reference_of(self, cell: RunSpec, defaults: dict[str, Any]) -> RunSpec:
        """The run ``cell`` is compared with: its own parameters with ``reference`` on top (epochs re-derived from the
        clean phase unless the experiment fixes them)."""
        fields = {f: getattr(cell, f) for f in PARAMETERS}
        if "epochs" not in self.fixed and defaults.get("epochs") is None:
            fields["epochs"] = None
            fields["clean_epochs"] = self.fixed.get("clean_epochs", defaults.get("clean_epochs", RunSpec.clean_epochs))
        return RunSpec(**{**fields, **self.reference}).normalised()


def trained_model(run: RunSpec) -> RunSpec:
    """The trained model a run is: the run without its Fisher probe, which changes what is measured, not what is
    trained (the quick study's two probe arms have identical test accuracies, seed by seed). Two runs with the same
    trained model are one sample of the model, never two."""
    return dataclasses.replace(run, fisher_probe="clean")


@dataclass(frozen=True)
class ClaimComparison:
    """One comparison of a claim: ``cell`` against ``reference`` (cells, seed -1), on the per-seed differences of the
    final test accuracy. With ``versus`` (a second pair), the per-seed difference of the two comparisons: (cell -
    reference) - (versus cell - versus reference), the interaction that says whether a deficit costs more in one
    setting (more weight decay, more depth) than in another."""

    experiment: str
    cell: RunSpec
    reference: RunSpec
    versus: Optional[tuple[RunSpec, RunSpec]] = None

    def runs(self) -> tuple[RunSpec, ...]:
        return (self.cell, self.reference, *(self.versus or ()))

    def arms(self) -> set[RunSpec]:
        """The trained models this comparison tests (its cells; references may be shared within a family, like the
        common control of an experiment's cells)."""
        return {trained_model(self.cell), *((trained_model(self.versus[0]),) if self.versus else ())}


@dataclass
class Claim:
    """A statement of the paper the study tests: ``expect`` is the direction of the comparisons' mean difference
    (``lower``, ``higher``), or ``no_loss``: the difference is above ``-margin`` (points of accuracy, or nats of
    loss). ``measure`` is what is compared (:data:`MEASURES`, default the final test accuracy). Its comparisons are
    one Holm family. A claim without comparisons is described but not tested, for the reason in ``not_tested``."""

    name: str
    paper: str
    expect: str
    comparisons: list[ClaimComparison]
    margin: float = 0.0
    not_tested: str = ""
    measure: str = "test_acc"


@dataclass
class Study:
    """A parsed study YAML."""

    seeds: list[int]
    defaults: dict[str, Any]
    base: dict[str, Any]
    fisher: dict[str, Any]
    experiments: list[Experiment]
    name: str = "study"
    claims: list[Claim] = dataclasses.field(default_factory=list)
    critical_period: dict[str, Any] = dataclasses.field(default_factory=dict)
    random_cutoff: tuple[float, float] = DEFAULT_RANDOM_CUTOFF

    def fisher_cells(self) -> set[RunSpec]:
        """The cells whose runs measure the Fisher trace: those of the experiments that plot it (the trace costs
        about a third of a small network's epoch; the other runs need only their accuracies)."""
        return set(self.cells(plots=FISHER_PLOTS))

    def cells(self, plots: tuple[str, ...] = PLOTS) -> list[RunSpec]:
        """Every cell (seed -1) of the study, each once: the experiments' grids and the references they compare with;
        with ``plots``, those of the experiments drawn as one of them."""
        cells: list[RunSpec] = []
        for experiment in self.experiments:
            if experiment.plot not in plots:
                continue
            for cell in experiment.cells(self.defaults):
                for needed in (experiment.reference_of(cell, self.defaults), cell):
                    if needed not in cells:
                        cells.append(needed)
        return cells

    def runs(self) -> list[RunSpec]:
        """Every run of the study, each once, cell by cell and seed by seed within a cell."""
        return [dataclasses.replace(cell, seed=seed) for cell in self.cells() for seed in self.seeds]

    def total_epochs(self) -> int:
        return sum(run.epochs or 0 for run in self.runs())


def _check_parameters(where: str, values: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"{where}: unknown run parameter(s) {unknown}; accepted: {list(PARAMETERS)}.")
    deficits = values.get("deficit", [])
    for deficit in deficits if isinstance(deficits, list) else [deficits]:
        if deficit not in (NO_DEFICIT, *DEFICITS):
            raise ValueError(f"{where}: `deficit` must be one of {(NO_DEFICIT, *DEFICITS)}, got {deficit!r}.")
    for name, accepted in CHOICES.items():
        chosen = values.get(name, [])
        for value in chosen if isinstance(chosen, list) else [chosen]:
            if value not in accepted:
                raise ValueError(f"{where}: `{name}` must be one of {accepted}, got {value!r}.")
    for name, (low, high, closed) in FRACTIONS.items():
        chosen = values.get(name, [])
        for value in chosen if isinstance(chosen, list) else [chosen]:
            inside = isinstance(value, (int, float)) and low <= value and (value <= high if closed else value < high)
            if not inside:
                interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
                raise ValueError(f"{where}: `{name}` must be a number in {interval}, got {value!r}.")


def _experiment(raw: dict[str, Any]) -> Experiment:
    name = raw.get("name", "?")
    missing = [k for k in ("name", "plot", "x", "grid") if k not in raw]
    if missing:
        raise ValueError(f"experiment {name!r}: missing {missing}.")
    if raw["plot"] not in PLOTS:
        raise ValueError(f"experiment {name!r}: `plot` must be one of {PLOTS}, got {raw['plot']!r}.")
    grid = {k: v if isinstance(v, list) else [v] for k, v in raw["grid"].items()}
    for part in ("grid", "fixed", "reference"):
        _check_parameters(f"experiment {name!r}, `{part}`", grid if part == "grid" else raw.get(part, {}))
    return Experiment(
        name=name,
        title=raw.get("title", name),
        plot=raw["plot"],
        x=raw["x"],
        grid=grid,
        fixed=dict(raw.get("fixed", {})),
        reference=dict(raw.get("reference", {"length": 0})),
        series=raw.get("series"),
        note=raw.get("note", ""),
    )


CLAIM_KEYS = ("name", "paper", "expect", "margin", "measure", "comparisons", "not_tested")
#: What a claim compares, seed by seed: the final test accuracy, or the training split's accuracy or mean
#: cross-entropy (model in eval mode, the clean training split, after the last epoch).
MEASURES = ("test_acc", "train_acc", "train_loss")
COMPARISON_KEYS = ("experiment", "cell", "reference", "versus")


def _select_cell(where: str, experiment: Experiment, defaults: dict[str, Any], values: dict[str, Any]) -> RunSpec:
    """The one cell of ``experiment`` whose parameters have ``values``."""
    cells = experiment.cells(defaults)
    chosen = [c for c in cells if all(getattr(c, k) == v for k, v in values.items())]
    if len(chosen) != 1:
        listed = "; ".join(
            ", ".join(f"{k}={getattr(c, k)}" for k in (*experiment.grid, *experiment.fixed)) for c in cells
        )
        raise ValueError(
            f"{where}: `cell` {values} matches {len(chosen)} cells of experiment {experiment.name!r}, not one (its"
            f" cells: {listed})."
        )
    return chosen[0]


def _claim_comparison(
    where: str, raw: Any, experiments: dict[str, Experiment], defaults: dict[str, Any], study_cells: list[RunSpec]
) -> ClaimComparison:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a comparison is a mapping with {list(COMPARISON_KEYS)}, got {raw!r}.")
    unknown = sorted(set(raw) - set(COMPARISON_KEYS))
    if unknown or "experiment" not in raw or "cell" not in raw:
        raise ValueError(f"{where}: needs `experiment` and `cell` (optional `reference`, `versus`); unknown {unknown}.")
    if raw["experiment"] not in experiments:
        raise ValueError(f"{where}: `experiment` must be one of {list(experiments)}, got {raw['experiment']!r}.")
    experiment = experiments[raw["experiment"]]
    for part in ("cell", "reference", "versus"):
        if not isinstance(raw.get(part, {}), dict):
            raise ValueError(f"{where}: `{part}` is a mapping of run parameters, got {raw[part]!r}.")
        _check_parameters(f"{where}, `{part}`", raw.get(part, {}))
    # The claim's `reference` replaces the experiment's (it is applied to the cell the same way).
    compared = dataclasses.replace(experiment, reference=dict(raw.get("reference", experiment.reference)))

    def pair(cell: RunSpec, what: str) -> tuple[RunSpec, RunSpec]:
        reference = compared.reference_of(cell, defaults)
        if reference not in study_cells:
            raise ValueError(f"{where}: the reference of {what} ({reference.run_id}) is not a run of the study.")
        if trained_model(reference) == trained_model(cell):
            raise ValueError(f"{where}: {what} is compared with itself ({cell.run_id}).")
        return cell, reference

    cell, reference = pair(_select_cell(where, experiment, defaults, raw["cell"]), "the cell")
    versus = None
    if "versus" in raw:
        # the cell with `versus` applied, its epochs re-derived from the clean phase like a reference's
        other = dataclasses.replace(experiment, reference=dict(raw["versus"])).reference_of(cell, defaults)
        if other not in experiment.cells(defaults):
            raise ValueError(
                f"{where}: `versus` {raw['versus']} gives {other.run_id}, not a cell of {experiment.name!r}."
            )
        versus = pair(other, "the `versus` cell")
    return ClaimComparison(experiment=experiment.name, cell=cell, reference=reference, versus=versus)


def _claim(raw: Any, experiments: dict[str, Experiment], defaults: dict[str, Any], study_cells: list[RunSpec]) -> Claim:
    if not isinstance(raw, dict):
        raise ValueError(f"a claim is a mapping with {list(CLAIM_KEYS)}, got {raw!r}.")
    where = f"claim {raw.get('name', '?')!r}"
    unknown = sorted(set(raw) - set(CLAIM_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {list(CLAIM_KEYS)}.")
    missing = [k for k in ("name", "paper") if not raw.get(k)]
    if missing:
        raise ValueError(f"{where}: missing {missing}.")
    comparisons_raw = raw.get("comparisons", [])
    if bool(comparisons_raw) == bool(raw.get("not_tested")):
        raise ValueError(f"{where}: give either `comparisons` (a non-empty list) or `not_tested` (the reason).")
    expect = raw.get("expect", "")
    if comparisons_raw and expect not in EXPECTATIONS:
        raise ValueError(f"{where}: `expect` must be one of {EXPECTATIONS}, got {expect!r}.")
    margin = raw.get("margin", 0.0)
    measure = raw.get("measure", "test_acc")
    if measure not in MEASURES:
        raise ValueError(f"{where}: `measure` must be one of {MEASURES}, got {measure!r}.")
    if expect == "no_loss" and not (isinstance(margin, (int, float)) and margin > 0):
        raise ValueError(f"{where}: `expect: no_loss` needs a positive `margin` (points of accuracy), got {margin!r}.")
    if expect != "no_loss" and "margin" in raw:
        raise ValueError(f"{where}: `margin` is for `expect: no_loss` only.")
    if not isinstance(comparisons_raw, list):
        raise ValueError(f"{where}: `comparisons` must be a list, got {comparisons_raw!r}.")
    comparisons = [
        _claim_comparison(f"{where}, `comparisons` {i + 1}", c, experiments, defaults, study_cells)
        for i, c in enumerate(comparisons_raw)
    ]
    # One Holm family per claim, every trained model tested once in it: a comparison whose arm another comparison
    # already tests (the Fisher probe arms are one model), or the same pair of runs twice, is refused.
    for j, later in enumerate(comparisons):
        for i, earlier in enumerate(comparisons[:j]):
            shared = earlier.arms() & later.arms()
            same_pair = {trained_model(r) for r in earlier.runs()} == {trained_model(r) for r in later.runs()}
            if shared or same_pair:
                what = f"the same trained run {sorted(r.run_id for r in shared)[0]}" if shared else "the same runs"
                raise ValueError(
                    f"{where}: `comparisons` {i + 1} and {j + 1} test {what}; a trained run is counted once in a"
                    f" claim's family (the Fisher probe changes the measurement, not the model)."
                )
    return Claim(
        name=raw["name"],
        paper=str(raw["paper"]).strip(),
        expect=expect,
        comparisons=comparisons,
        margin=float(margin),
        not_tested=str(raw.get("not_tested", "")).strip(),
        measure=measure,
    )


def parse_study(raw: dict[str, Any]) -> Study:
    """A :class:`Study` from the loaded YAML, every part checked (errors name the part and the accepted values)."""
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` must be a list of distinct seeds, got {seeds!r}.")
    fisher = dict(raw.get("fisher", {}))
    if "probe" in fisher:  # the study-wide probe is the default of the run parameter `fisher_probe`
        defaults = {"fisher_probe": fisher.pop("probe"), **raw.get("defaults", {})}
    else:
        defaults = dict(raw.get("defaults", {}))
    _check_parameters("`defaults`", defaults)
    experiments = [_experiment(e) for e in raw.get("experiments", [])]
    if not experiments:
        raise ValueError("a study needs at least one entry under `experiments`.")
    critical_period = raw.get("critical_period", {})
    if not isinstance(critical_period, dict):
        raise ValueError(f"`critical_period` is a mapping of CriticalPeriodMonitor arguments, got {critical_period!r}.")
    low_high = raw.get("random_cutoff", list(DEFAULT_RANDOM_CUTOFF))
    if not (
        isinstance(low_high, list) and len(low_high) == 2 and all(isinstance(v, (int, float)) for v in low_high)
        and 0 <= low_high[0] < low_high[1] <= 1
    ):
        raise ValueError(f"`random_cutoff` must be [low, high] with 0 <= low < high <= 1, got {low_high!r}.")
    study = Study(
        seeds=seeds,
        defaults=defaults,
        base=copy.deepcopy(raw.get("base", {})),
        fisher=fisher,
        experiments=experiments,
        name=raw.get("name", "study"),
        critical_period=dict(critical_period),
        random_cutoff=(float(low_high[0]), float(low_high[1])),
    )
    claims_raw = raw.get("claims", [])
    if not isinstance(claims_raw, list):
        raise ValueError(f"`claims` must be a list of claims, got {claims_raw!r}.")
    by_name, cells = {e.name: e for e in experiments}, study.cells()
    study.claims = [_claim(c, by_name, defaults, cells) for c in claims_raw]
    names = [c.name for c in study.claims]
    if len(set(names)) != len(names):
        raise ValueError(f"`claims`: names must be distinct, got {names}.")
    return study


def load_study(path: Optional[Path] = None, profile: str = "quick") -> Study:
    """The study in ``path``, or the built-in ``profile`` (one of :data:`PROFILES`) when ``path`` is None."""
    if path is None:
        if profile not in PROFILES:
            raise ValueError(f"`profile` must be one of {PROFILES}, got {profile!r}.")
        path = PROFILES_DIR / f"{profile}.yaml"
    with open(path) as f:
        return parse_study(yaml.safe_load(f))


# The model argument that sets the depth of each family of the demo models, and how.
def _depth_arguments(class_path: str, depth: int, init_args: dict[str, Any]) -> dict[str, Any]:
    family = class_path.rsplit(".", 1)[-1]
    if family == "ConvNet":
        width = init_args.get("channels", [64])[-1]
        return {"channels": [width] * depth}
    if family == "ResNet":
        return {"num_blocks": depth}
    if family == "MLP":
        return {"depth": depth}
    raise ValueError(f"`depth` is defined for ConvNet, ResNet and MLP, not for model {class_path!r}.")


def cell_config(study: Study, run: RunSpec, run_dir: Path) -> dict[str, Any]:
    """The plain LightningCLI config of ``run``: ``startwell fit --config`` of it trains the run and writes its results
    (``result.json``, ``metrics.csv``) into ``run_dir``."""
    config = copy.deepcopy(study.base)
    trainer = config.setdefault("trainer", {})
    model = config.setdefault("model", {"class_path": "lightning_startwell.ConvNet"})
    data = config.setdefault("data", {"class_path": "lightning_startwell.MNIST1DDataModule"})
    config["seed_everything"] = run.seed
    init_args = model.setdefault("init_args", {})
    init_args.update(_depth_arguments(model["class_path"], run.depth, init_args))
    init_args["optimizer"] = _optimizer(run)
    init_args["lr_scheduler"] = _lr_scheduler(run)
    data.setdefault("init_args", {})["seed"] = run.seed
    trainer.update(
        max_epochs=run.epochs,
        default_root_dir=str(run_dir),
        enable_checkpointing=False,
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "", "version": "", "flush_logs_every_n_steps": 10**9},
        },
    )
    callbacks = list(trainer.get("callbacks", []))
    if run.deficit != NO_DEFICIT:
        callbacks.append(
            {
                "class_path": "lightning_startwell.callbacks.DeficitInjector",
                "init_args": {
                    "deficit": run.deficit,
                    "start_epoch": run.onset,
                    "end_epoch": run.onset + run.length,
                    "size": max(run.size, 1),
                    "seed": run.seed,
                    "lr_warning_ratio": 0.0,  # the study's own controls address the learning-rate confound
                },
            }
        )
    callbacks += _regularisation_callbacks(study, run)
    if study.fisher and run.without_seed() in study.fisher_cells():
        callbacks.append(
            {
                "class_path": "lightning_startwell.callbacks.FisherTraceMonitor",
                "init_args": {"every_n_epochs": 1, "seed": run.seed, **study.fisher, "probe": run.fisher_probe},
            }
        )
    callbacks.append(
        {
            "class_path": "lightning_startwell.study.record.StudyRecord",
            "init_args": {"path": str(run_dir / "result.json")},
        }
    )
    trainer["callbacks"] = callbacks
    return config


def _initial_lr(run: RunSpec) -> float:
    return run.lr * run.lr_decay**run.lr_offset if run.lr_schedule == "decay" else run.lr


def _optimizer(run: RunSpec) -> dict[str, Any]:
    if run.optimizer == "adamw":
        arguments = {"lr": _initial_lr(run), "weight_decay": run.weight_decay}
        return {"class_path": "torch.optim.AdamW", "init_args": arguments}
    return {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": _initial_lr(run), "momentum": 0.9, "weight_decay": run.weight_decay},
    }


def _lr_scheduler(run: RunSpec) -> Optional[dict[str, Any]]:
    if run.lr_schedule == "decay":
        return {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": run.lr_decay}}
    if run.lr_schedule == "cosine":
        return {
            "class_path": "lightning_startwell.schedules.WarmupCosineLR",
            "init_args": {"warmup_epochs": run.warmup_epochs, "max_epochs": run.epochs},
        }
    return None


def _cutoff_arguments(study: Study, run: RunSpec) -> dict[str, Any]:
    if run.cutoff_signal == "critical_period":
        return {"cutoff_signal": "critical_period"}
    fraction = random_cutoff(run.seed, *study.random_cutoff) if run.cutoff_signal == "random" else run.cutoff
    return {"cutoff_fraction": fraction}


def _regularisation_callbacks(study: Study, run: RunSpec) -> list[dict[str, Any]]:
    """The dropout and weight-decay schedules of ``run``, and the CriticalPeriodMonitor that a cutoff at the end of
    the critical period reads."""
    callbacks: list[dict[str, Any]] = []
    if run.cutoff_signal == "critical_period":  # before the schedules, which read its decision at the next batch
        callbacks.append(
            {
                "class_path": "lightning_startwell.callbacks.CriticalPeriodMonitor",
                "init_args": {"seed": run.seed, **study.critical_period},
            }
        )
    if run.dropout > 0:
        dropout: dict[str, Any] = {"p": run.dropout, "mode": run.dropout_mode, "log_images": False}
        if run.dropout_mode != "standard":
            dropout.update(shape=run.dropout_shape, **_cutoff_arguments(study, run))
        callbacks.append({"class_path": "lightning_startwell.callbacks.DropoutSchedule", "init_args": dropout})
    if run.wd_mode != "throughout":
        callbacks.append(
            {
                "class_path": "lightning_startwell.callbacks.WeightDecaySchedule",
                "init_args": {"mode": run.wd_mode, **_cutoff_arguments(study, run)},
            }
        )
    return callbacks


def write_cell(study: Study, run: RunSpec, run_dir: Path) -> Path:
    """Write the cell config of ``run`` to ``run_dir/cell.yaml`` (with a header saying how to run it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.yaml"
    header = f"# Run {run.run_id} of study {study.name!r}: startwell fit --config {path}\n"
    params = "# parameters: " + ", ".join(f"{k}={getattr(run, k)}" for k in PARAMETERS) + "\n"
    with open(path, "w") as f:
        f.write(header + params)
        yaml.safe_dump(cell_config(study, run, run_dir), f, sort_keys=False)
    return path
