"""WeightDecaySchedule: weight decay only early or only late in training (Golatkar, Achille & Soatto 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from typing_extensions import override

from lightning_startwell._validation import check_choice
from lightning_startwell.callbacks._common import InstanceStateKey, listed, report_attached
from lightning_startwell.callbacks._rate_schedule import CutoffSignal, RateScheduleCallback
from lightning_startwell.callbacks._strategy import refuse_sharded, sharded_strategy

WeightDecayMode = Literal["early", "late"]
WEIGHT_DECAY_MODES: tuple[str, ...] = WeightDecayMode.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Group:
    """A param group whose weight decay is driven: where it is and the value the optimizer was built with."""

    index: int  # over the groups of all optimizers, in order: the ``group_<index>`` of the logged tag
    optimizer: int
    group: int
    kind: str  # the optimizer's class name
    original: float

    @property
    def name(self) -> str:
        return f"group_{self.index}"


class WeightDecaySchedule(InstanceStateKey, RateScheduleCallback):
    r"""Apply the optimizers' weight decay only before a cutoff (``early``) or only from it on (``late``).

    Golatkar, Achille & Soatto (2019, *Time Matters in Regularizing Deep Networks*) find that weight decay applied only
    during the first epochs generalises about as well as weight decay applied throughout, and weight decay applied only
    after them about as badly as none: regularisation acts in the critical period.

    Before every training batch the weight decay of each optimizer param group is set for the optimizer step
    ``trainer.global_step``: the group's own value (the one ``configure_optimizers`` built it with) while the schedule
    is on, 0 while it is off. ``early`` is on for steps [0, cutoff), ``late`` from the cutoff on. It depends only on the
    optimizer step: gradient accumulation and mid-epoch resume give the same trajectory. Groups built with weight
    decay 0 are left alone; every optimizer of the module is driven. The values found at the start of ``fit`` are put
    back at its end and when it fails. The cutoff is exactly one of ``cutoff_epochs``, ``cutoff_steps`` (optimizer
    steps) or ``cutoff_fraction`` of ``trainer.estimated_stepping_batches`` (default 1/6 of training) or, with
    ``cutoff_signal="critical_period"``, the step at which the trainer's ``CriticalPeriodMonitor`` declares the critical
    period ended (on until then for ``early``, off for ``late``).

    ``weight_decay`` means what the optimizer makes of it: an L2 term ``wd * p`` added to the gradient in ``SGD`` and
    ``Adam`` (so ``Adam`` rescales it by its second-moment estimate), a decoupled shrink ``p -= lr * wd * p`` in
    ``AdamW``. The schedule switches the optimizer's own rule on and off; it does not convert one into the other.

    Logs ``startwell/weight_decay/factor`` (1 on, 0 off) and ``startwell/weight_decay/group_<i>`` (the weight decay of
    each driven group, ``i`` counting the groups of all optimizers in order) every ``log_every_n_steps`` optimizer
    steps.

    Args:
        mode: ``early`` (weight decay on steps [0, cutoff), 0 after) or ``late`` (0 before the cutoff, then on).
        cutoff_epochs: cutoff in epochs.
        cutoff_steps: cutoff in optimizer steps.
        cutoff_fraction: cutoff as a fraction of training, in [0, 1]. With no cutoff given, 1/6 of training.
        cutoff_signal: ``"critical_period"``: the cutoff is the ``end_step`` of the trainer's ``CriticalPeriodMonitor``;
            a fixed cutoff given as well is a deadline (the cutoff if the end has not been declared by then).

    Raises:
        ValueError: at construction, naming a bad argument; at the start of ``fit``, before any step, when a param
            group has no ``weight_decay`` (``LBFGS``, ``SparseAdam``), when every group has weight decay 0 (nothing to
            schedule: set ``weight_decay`` on the optimizer), or with ``cutoff_signal`` and no
            ``CriticalPeriodMonitor``.

    Example::

        model = MyModule()  # configure_optimizers: torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=5e-4)
        trainer = Trainer(callbacks=[WeightDecaySchedule(mode="early", cutoff_epochs=30)])
    """

    rate_name = "factor"

    def __init__(
        self,
        mode: WeightDecayMode = "early",
        cutoff_epochs: Optional[int] = None,
        cutoff_steps: Optional[int] = None,
        cutoff_fraction: Optional[float] = None,
        cutoff_signal: Optional[CutoffSignal] = None,
    ) -> None:
        super().__init__(
            1.0, mode, "constant", cutoff_epochs, cutoff_steps, cutoff_fraction, log_images=False,
            cutoff_signal=cutoff_signal,
        )
        self._groups: list[_Group] = []
        self._trainer: Optional[pl.Trainer] = None

    @override
    def check_schedule(self, rate: float, mode: str, shape: str) -> None:
        check_choice("mode", mode, WEIGHT_DECAY_MODES)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and sharded_strategy(trainer.strategy) == "DeepSpeedStrategy":
            refuse_sharded(
                trainer,
                "WeightDecaySchedule",
                "DeepSpeed's ZeRO optimizers hold their own copies of the param groups and apply weight decay in"
                " their own kernels; that they read a changed `weight_decay` at each step has not been verified",
                "Train with DDP or FSDP, or on a single device.",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = _driven_groups(trainer)  # raises before anything changes
        super().on_fit_start(trainer, pl_module)
        self._trainer = trainer
        self._groups = groups
        driven = [f"{g.name} ({g.kind} {g.optimizer}, group {g.group}): {g.original:g}" for g in groups]
        facts = {
            "param groups driven (weight decay as built)": listed(driven),
            "schedule": self.schedule_description(),
        }
        report_attached(trainer, "startwell/weight_decay", "WeightDecaySchedule", facts)

    @override
    def schedule_description(self) -> str:
        when = "on before the cutoff, 0 from it" if self.mode == "early" else "0 before the cutoff, on from it"
        return f"{self.mode} ({when}), {self.cutoff_description()}"

    @override
    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        metrics = {"startwell/weight_decay/factor": rate}
        for group in self._groups:
            value = group.original * rate
            self._param_group(group)["weight_decay"] = value
            metrics[f"startwell/weight_decay/{group.name}"] = value
        return metrics

    def schedule_plan(self, steps: list[int], steps_per_epoch: Optional[int]) -> dict[str, Any]:
        """Nothing: the schedule picture has no weight-decay panel (this callback draws nothing)."""
        return {}

    def _param_group(self, group: _Group) -> dict[str, Any]:
        # Looked up at every use: restoring a checkpoint's optimizer state replaces the param-group dicts.
        assert self._trainer is not None
        return self._trainer.optimizers[group.optimizer].param_groups[group.group]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for group in self._groups:
            self._param_group(group)["weight_decay"] = group.original
        self._groups = []


def _driven_groups(trainer: pl.Trainer) -> list[_Group]:
    """The param groups of every optimizer whose weight decay is not 0, or a ValueError when a group has no
    ``weight_decay`` or none is left to schedule."""
    groups, index = [], 0
    for o, optimizer in enumerate(trainer.optimizers):
        kind = type(optimizer).__name__
        for g, group in enumerate(optimizer.param_groups):
            if "weight_decay" not in group:
                raise ValueError(
                    f"WeightDecaySchedule: param group {g} of optimizer {o} ({kind}) has no `weight_decay`, so there"
                    " is no weight decay to schedule; use an optimizer that takes `weight_decay` (SGD, Adam, AdamW...)."
                )
            if float(group["weight_decay"]) != 0.0:
                groups.append(_Group(index, o, g, kind, float(group["weight_decay"])))
            index += 1
    if not groups:
        found = ", ".join(type(optimizer).__name__ for optimizer in trainer.optimizers) or "no optimizer"
        raise ValueError(
            f"WeightDecaySchedule: every param group has `weight_decay` 0 ({found}): nothing to schedule. Set"
            " `weight_decay` on the optimizer (e.g. `torch.optim.AdamW(params, weight_decay=0.05)`); the schedule"
            " switches that value on and off."
        )
    return groups


__all__ = ["WEIGHT_DECAY_MODES", "WeightDecaySchedule"]
