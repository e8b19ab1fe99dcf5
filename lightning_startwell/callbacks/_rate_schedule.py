"""Base of the rate-schedule callbacks: the schedule's arguments, the cutoff in optimizer steps (fixed, or the end of
the critical period that the trainer's ``CriticalPeriodMonitor`` declares), per-step application from
``trainer.global_step`` (right with gradient accumulation and mid-epoch resume), logging and state."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Protocol

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell._validation import check_bool, check_choice, check_int
from lightning_startwell.callbacks._common import log_scalars, run_length
from lightning_startwell.callbacks._schedule_overview import ScheduleDrawing
from lightning_startwell.schedules import (
    DEFAULT_CUTOFF_FRACTION,
    check_cutoff,
    check_schedule,
    quantize,
    resolve_cutoff,
    schedule_completes,
    scheduled_rate,
)

CutoffSignal = Literal["critical_period"]
CUTOFF_SIGNALS: tuple[str, ...] = CutoffSignal.__args__  # type: ignore[attr-defined]


class EndSignal(Protocol):
    """What a cutoff signal reads: the global step at which the critical period was declared ended, None before."""

    @property
    def end_step(self) -> Optional[int]: ...


def check_cutoff_signal(
    cutoff_signal: Optional[str],
    mode: str,
    shape: str,
    cutoff_epochs: Optional[int],
    cutoff_steps: Optional[int],
    cutoff_fraction: Optional[float],
) -> None:
    """``cutoff_signal`` is None or ``"critical_period"``; with it, mode ``early`` or ``late``, shape ``constant`` (a
    decay to 0 at the cutoff needs the cutoff in advance), and at most one fixed cutoff, which is then a deadline: the
    cutoff is the end of the critical period, or the fixed cutoff if the end has not been declared by then."""
    if cutoff_signal is None:
        return
    check_choice("cutoff_signal", cutoff_signal, CUTOFF_SIGNALS)
    fixed = {"cutoff_epochs": cutoff_epochs, "cutoff_steps": cutoff_steps, "cutoff_fraction": cutoff_fraction}
    given = sorted(name for name, value in fixed.items() if value is not None)
    if len(given) > 1:
        raise ValueError(
            f"`cutoff_signal`={cutoff_signal!r} takes at most one fixed cutoff as its deadline (the cutoff if the"
            f" critical period has not ended by then), got {given}: give one."
        )
    if mode == "standard":
        raise ValueError(
            f"`cutoff_signal`={cutoff_signal!r} needs mode 'early' or 'late': mode 'standard' has no cutoff."
        )
    if shape != "constant":
        raise ValueError(
            f"`shape`={shape!r} decays to 0 at the cutoff, so it needs the cutoff in advance; with `cutoff_signal`="
            f"{cutoff_signal!r} the cutoff is known only when the critical period is declared ended: use shape"
            " 'constant'."
        )


def find_end_signal(trainer: pl.Trainer, who: str) -> EndSignal:
    """The trainer's ``CriticalPeriodMonitor``, or a ValueError saying that ``who`` needs one."""
    from lightning_startwell.callbacks.critical_period import find_critical_period_monitor

    monitor = find_critical_period_monitor(trainer)
    if monitor is None:
        raise ValueError(
            f"{who} has `cutoff_signal`='critical_period': its cutoff is the end of the critical period that a"
            " CriticalPeriodMonitor declares, and the Trainer has none. Add `CriticalPeriodMonitor(...)` to the"
            " Trainer's `callbacks`, or give a fixed cutoff (`cutoff_epochs`, `cutoff_steps` or `cutoff_fraction`)"
            " instead of `cutoff_signal`."
        )
    return monitor


