"""What the callbacks share: how a batch becomes a model call (``input_key``, ``startwell_forward``), finding a tensor
in a batch, one batch from the train loader, writing scalars and images, saying what a callback attached to."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import is_dataclass_instance, is_namedtuple
from torch import nn

BatchKey = Union[int, str]
InputKey = Union[int, str, list[Union[int, str]]]

#: The LightningModule method that maps a batch to the model's output; the callbacks that run the model use it when
#: the module defines it (``input_key`` is then not used to call the model).
FORWARD_METHOD = "startwell_forward"


def batch_forward(module: nn.Module) -> Optional[Callable[[Any], Any]]:
    """The module's ``startwell_forward``, if it defines one."""
    method = getattr(module, FORWARD_METHOD, None)
    return method if callable(method) else None


def has_forward(module: nn.Module) -> bool:
    """Whether the callbacks can run ``module`` on a batch: it defines ``startwell_forward`` or its own ``forward`` (a
    LightningModule whose ``training_step`` calls ``self.net(x)`` often has neither: calling it raises inside torch)."""
    forward = type(module).forward
    own = forward is not nn.Module.forward and forward is not pl.LightningModule.forward
    return own or batch_forward(module) is not None


def require_forward(module: nn.Module, who: str) -> None:
    """Raise a ValueError saying that ``who`` runs the model and how to give the module a forward."""
    if not has_forward(module):
        raise ValueError(
            f"{who} runs the model on a batch, but {type(module).__name__} defines no `forward`: define"
            f" `{FORWARD_METHOD}(self, batch)` returning the model's output for a batch (or `forward`) on the"
            " LightningModule."
        )


