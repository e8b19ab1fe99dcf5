"""Base of the rate-schedule callbacks: the schedule's arguments, the cutoff in optimizer steps, per-step application
from ``trainer.global_step`` (right with gradient accumulation and mid-epoch resume), logging and state."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell._validation import check_bool, check_int
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
    ) -> None:
        check_schedule(self.rate_name, rate, mode, shape)
        check_cutoff(mode, cutoff_epochs, cutoff_steps, cutoff_fraction)
        if rate_levels is not None:
            check_int("rate_levels", rate_levels, minimum=2)
        check_bool("log_images", log_images)
        self.rate = rate
        self.mode = mode
        self.shape = shape
        self.cutoff_epochs = cutoff_epochs
        self.cutoff_steps = cutoff_steps
        self.cutoff_fraction = cutoff_fraction
        self.rate_levels = rate_levels
        self._levels = rate_levels  # the levels applied (a subclass may bound them for a compiled model)
        self.log_images = log_images
        self._cutoff: Optional[int] = None  # in optimizer steps, resolved once and kept in the checkpoint
        self._last_logged_step = -1

    def rate_at(self, step: int) -> float:
        """The rate at optimizer step ``step`` (after quantisation to ``rate_levels``, if set)."""
        value = scheduled_rate(step, self.rate, self.mode, self.shape, self._cutoff or 0)
        return quantize(value, self.rate, self._levels)

    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        """Apply ``rate`` to the model; return the scalars to log."""
        raise NotImplementedError

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
            text += f", {self.shape}, cutoff at optimizer step {self._cutoff}"
        return text

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
        metrics = self.apply_rate(pl_module, self.rate_at(step))
        if step != self._last_logged_step and step % _trainer.log_every_n_steps(trainer) == 0:
            log_scalars(trainer, metrics, step=step)
            self._last_logged_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cutoff": self._cutoff}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cutoff = state_dict["cutoff"]
