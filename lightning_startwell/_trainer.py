"""Typed reads of the ``Trainer`` attributes that Lightning sets from outside the class body (its setup functions and
connectors assign them on the trainer), so that a type checker does not see them on ``Trainer``. Each read is the
plain attribute: the ``type: ignore`` covers that declaration gap only, and the return type says what Lightning
stores there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback


def fast_dev_run(trainer: pl.Trainer) -> Union[int, bool]:
    """``Trainer(fast_dev_run=...)``, as ``lightning.pytorch.trainer.setup._init_debugging_flags`` stores it."""
    return trainer.fast_dev_run  # type: ignore[attr-defined]


def log_every_n_steps(trainer: pl.Trainer) -> int:
    """``Trainer(log_every_n_steps=...)``, as the logger connector stores it (0 under ``barebones``)."""
    return trainer.log_every_n_steps  # type: ignore[attr-defined]


def callbacks(trainer: pl.Trainer) -> list[Callback]:
    """The trainer's callbacks, as the callback connector stores them (ordered, checkpoints last)."""
    return trainer.callbacks  # type: ignore[attr-defined]


def datamodule(trainer: pl.Trainer) -> Optional[pl.LightningDataModule]:
    """The datamodule given to ``fit``/``validate``/``test``, as the data connector stores it, or None."""
    return trainer.datamodule  # type: ignore[attr-defined]