def check_input_key(value: Any) -> None:
    """``input_key`` must be an index, a key, or a non-empty list of indices (positional arguments) or of keys
    (keyword arguments)."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return
    ok = isinstance(value, list) and value and (all(isinstance(k, str) for k in value) or all(
        isinstance(k, int) and not isinstance(k, bool) for k in value
    ))
    if not ok:
        raise ValueError(
            "`input_key` must be an int (tuple index), a str (dict key), or a non-empty list of ints (positional"
            f" arguments) or of strs (keyword arguments), got {value!r}."
        )


def model_inputs(batch: Any, key: InputKey, module: nn.Module) -> Any:
    """What the model is called with for ``batch``: the whole batch when the module defines ``startwell_forward``;
    for a list ``key``, a dict (keyword arguments) of the named tensors or a tuple (positional arguments) of the
    indexed ones; else the one tensor at ``key``."""
    if batch_forward(module) is not None:
        return batch
    if isinstance(key, list):
        tensors = [batch_tensor(batch, k) for k in key]
        return dict(zip(key, tensors, strict=True)) if isinstance(key[0], str) else tuple(tensors)
    return batch_tensor(batch, key)


def _fields(batch: Any) -> Optional[list[str]]:
    """The field names of a namedtuple or dataclass batch, else None."""
    if is_namedtuple(batch):
        return list(batch._fields)
    if is_dataclass_instance(batch):
        return [field.name for field in dataclasses.fields(batch)]
    return None


def _layout(batch: Any) -> str:
    """What ``batch`` is and the keys it accepts, for an error message."""
    name = type(batch).__name__
    fields = _fields(batch)
    if is_namedtuple(batch):
        return f"namedtuple {name}: an index below {len(batch)} or a field name, one of {fields}"
    if fields is not None:
        return f"dataclass {name}: a field name, one of {fields}"
    if isinstance(batch, Mapping):
        return f"{name}: a key, one of {list(batch.keys())}"
    if isinstance(batch, (list, tuple)):
        return f"{name} of {len(batch)}: an index below {len(batch)}"
    return name


def batch_value(batch: Any, key: BatchKey) -> Any:
    """``batch[key]``: an index of a tuple, namedtuple or list, a key of a mapping (a dict, a Hugging Face
    ``BatchEncoding``), or a field name of a namedtuple or dataclass (``batch.x`` for ``key="x"``); None when there
    is no such item."""
    fields = _fields(batch)
    if isinstance(key, str) and fields is not None:
        return getattr(batch, key) if key in fields else None
    if not isinstance(batch, (Mapping, list, tuple)) or isinstance(key, bool):
        return None
    try:
        return cast(Any, batch)[key]  # a str key of a sequence or a missing item: the except below
    except (KeyError, IndexError, TypeError):
        return None


def has_tensor(batch: Any, key: BatchKey) -> bool:
    """Whether ``batch`` holds a tensor at ``key`` (see :func:`batch_value`)."""
    return isinstance(batch_value(batch, key), torch.Tensor)


def batch_tensor(batch: Any, key: BatchKey, argument: str = "input_key") -> torch.Tensor:
    """The tensor at ``key`` in ``batch`` (see :func:`batch_value`), or a ValueError naming ``argument`` and the keys
    the batch accepts."""
    if isinstance(batch, torch.Tensor) and key == 0:
        return batch
    value = batch_value(batch, key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{argument}`={key!r} does not name a tensor in the batch ({_layout(batch)}).")
    return value


def _field_name(batch: Any, key: BatchKey) -> Optional[str]:
    """The field that ``key`` names in a namedtuple or dataclass batch (an index of a namedtuple gives its field)."""
    if is_namedtuple(batch) and isinstance(key, int):
        return batch._fields[key]
    return key if isinstance(key, str) and _fields(batch) is not None else None


def replace_tensor(batch: Any, key: BatchKey, value: torch.Tensor) -> Any:
    """A shallow copy of ``batch``, of the same type (namedtuple, dataclass, ``BatchEncoding``...), with ``value`` at
    ``key``; the batch itself is left as it was."""
    if isinstance(batch, torch.Tensor):
        return value
    field = _field_name(batch, key)
    if is_namedtuple(batch):
        assert field is not None  # a namedtuple's field for an index too
        return batch._replace(**{field: value})
    if field is not None:  # a dataclass (frozen ones too)
        copied = copy.copy(batch)
        object.__setattr__(copied, field, value)
        return copied
    if isinstance(batch, MutableMapping):
        copied = copy.copy(batch)  # a BatchEncoding stays one
        copied[key] = value
        return copied
    if isinstance(batch, Mapping):
        return cast(Any, type(batch))({**batch, key: value})
    return type(batch)(value if i == key else item for i, item in enumerate(batch))


def write_tensor(batch: Any, key: BatchKey, value: torch.Tensor) -> None:
    """Put ``value`` at ``key`` in ``batch`` itself (a hook whose return value Lightning ignores): item assignment in a
    list or mutable mapping, the attribute of a dataclass; in a tuple, a namedtuple or a frozen dataclass the tensor
    there is overwritten in place (same shape and dtype; a collated tensor, never a dataset's storage)."""
    field = _field_name(batch, key)
    if field is not None and not is_namedtuple(batch):
        params = getattr(batch, "__dataclass_params__", None)
        if params is None or not params.frozen:
            setattr(batch, field, value)
            return
    elif isinstance(batch, (list, MutableMapping)):
        cast(Any, batch)[key] = value
        return
    batch_tensor(batch, key).copy_(value)


class InstanceStateKey(Callback):
    """Base of the library's callbacks: the state a checkpoint holds is keyed per instance, so two instances of one
    class (two deficit windows, two dropout schedules on different modules) can train together and resume, each with
    its own state. ``state_key`` is Lightning's ``_generate_state_key`` of the constructor arguments in
    ``state_key_arguments`` (as ``EarlyStopping`` and ``ModelCheckpoint`` do): the class name and those values, e.g.
    ``DeficitInjector{'deficit': 'blur', 'windows': [(0, 10)]}``; the other arguments may change on a resume.
    ``_legacy_state_key``, which Lightning looks up when ``state_key`` is absent from a checkpoint, is the class name,
    under which checkpoints written before held the state of the single instance."""

    #: The attributes (constructor arguments) that tell two instances of the class apart.
    state_key_arguments: tuple[str, ...] = ()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_arguments})

    @property
    def _legacy_state_key(self) -> Any:  # Lightning's own is the class object, for checkpoints older than 1.5
        return type(self).__qualname__


def first_train_batch(trainer: pl.Trainer) -> Any:
    """One batch of the training data as ``training_step`` gets it (:func:`as_training_batch`: on the module's device,
    floats in the precision's input dtype, bfloat16 under ``bf16-true``, through the batch-transfer hooks), without
    touching the global random streams (:func:`random_streams_kept`: the training run sees the same data order and
    augmentations as without the callback)."""
    with random_streams_kept(trainer.strategy.root_device):
        loader = trainer.fit_loop._data_source.dataloader()
        return as_training_batch(trainer, trainer.lightning_module, next(iter(loader)))


