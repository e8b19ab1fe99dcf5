"""StudyRecord: the callback that ends a study cell by writing its result, so that a cell run anywhere can be merged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell.callbacks._common import random_streams_kept
from lightning_startwell.callbacks._rate_schedule import RateScheduleCallback


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device) -> tuple[float, float]:
    """The share of the examples of ``loader`` whose arg-max logit is the label, and their mean cross-entropy, the
    model in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(device)).cpu()
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            total += len(y)
    model.train(was_training)
    return correct / total, loss / total


def accuracy(model: torch.nn.Module, loader: Any, device: torch.device) -> float:
    """Share of the examples of ``loader`` whose arg-max logit is the label, the model in eval mode (restored after)."""
    return evaluate(model, loader, device)[0]


def schedule_cutoff(trainer: pl.Trainer) -> float:
    """The cutoff the run's rate schedules switched at, as a fraction of its optimizer steps (the schedules of a run
    share it); NaN when none has a cutoff or the cutoff was never reached (a critical period not declared over)."""
    steps = max(trainer.global_step, 1)
    schedules = [c for c in _trainer.callbacks(trainer) if isinstance(c, RateScheduleCallback) and c.mode != "standard"]
    cutoffs = [c.current_cutoff() for c in schedules]
    reached = [c for c in cutoffs if c is not None]
    return min(reached) / steps if reached and len(reached) == len(cutoffs) else float("nan")


class StudyRecord(Callback):
    """After every training epoch, measure the test accuracy (the recovery curve of a deficit); at the end of a
    completed fit write ``path`` (JSON): ``test_acc``, the last ``val_acc``, the training split's accuracy and mean
    cross-entropy (eval mode, clean inputs), the cutoff the rate schedules switched at (a fraction of the steps, NaN
    without one), the test accuracy after each epoch (``curve``), the epochs trained and the wall time of the fit.
    The measurements draw nothing from the training run's random streams. The loggers are saved first, so a
    ``result.json`` means the run's ``metrics.csv`` is complete; the file appears at once (written aside, then
    renamed), so a run killed before it ends leaves no result and is run again by the study.

    Args:
        path: where to write the result.

    Example::

        trainer = Trainer(max_epochs=20, callbacks=[StudyRecord("runs/a/result.json")])
    """

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("`path` must name the result file, got an empty string.")
        self.path = Path(path)
        self._start = 0.0
        self._curve: list[float] = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.time()
        self._curve = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._curve.append(self._measure(trainer, pl_module, "test")[0])

    @staticmethod
    def _measure(trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> tuple[float, float]:
        datamodule = _trainer.datamodule(trainer)
        if datamodule is None:
            raise ValueError("StudyRecord needs a datamodule with a test_dataloader() for the test accuracy.")
        with random_streams_kept(pl_module.device):  # a loader's iterator draws its base seed from the streams
            loader = datamodule.test_dataloader() if split == "test" else datamodule.train_dataloader()
            return evaluate(pl_module, loader, pl_module.device)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or trainer.current_epoch < (trainer.max_epochs or 0) or not trainer.is_global_zero:
            return
        seconds = round(time.time() - self._start, 2)
        train_acc, train_loss = self._measure(trainer, pl_module, "train")
        result = {
            # the last epoch's measurement is the final one (the same weights, eval mode)
            "test_acc": self._curve[-1] if self._curve else self._measure(trainer, pl_module, "test")[0],
            "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            "train_acc": train_acc,
            "train_loss": train_loss,
            "cutoff_used": schedule_cutoff(trainer),
            "curve": self._curve,
            "epochs": trainer.current_epoch,
            "seconds": seconds,
        }
        for logger in trainer.loggers:
            logger.save()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_suffix(".tmp")
        aside.write_text(json.dumps(result, indent=1))
        os.replace(aside, self.path)
