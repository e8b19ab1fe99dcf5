"""One picture of a run's schedules, ``startwell/schedule/overview``: the dropout rate, the per-block drop rates and the
deficit windows against optimizer steps, drawn at the start of training (the whole plan, known in advance) and at its
end. Every :class:`ScheduleDrawing` callback with ``log_images`` contributes its part; the first of them in
``trainer.callbacks`` writes the picture, so a run has one."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell.callbacks._common import log_image, run_length
from lightning_startwell.figures import schedule_overview

TAG = "startwell/schedule/overview"
# Steps the rates are evaluated at, at most: more than the picture's width in pixels, so nothing visible is lost.
MAX_POINTS = 2000


class ScheduleDrawing(Callback):
    """A callback whose plan is part of the schedule picture, written at the start and at the end of training."""

    log_images: bool

    def schedule_plan(self, steps: list[int], steps_per_epoch: Optional[int]) -> dict[str, Any]:
        """Keyword arguments of :func:`~lightning_startwell.figures.schedule_overview` for this callback's plan at
        ``steps`` (``windows`` of several callbacks are put together)."""
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_overview(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_overview(trainer)

    def _write_overview(self, trainer: pl.Trainer) -> None:
        contributors = [cb for cb in _trainer.callbacks(trainer) if isinstance(cb, ScheduleDrawing) and cb.log_images]
        if contributors and contributors[0] is self:
            log_image(trainer, TAG, lambda: _draw(trainer, contributors), trainer.global_step)


def _draw(trainer: pl.Trainer, contributors: list[ScheduleDrawing]) -> np.ndarray:
    steps_per_epoch, total = run_length(trainer)
    horizon = max(total if total is not None else 0, trainer.global_step, 1)  # unknown length: up to now
    steps = np.unique(np.linspace(0, horizon - 1, min(horizon, MAX_POINTS)).round().astype(int)).tolist()
    plan: dict[str, Any] = {"windows": []}
    for callback in contributors:
        for key, value in callback.schedule_plan(steps, steps_per_epoch).items():
            if key == "windows":
                plan["windows"] += value
            else:
                plan.setdefault(key, value)  # two callbacks of one kind: the first one's rates
    return schedule_overview(steps, now=trainer.global_step, **plan)