class RateScheduleCallback(ScheduleDrawing):
    """Applies ``scheduled_rate(global_step)`` before every training batch; subclasses say what a rate does, and
    what the schedule picture draws (``schedule_plan``)."""

    rate_name = "rate"

    def __init__(
        self,
        rate: float,
        mode: str,
        shape: str,
        cutoff_epochs: Optional[int],
        cutoff_steps: Optional[int],
        cutoff_fraction: Optional[float],
        rate_levels: Optional[int] = None,
        log_images: bool = True,
        cutoff_signal: Optional[str] = None,
    ) -> None:
        self.check_schedule(rate, mode, shape)
        check_cutoff(mode, cutoff_epochs, cutoff_steps, cutoff_fraction)
        check_cutoff_signal(cutoff_signal, mode, shape, cutoff_epochs, cutoff_steps, cutoff_fraction)
        if rate_levels is not None:
            check_int("rate_levels", rate_levels, minimum=2)
        check_bool("log_images", log_images)
        self.rate = rate
        self.mode = mode
        self.shape = shape
        self.cutoff_epochs = cutoff_epochs
        self.cutoff_steps = cutoff_steps
        self.cutoff_fraction = cutoff_fraction
        self.cutoff_signal = cutoff_signal
        self.rate_levels = rate_levels
        self._levels = rate_levels  # the levels applied (a subclass may bound them for a compiled model)
        self.log_images = log_images
        # In optimizer steps, resolved once and kept in the checkpoint; with `cutoff_signal`, the step the schedule
        # switched at (the monitor's end_step, or the first step after it whose batch started once it was declared).
        self._cutoff: Optional[int] = None
        self._signal: Optional[EndSignal] = None  # with `cutoff_signal`: the monitor whose end_step is the cutoff
        self._deadline: Optional[int] = None  # with `cutoff_signal` and a fixed cutoff: the latest cutoff
        self._last_applied_step = -1
        self._last_logged_step = -1

    def check_schedule(self, rate: float, mode: str, shape: str) -> None:
        """Raise a ValueError naming the first of ``rate``, ``mode``, ``shape`` that this schedule does not take."""
        check_schedule(self.rate_name, rate, mode, shape)

    def current_cutoff(self) -> Optional[int]:
        """The cutoff in optimizer steps: the fixed one resolved at fit start or, with ``cutoff_signal``, the step
        the schedule switched at: the ``end_step`` of the trainer's ``CriticalPeriodMonitor``, or the first step
        after it whose batch started once the end was declared (None until then)."""
        return self._cutoff

    def _observe_signal(self, step: int) -> None:
        """With ``cutoff_signal``: the switch step, once the monitor has declared the end, or the deadline once it is
        reached without one. A step whose rate is already applied keeps it, so the trajectory is the same in a resumed
        run (the switch step is in the checkpoint)."""
        if self._cutoff is not None or self._signal is None:
            return
        if self._signal.end_step is not None:
            self._cutoff = max(self._signal.end_step, step)
        elif self._deadline is not None and step >= self._deadline:
            self._cutoff = max(self._deadline, step)

    def rate_at(self, step: int) -> float:
        """The rate at optimizer step ``step`` (after quantisation to ``rate_levels``, if set). With ``cutoff_signal``
        and no end declared yet, the rate before the cutoff (early: the rate; late: 0)."""
        cutoff = self.current_cutoff()
        if cutoff is None and self.cutoff_signal is not None:
            cutoff = step + 1  # not ended yet: step is before the cutoff
        value = scheduled_rate(step, self.rate, self.mode, self.shape, cutoff or 0)
        return quantize(value, self.rate, self._levels)

    def planned_rates(self, steps: list[int]) -> list[float]:
        """:meth:`rate_at` at ``steps``, for the schedule picture. With ``cutoff_signal`` and no end declared yet, the
        rates after the last step applied are not known: NaN (not drawn)."""
        unknown = self.cutoff_signal is not None and self.current_cutoff() is None
        return [math.nan if unknown and step > self._last_applied_step else self.rate_at(step) for step in steps]

    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        """Apply ``rate`` to the model; return the scalars to log."""
        raise NotImplementedError

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_applied_step = trainer.global_step - 1
        if self.cutoff_signal is not None:
            self._signal = find_end_signal(trainer, type(self).__name__)
            self._warn_if_before(trainer, self._signal)
            if any(c is not None for c in (self.cutoff_epochs, self.cutoff_steps, self.cutoff_fraction)):
                steps_per_epoch, total = run_length(trainer)
                self._deadline = resolve_cutoff(
                    self.cutoff_epochs, self.cutoff_steps, self.cutoff_fraction, steps_per_epoch, total
                )
            return
        if self._cutoff is not None or self.mode == "standard":
            return
        steps_per_epoch, total = run_length(trainer)
        cutoffs = (self.cutoff_epochs, self.cutoff_steps, self.cutoff_fraction)
        self._cutoff = resolve_cutoff(*cutoffs, steps_per_epoch, total)
        if total is None or _trainer.fast_dev_run(trainer):
            return
        if not schedule_completes(self.rate, self.mode, self.shape, self._cutoff, total):
            rank_zero_warn(
                f"{type(self).__name__}: {self._cutoff_argument()} puts the cutoff at optimizer step {self._cutoff},"
                f" past the end of this run ({total} steps): the {self.mode} schedule never "
                f"{'turns on' if self.mode == 'late' else 'reaches 0'} in this run."
            )

    def schedule_description(self) -> str:
        """The schedule in words, for the fit-start report: mode, rate, shape and cutoff (in optimizer steps)."""
        text = f"{self.mode}, {self.rate_name}={self.rate:g}"
        if self.mode != "standard":
            text += f", {self.shape}, {self.cutoff_description()}"
        return text

    def cutoff_description(self) -> str:
        """Where the cutoff is, for the fit-start report: ``cutoff at optimizer step 120``, or with ``cutoff_signal``
        the end of the critical period, declared or not yet."""
        if self.cutoff_signal is None:
            return f"cutoff at optimizer step {self._cutoff}"
        declared = "not declared yet" if self._cutoff is None else f"switched at optimizer step {self._cutoff}"
        deadline = "" if self._deadline is None else f", at the latest at optimizer step {self._deadline}"
        return f"cutoff at the end of the critical period (CriticalPeriodMonitor: {declared}){deadline}"

    def _warn_if_before(self, trainer: pl.Trainer, monitor: EndSignal) -> None:
        """Warn when this schedule comes before the monitor in ``trainer.callbacks``: at the step whose batch start
        declares the end, the schedule has already applied that step's rate, and switches one step later."""
        positions = {id(callback): index for index, callback in enumerate(_trainer.callbacks(trainer))}
        if id(monitor) in positions and positions[id(self)] < positions[id(monitor)]:
            rank_zero_warn(
                f"{type(self).__name__} comes before the CriticalPeriodMonitor in the Trainer's `callbacks`: when the"
                " monitor declares the end of the critical period at the start of a step's batch, this schedule has"
                " already set that step's rate and switches one step later. List the monitor first."
            )

    def _cutoff_argument(self) -> str:
        """The cutoff argument as given, e.g. ``cutoff_epochs=50`` (the default fraction when none was given)."""
        for name in ("cutoff_epochs", "cutoff_steps", "cutoff_fraction"):
            if getattr(self, name) is not None:
                return f"`{name}`={getattr(self, name)}"
        return f"the default `cutoff_fraction`={DEFAULT_CUTOFF_FRACTION:.3g}"

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._observe_signal(step)
        metrics = self.apply_rate(pl_module, self.rate_at(step))
        self._last_applied_step = step
        if step != self._last_logged_step and step % _trainer.log_every_n_steps(trainer) == 0:
            log_scalars(trainer, metrics, step=step)
            self._last_logged_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cutoff": self._cutoff}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cutoff = state_dict["cutoff"]
