"""How a batch of inputs becomes a call of the model, and its output a tensor (pure PyTorch, no Lightning).

One convention for every function that runs a model (:func:`~lightning_startwell.fisher.fisher_trace`,
:func:`~lightning_startwell.init.forward_variances`, LSUV) and every callback that does:

* ``inputs`` is a tensor (``model(x)``), a tuple, namedtuple or list of tensors (``model(*inputs)``, positional, in
  order), a mapping of tensors (a dict, a Hugging Face ``BatchEncoding``: ``model(**inputs)``, keyword arguments by
  name: ``{"input_ids": ..., "attention_mask": ...}``) or a dataclass of tensors (keyword arguments by field name).
  Every tensor holds the samples along dim 0, so the inputs can be split into samples and chunks; non-tensor values
  are passed as they are. Splitting keeps the container's type (Lightning's ``apply_to_collection``, the function that
  moves batches between devices): a namedtuple stays a namedtuple, a dataclass a dataclass, a ``BatchEncoding`` a
  ``BatchEncoding``.
* ``forward``, when given, is a function of the inputs that returns the model's output, used instead of calling the
  model (a LightningModule's ``startwell_forward(batch)``); it gets the inputs whole.
* The output is read through: an object with ``.logits`` (a Hugging Face ``ModelOutput``) or a dict with ``"logits"``
  gives that tensor.
* The call runs eagerly on a ``torch.compile``d model (:func:`lightning_startwell._compile.eager`): a measurement
  compiles nothing and sees every hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union, cast

import torch
from lightning_utilities.core.apply_func import apply_to_collection, is_dataclass_instance
from torch import nn

from lightning_startwell._compile import eager

Inputs = Union[torch.Tensor, tuple, list, Mapping]
Forward = Callable[[Any], Any]


def map_tensors(fn: Callable[[torch.Tensor], Any], inputs: Any) -> Any:
    """``inputs`` with ``fn`` applied to every tensor, nested in tuples, namedtuples, lists, mappings (dicts,
    ``BatchEncoding``) and dataclasses, each container rebuilt as its own type (Lightning's ``apply_to_collection``);
    other values unchanged."""
    return apply_to_collection(inputs, torch.Tensor, fn)


def tensor_leaves(inputs: Any) -> list[torch.Tensor]:
    """The tensors of ``inputs``, in the order :func:`map_tensors` visits them."""
    leaves: list[torch.Tensor] = []
    map_tensors(leaves.append, inputs)
    return leaves


def with_leaves(inputs: Any, leaves: list[torch.Tensor]) -> Any:
    """``inputs`` with its tensors replaced, in order, by ``leaves`` (for torch.func, which batches tensors only)."""
    remaining = iter(leaves)
    return map_tensors(lambda _: next(remaining), inputs)


def num_samples(inputs: Any) -> int:
    """The number of samples N: dim 0 of every tensor in ``inputs``, or a ValueError naming ``inputs``."""
    sizes = {t.shape[0] if t.ndim else None for t in tensor_leaves(inputs)}
    if len(sizes) != 1 or None in sizes:
        shapes = [tuple(t.shape) for t in tensor_leaves(inputs)]
        raise ValueError(
            f"`inputs` must hold tensors with the samples along dim 0, all of the same size; got {shapes}."
        )
    return cast(int, sizes.pop())  # not None: refused above


def select(inputs: Any, index: Union[slice, int, torch.Tensor]) -> Any:
    """The samples ``index`` of ``inputs`` (every tensor indexed along dim 0)."""
    return map_tensors(lambda t: t[index], inputs)


def call_arguments(inputs: Any, forward: Optional[Forward] = None) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model call for ``inputs`` (see the module doc)."""
    if forward is not None or isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if is_dataclass_instance(inputs):
        return (), {field.name: getattr(inputs, field.name) for field in dataclasses.fields(inputs) if field.init}
    raise ValueError(
        "`inputs` must be a tensor, a tuple/namedtuple/list, a mapping (dict, BatchEncoding) or a dataclass of tensors,"
        f" got {type(inputs).__name__}."
    )


def logits(output: Any) -> Any:
    """``output.logits`` or ``output["logits"]`` when there is one, else ``output``."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    found = getattr(output, "logits", None)
    return found if isinstance(found, torch.Tensor) else output


@contextmanager
def routed(model: nn.Module, forward: Optional[Forward]) -> Iterator[None]:
    """Inside, ``model(inputs)`` runs ``forward(inputs)``: an instance attribute shadows the class's ``forward``, so
    module hooks and ``torch.func.functional_call`` see the same call as a plain one. A ``forward`` that calls the model
    itself (``self(x)``) reaches the class's own ``forward``. An instance ``forward`` it shadows (Lightning's compiled
    ``forward`` of a model given as ``torch.compile(model)``) is put back after. Nothing changes when ``forward`` is
    None."""
    if forward is None or getattr(vars(model).get("forward"), "startwell_routed", False):
        yield
        return
    own_forward = type(model).forward
    shadowed = vars(model).get("forward")
    depth = [0]

    def route(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:
            return own_forward(model, *args, **kwargs)
        depth[0] += 1
        try:
            return forward(*args, **kwargs)
        finally:
            depth[0] -= 1

    route.startwell_routed = True  # type: ignore[attr-defined]
    model.forward = route
    try:
        yield
    finally:
        if shadowed is None:
            del model.forward
        else:
            model.forward = shadowed


def run(model: nn.Module, inputs: Any, forward: Optional[Forward] = None) -> Any:
    """The model's output on ``inputs`` (read through ``.logits``), by the convention of the module doc."""
    args, kwargs = call_arguments(inputs, forward)
    with routed(model, forward), eager():
        return logits(model(*args, **kwargs))


__all__ = [
    "Forward",
    "Inputs",
    "call_arguments",
    "logits",
    "map_tensors",
    "num_samples",
    "routed",
    "run",
    "select",
    "tensor_leaves",
    "with_leaves",
]
