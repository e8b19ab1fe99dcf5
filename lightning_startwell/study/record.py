"""StudyRecord: the callback that ends a study cell by writing its result, so that a cell run anywhere can be merged."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_startwell import _trainer


def accuracy(model: torch.nn.Module, loader: Any, device: torch.device) -> float:
    """Share of the examples of ``loader`` whose arg-max logit is the label, the model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            predictions = model(x.to(device)).argmax(-1).cpu()
            correct += int((predictions == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / total


class StudyRecord(Callback):
    """At the end of a completed fit, measure the test accuracy and write ``path`` (JSON): ``test_acc``, the last
    ``val_acc``, the epochs trained and the wall time of the fit. The loggers are saved first, so a ``result.json``
    means the run's ``metrics.csv`` is complete; the file appears at once (written aside, then renamed), so a run
    killed before it ends leaves no result and is run again by the study.

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

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.time()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or trainer.current_epoch < (trainer.max_epochs or 0) or not trainer.is_global_zero:
            return
        datamodule = _trainer.datamodule(trainer)
        if datamodule is None:
            raise ValueError("StudyRecord needs a datamodule with a test_dataloader() for the test accuracy.")
        result = {
            "test_acc": accuracy(pl_module, datamodule.test_dataloader(), pl_module.device),
            "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
            "epochs": trainer.current_epoch,
            "seconds": round(time.time() - self._start, 2),
        }
        for logger in trainer.loggers:
            logger.save()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_suffix(".tmp")
        aside.write_text(json.dumps(result, indent=1))
        os.replace(aside, self.path)
