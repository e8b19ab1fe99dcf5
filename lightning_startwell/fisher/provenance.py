"""Which tensors a layer is called with and returns hold the samples, decided by what the model does with the samples,
not by shapes.

The hook rules need, for each layer, tensors that hold sample i (and nothing from the other samples) at index i of one
dimension, the output gradient of such a tensor then holding each sample's own gradient. A shape cannot tell: a
position table of T rows looks per-sample when N == T, and an output shared by the samples receives their summed
gradient. So the model runs (without gradients) on sample 0 alone, on sample 1 alone and on both together, and every
tensor a layer is called with or returns is tagged by comparing the three runs:

* ``sample0`` (``sample1``): dim 0 (1) has size 1 alone and 2 together, and index i of the pair run equals the run
  of sample i alone: the tensor holds the samples along that dimension, nothing mixed between them;
* ``shared``: the same tensor in the three runs (a position table, a causal mask): it holds no sample;
* neither (untagged): something else (samples folded with positions, mixed between samples, sized by the batch).

The tags of the measured call are then checked against its shapes (a per-sample tensor of N samples, a shared tensor
of the shape seen). What is not tagged is not guessed: the layer's parameters go to the exact path.

The three runs cost about a quarter of a measurement of a small language model, so :func:`cached_provenance` keeps the
verdict of a model between measurements (a :class:`weakref.WeakKeyDictionary`: it dies with the model) and reuses it
only under the same key: the same module tree (names, types, train/eval flags, installed forward hooks and pre-hooks by
their unique handle ids, instance ``forward`` attributes), the same parameters and buffers (names, shapes, dtypes,
devices, ``requires_grad``), the same routed ``forward`` (weakly: a bound method by its object and function), the same
global module hooks, and the same input layout (the containers, their keys, plain values, and every tensor's dtype,
device and shape; every tensor holds the samples along dim 0). Anything else recomputes (a new sequence length is a new
key). What the key cannot see is a verdict that depends on the values: a model whose control flow or sample mixing
follows the inputs or the parameters (zero-initialised gates that later open). The uncached check already trusts the
verdict of samples 0 and 1 for the whole batch; the cache trusts it for later batches too, so it guards it: every
:data:`RECHECK_EVERY` reuses the verdict is computed again, and where it differs the model is marked unstable (computed
on every measurement from then on, whatever the key) with a warning; a verdict from fewer than two distinct samples
(one sample, or two equal ones, where a tensor mixing the samples looks shared) is never cached."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_startwell.fisher.ownership import _first_tensor
from lightning_startwell.model_call import Forward, map_tensors, num_samples, run, select, tensor_leaves

#: The dimensions that may hold the samples (1: a sequence-first ``nn.MultiheadAttention``).
SAMPLE_DIMS = (0, 1)
SHARED = "shared"

_PLAIN = (
    type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format,
    slice, type(Ellipsis), enum.Enum,
)


def has_opaque(value: Any) -> bool:
    """Whether ``value`` holds something other than tensors, plain Python values and the containers
    :func:`~lightning_startwell.model_call.map_tensors` walks (an object that may hide tensors, which cannot then be
    split by sample)."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return False
    if isinstance(value, Mapping):
        return any(has_opaque(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(has_opaque(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(has_opaque(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


def sample_tag(dim: int) -> str:
    return f"sample{dim}"


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to the rounding of kernels run on another batch size (integers: exactly)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if not (x.is_floating_point() or x.is_complex()):
        return torch.equal(x, y)
    tol = 1e-2 if x.element_size() >= 4 else 5e-2
    scale = float(torch.nan_to_num(y.abs(), posinf=0.0).max()) if y.numel() else 0.0
    return bool(torch.allclose(x, y, rtol=tol, atol=tol * scale, equal_nan=True))


def _tags(a: torch.Tensor, b: torch.Tensor, pair: torch.Tensor) -> frozenset[str]:
    """The tags of a tensor from its values in the runs of sample 0 alone (a), sample 1 alone (b) and both (pair)."""
    tags = set()
    if a.shape == b.shape == pair.shape and _close(a, pair) and _close(b, pair):
        tags.add(SHARED)
    for d in SAMPLE_DIMS:
        if a.ndim <= d or a.shape != b.shape or a.shape[d] != 1 or pair.shape != a.shape[:d] + (2,) + a.shape[d + 1 :]:
            continue
        if _close(pair.narrow(d, 0, 1), a) and _close(pair.narrow(d, 1, 1), b):
            tags.add(sample_tag(d))
    return frozenset(tags)


def _agreeing(tags: frozenset[str], shape: torch.Size, measured: torch.Size, n: int) -> frozenset[str]:
    """The tags of a one-sample run's tensor (``shape``) that the measured call's tensor of N samples bears out."""
    kept = {SHARED} if SHARED in tags and measured == shape else set()
    for d in SAMPLE_DIMS:
        if sample_tag(d) in tags and measured == shape[:d] + (n,) + shape[d + 1 :]:
            kept.add(sample_tag(d))
    return frozenset(kept)


@dataclass
class CallRecord:
    """One call of a layer in the one-sample runs: the shapes and tags of the tensors it was called with (in the order
    of :func:`~lightning_startwell.model_call.tensor_leaves` of ``(args, kwargs)``) and of its (first) output, and
    whether it was called with an object that may hide tensors."""

    shapes: list[torch.Size]
    tags: list[frozenset[str]]
    out_shape: Optional[torch.Size]
    out_tags: frozenset[str]
    opaque: bool

    def measured(
        self, leaves: list[torch.Tensor], out: Optional[torch.Tensor], n: int
    ) -> tuple[list[frozenset[str]], frozenset[str]]:
        """The tags borne out by the measured call of N samples (all empty where its tensors differ in number)."""
        if len(leaves) != len(self.shapes) or (out is None) != (self.out_shape is None):
            return [frozenset()] * len(leaves), frozenset()
        tags = [_agreeing(t, s, leaf.shape, n) for t, s, leaf in zip(self.tags, self.shapes, leaves, strict=True)]
        # out and out_shape are both None or both set (checked above)
        out_tags = (
            _agreeing(self.out_tags, self.out_shape, out.shape, n)
            if out is not None and self.out_shape is not None
            else frozenset()
        )
        return tags, out_tags


@dataclass
class Provenance:
    """The call records of every watched layer (None for a layer called a different number of times in the three
    runs), and whether the model's output holds the samples along dim 0."""

    calls: dict[str, Optional[list[CallRecord]]]
    output_per_sample: bool

    def record(self, name: str, index: int) -> Optional[CallRecord]:
        records = self.calls.get(name)
        return records[index] if records is not None and index < len(records) else None


def sample_provenance(model: nn.Module, inputs: Any, names: set[str], forward: Optional[Forward]) -> Provenance:
    """Tag the tensors that the modules ``names`` are called with and return, from three runs without gradients: the
    first sample of ``inputs`` alone, the second alone, both together (two copies of the first when there is one)."""
    count = num_samples(inputs)
    first = select(inputs, slice(0, 1))
    second = select(inputs, slice(1, 2)) if count > 1 else first
    pair = select(inputs, slice(0, 2)) if count > 1 else map_tensors(lambda t: t.repeat(2, *[1] * (t.ndim - 1)), first)
    alone: list[dict[str, list]] = [{}, {}]
    records: dict[str, Optional[list[CallRecord]]] = {}
    stage = [0]

    def watch(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            leaves = tensor_leaves((args, kwargs))
            out = _first_tensor(output)
            if stage[0] < 2:  # copies: a later in-place operation (ReLU(inplace=True), ``out += x``) changes them
                copies = [t.detach().clone() for t in leaves]
                alone[stage[0]].setdefault(name, []).append((copies, out.detach().clone() if out is not None else None))
                return
            calls = records.setdefault(name, [])
            if calls is None:
                return
            index = len(calls)
            singles = [runs.get(name, []) for runs in alone]
            if any(index >= len(s) for s in singles):
                records[name] = None  # called more often together than alone
                return
            (a_leaves, a_out), (b_leaves, b_out) = singles[0][index], singles[1][index]
            same_count = len(a_leaves) == len(b_leaves) == len(leaves)
            calls.append(
                CallRecord(
                    shapes=[t.shape for t in a_leaves] if same_count else [],
                    tags=[_tags(*abp) for abp in zip(a_leaves, b_leaves, leaves, strict=True)] if same_count else [],
                    out_shape=a_out.shape if a_out is not None else None,
                    out_tags=_tags(a_out, b_out, out) if a_out is not None and b_out is not None and out is not None
                    else frozenset(),
                    opaque=has_opaque((args, kwargs)),
                )
            )
            singles[0][index] = singles[1][index] = (None, None)  # compared: let them go

        return hook

    handles = [m.register_forward_hook(watch(n), with_kwargs=True) for n, m in model.named_modules() if n in names]
    outputs = []
    try:
        with torch.no_grad():
            for stage[0], x in enumerate((first, second, pair)):
                outputs.append(run(model, x, forward))
    finally:
        for h in handles:
            h.remove()
    for name in set(alone[0]) | set(alone[1]) | set(records):
        counts = {len(alone[0].get(name, [])), len(alone[1].get(name, [])), len(records.get(name) or [])}
        if len(counts) != 1 or records.get(name) is None:
            records[name] = None  # called a different number of times by one sample and by two
    a, b, both = outputs
    per_sample = all(isinstance(o, torch.Tensor) for o in outputs) and sample_tag(0) in _tags(a, b, both)
    return Provenance(records, per_sample)


#: Reuses of a cached verdict between two re-checks (see the module doc): about 1/17 of the three runs' cost remains.
RECHECK_EVERY = 16
#: Input layouts kept per model (the oldest goes first): a few sequence lengths, the last batch of an epoch.
MAX_LAYOUTS = 4


class _Uncacheable(Exception):
    """An input or forward the key cannot describe: the verdict is computed every time."""


@dataclass
class _Entry:
    provenance: Provenance
    reuses: int = 0


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Entry]] = weakref.WeakKeyDictionary()
#: Models whose verdict changed under one key: computed on every measurement from then on (whatever the key).
_UNSTABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _layout(value: Any) -> Any:
    """A hashable description of ``value``'s containers, keys, plain values and tensors (dtype, device, shape)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device, tuple(value.shape))
    if isinstance(value, _PLAIN):
        try:
            hash(value)
        except TypeError as error:
            raise _Uncacheable from error
        return (type(value), value)
    if isinstance(value, Mapping):
        return (type(value), tuple((key, _layout(v)) for key, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_layout(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple((f.name, _layout(getattr(value, f.name))) for f in dataclasses.fields(value)))
    raise _Uncacheable


def _forward_key(forward: Optional[Forward]) -> Any:
    """The routed ``forward``, held weakly (a bound method of a LightningModule would keep the model alive)."""
    if forward is None:
        return None
    try:
        return weakref.WeakMethod(forward) if inspect.ismethod(forward) else weakref.ref(forward)
    except TypeError as error:  # a callable object without weak references
        raise _Uncacheable from error


def _instance_forward(module: nn.Module) -> Any:
    """An instance attribute ``forward`` (by id: not held), or the marker of the routing of ``trace``."""
    own = vars(module).get("forward")
    if own is None:
        return None
    return "routed" if getattr(own, "startwell_routed", False) else id(own)


def _cache_key(model: nn.Module, inputs: Any, names: set[str], forward: Optional[Forward]) -> tuple:
    from torch.nn.modules import module as module_globals

    modules = tuple(
        (name, type(m), m.training, tuple(m._forward_pre_hooks), tuple(m._forward_hooks), _instance_forward(m))
        for name, m in model.named_modules()
    )
    tensors = tuple(
        (kind, name, t.dtype, t.device, tuple(t.shape), t.requires_grad)
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers()))
        for name, t in named
    )
    hooks = tuple(module_globals._global_forward_pre_hooks), tuple(module_globals._global_forward_hooks)
    return modules, tensors, hooks, frozenset(names), _forward_key(forward), _layout(inputs)


def _distinct_pair(inputs: Any) -> bool:
    """Whether ``inputs`` holds two samples that differ (in some tensor)."""
    if num_samples(inputs) < 2:
        return False
    return any(not torch.equal(t[0], t[1]) for t in tensor_leaves(inputs))


def cached_provenance(model: nn.Module, inputs: Any, names: set[str], forward: Optional[Forward]) -> Provenance:
    """:func:`sample_provenance`, reused between measurements under the key of the module doc (re-checked every
    :data:`RECHECK_EVERY` reuses). Call it in measurement mode, as :func:`sample_provenance`."""
    if model in _UNSTABLE:
        return sample_provenance(model, inputs, names, forward)
    try:
        key = _cache_key(model, inputs, names, forward)
    except _Uncacheable:
        return sample_provenance(model, inputs, names, forward)
    entries = _CACHE.setdefault(model, {})
    entry = entries.get(key)
    if entry is not None and entry.reuses < RECHECK_EVERY:
        entry.reuses += 1
        return entry.provenance
    fresh = sample_provenance(model, inputs, names, forward)
    if entry is not None and fresh != entry.provenance:
        _UNSTABLE.add(model)
        del _CACHE[model]
        warnings.warn(
            f"{type(model).__name__}: which tensors hold the samples changed between two measurements with the same"
            " inputs' layout (a model whose routing follows the values); it is now checked on every measurement (up"
            f" to {RECHECK_EVERY} earlier ones used the previous verdict).",
            stacklevel=3,
        )
    elif entry is not None:
        entry.reuses = 0
    elif _distinct_pair(inputs):
        while len(entries) >= MAX_LAYOUTS:
            del entries[next(iter(entries))]
        entries[key] = _Entry(fresh)
    return fresh
