"""Base of the rate-schedule callbacks: the schedule's arguments, the cutoff in optimizer steps, per-step application
from ``trainer.global_step`` (right with gradient accumulation and mid-epoch resume), logging and state."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_startwell._validation import check_int
from lightning_startwell.callbacks._common import log_scalars
from lightning_startwell.schedules import check_cutoff, check_schedule, quantize, resolve_cutoff, scheduled_rate


class RateScheduleCallback(Callback):
    """Applies ``scheduled_rate(global_step)`` before every training batch; subclasses say what a rate does."""

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
    ) -> None:
        check_schedule(self.rate_name, rate, mode, shape)
        check_cutoff(mode, cutoff_epochs, cutoff_steps, cutoff_fraction)
        if rate_levels is not None:
            check_int("rate_levels", rate_levels, minimum=2)
        self.rate = rate
        self.mode = mode
        self.shape = shape
        self.cutoff_epochs = cutoff_epochs
        self.cutoff_steps = cutoff_steps
        self.cutoff_fraction = cutoff_fraction
        self.rate_levels = rate_levels
        self._cutoff: Optional[int] = None  # in optimizer steps, resolved once and kept in the checkpoint
        self._last_logged_step = -1

    def rate_at(self, step: int) -> float:
        """The rate at optimizer step ``step`` (after quantisation to ``rate_levels``, if set)."""
        value = scheduled_rate(step, self.rate, self.mode, self.shape, self._cutoff or 0)
        return quantize(value, self.rate, self.rate_levels)

    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        """Apply ``rate`` to the model; return the scalars to log."""
        raise NotImplementedError

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._cutoff is None and self.mode != "standard":
            total = trainer.estimated_stepping_batches
            trainer.fit_loop.setup_data()  # a no-op once done; makes the train loader's length known
            batches = trainer.num_training_batches
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
            self._cutoff = resolve_cutoff(
                self.cutoff_epochs,
                self.cutoff_steps,
                self.cutoff_fraction,
                steps_per_epoch,
                int(total) if math.isfinite(total) else None,
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        metrics = self.apply_rate(pl_module, self.rate_at(step))
        if step != self._last_logged_step and step % trainer.log_every_n_steps == 0:
            log_scalars(trainer, metrics, step=step)
            self._last_logged_step = step

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cutoff": self._cutoff}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cutoff = state_dict["cutoff"]