@contextmanager
def random_streams_kept(device: Optional[torch.device] = None) -> Iterator[None]:
    """On exit the global random streams are back where they were on entry: torch's CPU stream and ``device``'s (an
    accelerator: CUDA, MPS...), numpy's and Python's ``random``. A probe drawn inside (a dataset that augments with any
    of them, a random transfer hook) leaves the training run's draws as they would be without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # an accelerator whose torch module has a random state (cuda, mps, xpu...); any other keeps its stream
    if device is not None and hasattr(getattr(torch, device.type, None), "get_rng_state") and device.type != "cpu":
        devices, device_type = [device.index if device.index is not None else 0], device.type
    else:
        devices, device_type = [], "cuda"
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def as_training_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """``batch`` (as the train loader collates it) as ``training_step`` gets it, by Lightning's own steps in their
    order: the precision plugin's ``convert_input`` (floats to bfloat16 under ``bf16-true``), the module's (and
    datamodule's) ``on_before_batch_transfer``, the strategy's ``batch_to_device`` (``transfer_batch_to_device``,
    then ``on_after_batch_transfer``, where on-device normalisation and augmentation go). Random draws of the hooks
    come from the global streams: call it inside :func:`random_streams_kept` to leave training as it was."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


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


def log_image(trainer: pl.Trainer, tag: str, draw: Callable[[], Any], step: int) -> None:
    """Write the picture ``draw()`` returns (an ``(H, W, 3)`` uint8 array) to every TensorBoard logger at ``step``, on
    rank 0 only; without a TensorBoard logger, and on the other ranks, nothing is drawn."""
    writers = tensorboard_experiments(trainer)
    if not writers:
        return
    image = draw()
    for writer in writers:
        writer.add_image(tag, image, global_step=step, dataformats="HWC")


def first_train_inputs(trainer: pl.Trainer, key: BatchKey, max_items: int, argument: str = "input_key") -> torch.Tensor:
    """The inputs (``batch[key]``) of the first training batches as ``training_step`` gets them (through
    :func:`as_training_batch`: a model that normalises in ``on_after_batch_transfer`` gives normalised inputs),
    ``max_items`` of them or the whole epoch if fewer, without touching the global random streams."""
    chunks, count = [], 0
    with random_streams_kept(trainer.strategy.root_device):
        for batch in trainer.fit_loop._data_source.dataloader():
            batch = as_training_batch(trainer, trainer.lightning_module, batch)
            chunks.append(batch_tensor(batch, key, argument))
            count += len(chunks[-1])
            if count >= max_items:
                break
    return torch.cat(chunks)[:max_items]


def run_length(trainer: pl.Trainer) -> tuple[Optional[int], Optional[int]]:
    """``(optimizer steps per epoch, optimizer steps of the whole run)`` of this fit, None where unknown (an iterable
    loader, endless training). Sets up the train loader if needed (a no-op once done)."""
    total = trainer.estimated_stepping_batches
    trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
    return per_epoch, int(total) if math.isfinite(total) else None


def listed(names: Sequence[str], shown: int = 8) -> str:
    """``names`` for a one-line report: how many, and the first ``shown`` of them."""
    names = list(names)
    if not names:
        return "none"
    head = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} ({head})"


def input_description(module: nn.Module, key: InputKey) -> str:
    """How the callbacks call ``module`` on a batch: its ``startwell_forward``, or the batch's ``input_key`` parts."""
    if batch_forward(module) is not None:
        return f"{FORWARD_METHOD}(batch)"
    return f"input_key={key!r}"


def report_attached(trainer: pl.Trainer, prefix: str, who: str, facts: dict[str, str]) -> str:
    """Say once, at fit start, what the callback ``who`` attached to: one line on rank zero through the
    ``lightning.pytorch`` logger and, in TensorBoard, the same text at ``<prefix>/attached``. Returns the line."""
    text = f"{who} attached: " + "; ".join(f"{name}: {value}" for name, value in facts.items())
    rank_zero_info(text)
    for writer in tensorboard_experiments(trainer):
        writer.add_text(f"{prefix}/attached", text, global_step=trainer.global_step)
    return text
