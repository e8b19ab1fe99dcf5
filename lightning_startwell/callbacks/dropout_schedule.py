"""DropoutSchedule: standard, early or late dropout (Liu et al. 2023) on every dropout a model holds."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell._compile import is_compiled
from lightning_startwell.callbacks._common import InstanceStateKey, listed, report_attached
from lightning_startwell.callbacks._rate_schedule import CutoffSignal, RateScheduleCallback
from lightning_startwell.callbacks._strategy import refuse_sharded, sharded_strategy
from lightning_startwell.dropout import RateSlot, find_dropout, set_rates
from lightning_startwell.schedules import Mode, Shape

#: Rate levels of a compiled model when ``rate_levels`` is not given: Dynamo's default recompile limit is 8, after which
#: it falls back to eager for good.
COMPILED_RATE_LEVELS = 5


class DropoutSchedule(InstanceStateKey, RateScheduleCallback):
    r"""Schedule the dropout rate of a whole model over optimizer steps.

    Before every training batch the rate for ``trainer.global_step`` is written into every ``nn.Dropout``-family module,
    every ``nn.MultiheadAttention.dropout`` (so ``nn.TransformerEncoderLayer`` is fully covered) and the float
    ``attributes`` you name. The rate depends only on the optimizer step: gradient accumulation and mid-epoch resume
    give the same trajectory. Evaluation is untouched (dropout is off in eval mode). The rates found at the start of
    ``fit`` are put back at its end.

    Modes (see :func:`~lightning_startwell.schedules.scheduled_rate`): ``standard`` (p always), ``early`` (p until the
    cutoff, then 0; shape ``constant``, ``linear`` = linspace(p, 0, cutoff) as in the official code, or ``cosine``),
    ``late`` (0 until the cutoff, then p). The cutoff is exactly one of ``cutoff_epochs``, ``cutoff_steps`` (optimizer
    steps) or ``cutoff_fraction`` of ``trainer.estimated_stepping_batches`` or, with
    ``cutoff_signal="critical_period"``, the step at which the trainer's ``CriticalPeriodMonitor`` declares the
    critical period ended (``constant`` shape).

    Logs ``startwell/dropout/rate`` every ``log_every_n_steps`` optimizer steps and, with ``log_images``, draws the
    planned rate in the run's schedule picture ``startwell/schedule/overview`` (TensorBoard only, at the start and the
    end of training).

    Args:
        p: the dropout rate, in [0, 1).
        mode: ``standard``, ``early`` or ``late``.
        shape: ``constant``, ``linear`` or ``cosine`` (``late`` takes ``constant``).
        cutoff_epochs: cutoff in epochs.
        cutoff_steps: cutoff in optimizer steps.
        cutoff_fraction: cutoff as a fraction of training, in [0, 1]. With no cutoff given, ``early`` and ``late``
            use 1/6 of training (the paper's epoch 50 of 300).
        include: glob patterns of dropout-module names to drive (default all); each must match one.
        exclude: glob patterns of dropout-module names to leave alone.
        attributes: glob patterns ``<module>.<attribute>`` of further float rates to drive (e.g. ``"*.attn.drop_p"``).
        rate_levels: round rates to this many evenly spaced values in [0, p], so a ``torch.compile``d model, which
            recompiles for every new float rate, compiles at most ``rate_levels`` times; None keeps exact rates, except
            on a ``torch.compile``d model or one holding a ``torch.compile``d submodule (``self.net =
            torch.compile(net)``), where they are rounded to 5 levels (with a warning).
        log_images: draw the schedule picture.
        cutoff_signal: ``"critical_period"``: the cutoff is the ``end_step`` of the trainer's
            ``CriticalPeriodMonitor`` (the rate before the cutoff until it is declared); shape ``constant`` only. A
            fixed cutoff given as well is a deadline: the cutoff if the end has not been declared by then.

    Example::

        trainer = Trainer(callbacks=[DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_epochs=50)])
    """

    rate_name = "p"

    state_key_arguments = ("include", "exclude", "attributes")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        p: float = 0.1,
        mode: Mode = "early",
        shape: Shape = "linear",
        cutoff_epochs: Optional[int] = None,
        cutoff_steps: Optional[int] = None,
        cutoff_fraction: Optional[float] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        attributes: Optional[list[str]] = None,
        rate_levels: Optional[int] = None,
        log_images: bool = True,
        cutoff_signal: Optional[CutoffSignal] = None,
    ) -> None:
        super().__init__(
            p, mode, shape, cutoff_epochs, cutoff_steps, cutoff_fraction, rate_levels, log_images, cutoff_signal
        )
        self.include = include
        self.exclude = exclude
        self.attributes = attributes
        self._slots: list[RateSlot] = []
        self._original: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # It only writes rates into modules, the same on every rank: right under every strategy, except that FSDP
        # (Lightning's FSDP1) renames the modules it wraps and forwards attribute reads, not writes, to them.
        patterns = self.exclude or self.attributes
        if stage == "fit" and patterns and sharded_strategy(trainer.strategy) == "FSDPStrategy":
            refuse_sharded(
                trainer,
                "DropoutSchedule with `exclude` or `attributes`",
                "FSDP inserts `_fsdp_wrapped_module.` into the names of the modules it wraps, so an `exclude` pattern"
                " written for the model can silently match nothing, and an `attributes` pattern can match the wrapper,"
                " whose attribute writes never reach the wrapped module",
                "Use `include` patterns (they fail loudly when they match nothing), or DDP.",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        slots = find_dropout(pl_module, self.include, self.exclude, self.attributes)
        if not slots:
            raise ValueError(
                "DropoutSchedule found no dropout in the model (nn.Dropout family, nn.MultiheadAttention); add dropout"
                " modules, or name float rates with `attributes`."
            )
        self._levels = self.rate_levels
        if is_compiled(pl_module) and self.rate_levels is None:  # the whole module or a compiled submodule
            self._levels = COMPILED_RATE_LEVELS
            rank_zero_warn(
                f"DropoutSchedule on a torch.compile'd model: every new float rate recompiles, so the rates are rounded"
                f" to {COMPILED_RATE_LEVELS} levels in [0, p] (at most {COMPILED_RATE_LEVELS} compilations). Set"
                " `rate_levels` to choose the levels."
            )
        super().on_fit_start(trainer, pl_module)
        self._slots = slots
        self._original = {s.name: s.get() for s in slots}
        facts = {
            "dropout modules": listed([s.module_name for s in slots if s.kind == "module"]),
            "attention dropout probabilities": listed([s.name for s in slots if s.kind == "attention"]),
            "float attributes": listed([s.name for s in slots if s.kind == "attribute"]),
            "schedule": self.schedule_description(),
        }
        report_attached(trainer, "startwell/dropout", "DropoutSchedule", facts)

    @override
    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        set_rates(self._slots, rate)
        return {"startwell/dropout/rate": rate}

    def schedule_plan(self, steps: list[int], steps_per_epoch: Optional[int]) -> dict[str, Any]:
        """The planned dropout rate at ``steps``, for the schedule picture."""
        return {"dropout": self.planned_rates(steps)}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for slot in self._slots:
            slot.set(self._original[slot.name])
