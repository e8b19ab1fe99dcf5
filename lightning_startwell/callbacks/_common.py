"""What the callbacks share: whether the module can be run, finding the input tensor in a batch, one batch from the
train loader, writing scalars."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import lightning.pytorch as pl
import torch
from torch import nn

BatchKey = Union[int, str]


def has_forward(module: nn.Module) -> bool:
    """Whether ``module`` defines its own ``forward`` (a LightningModule whose ``training_step`` calls ``self.net(x)``
    often does not: calling it raises inside torch)."""
    forward = type(module).forward
    return forward is not nn.Module.forward and forward is not pl.LightningModule.forward


def require_forward(module: nn.Module, who: str) -> None:
    """Raise a ValueError saying that ``who`` runs the model and how to give the module a forward."""
    if not has_forward(module):
        raise ValueError(
            f"{who} runs the model on a batch, but {type(module).__name__} defines no `forward`: define"
            " `forward(self, x)` on the LightningModule."
        )


def batch_tensor(batch: Any, key: BatchKey, argument: str = "input_key") -> torch.Tensor:
    """The tensor at ``batch[key]`` (index of a tuple/list, or key of a dict), or a ValueError naming ``argument``."""
    if isinstance(batch, torch.Tensor) and key == 0:
        return batch
    try:
        value = batch[key] if isinstance(batch, (Mapping, list, tuple)) else None
    except (KeyError, IndexError, TypeError):
        value = None
    if not isinstance(value, torch.Tensor):
        layout = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        if isinstance(batch, (list, tuple)):
            layout = f"{type(batch).__name__} of {len(batch)}"
        raise ValueError(f"`{argument}`={key!r} does not name a tensor in the batch ({layout}).")
    return value


def first_train_batch(trainer: pl.Trainer) -> Any:
    """One batch of the training data, on the module's device, without touching the global random streams (so the
    training run sees the same data order as without the callback)."""
    with torch.random.fork_rng(devices=[]):
        loader = trainer.fit_loop._data_source.dataloader()
        batch = next(iter(loader))
    return trainer.strategy.batch_to_device(batch)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars to every logger at ``step`` (the loggers write on rank 0 only); usable in hooks where
    ``LightningModule.log`` is not allowed, and not thinned by ``log_every_n_steps``."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def tensorboard_experiments(trainer: pl.Trainer) -> list[Any]:
    """The SummaryWriters of the TensorBoard loggers, on rank 0 (histograms and layouts go there)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def first_train_inputs(trainer: pl.Trainer, key: BatchKey, max_items: int, argument: str = "input_key") -> torch.Tensor:
    """The inputs (``batch[key]``) of the first training batches, ``max_items`` of them or the whole epoch if fewer,
    without touching the global random streams."""
    chunks, count = [], 0
    with torch.random.fork_rng(devices=[]):
        for batch in trainer.fit_loop._data_source.dataloader():
            chunks.append(batch_tensor(batch, key, argument))
            count += len(chunks[-1])
            if count >= max_items:
                break
    return torch.cat(chunks)[:max_items]
