"""Per-sample norms where no closed form applies: ``torch.func`` vector-Jacobian products of one module from its
recorded inputs, or per-sample gradients of the whole model; one sample at a time where vmap cannot batch a kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Optional, cast

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from lightning_startwell._precision import accumulate
from lightning_startwell.fisher.closed_forms import _per_sample_sq_norm
from lightning_startwell.fisher.likelihoods import check_output
from lightning_startwell.fisher.ownership import _first_tensor, _owners, owned_parameters
from lightning_startwell.model_call import (
    Forward,
    call_arguments,
    logits,
    num_samples,
    run,
    tensor_leaves,
    with_leaves,
)


def _vjp_norms(
    layer: nn.Module,
    params: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
    delta: torch.Tensor,
    chunk: int,
    split: list[bool],
) -> torch.Tensor:
    """Per-sample ||J_params(layer)^T delta_i||^2, by vmap over samples of a vector-Jacobian product of the layer
    alone (``params``: names relative to the layer). ``split`` says, for each tensor of the call (in the order of
    :func:`~lightning_startwell.model_call.tensor_leaves` of ``(args, kwargs)``), whether it holds the samples along
    dim 0 (split by sample) or is shared by them (passed whole), as :mod:`~lightning_startwell.fisher.provenance`
    verified it; the output holds them along dim 0. Returns (N, owners): one column per module owning parameters, in
    the order of :func:`_owners`."""
    n = delta.shape[0]
    leaves = tensor_leaves((args, kwargs))
    batched = [t for t, per_sample in zip(leaves, split, strict=True) if per_sample]
    owners = _owners(params)

    def one(sample: list[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
        rows = iter(sample)
        call_leaves = [next(rows)[None] if per_sample else t for t, per_sample in zip(leaves, split, strict=True)]
        call_args, call_kwargs = with_leaves((args, kwargs), call_leaves)

        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            out = _first_tensor(functional_call(layer, p, tuple(call_args), dict(call_kwargs)))
            assert out is not None  # the layer's output holds the tensor its hooks saw
            return out[0]

        pullback = vjp(f, params)[1]
        (grads,) = pullback(d)
        return torch.stack([cast(torch.Tensor, sum(_sq_norm(grads[k]) for k in keys)) for keys in owners.values()])

    chunks = []
    with _dense_embeddings(layer), _plain_recurrent_kernels(layer):
        for s in range(0, n, chunk):
            chunks.append(_vmap_or_loop(one, [t[s : s + chunk] for t in batched], delta[s : s + chunk]))
    return torch.cat(chunks)


def _plain_recurrent_kernels(layer: nn.Module) -> AbstractContextManager:
    """For a layer holding a recurrent layer, oneDNN off: on CPU its ``mkldnn_rnn_layer`` backward, called by a
    vector-Jacobian product of the layer alone, fails ("Expected a proper Tensor but got None ... 'workspace'");
    PyTorch's own kernel gives the same gradients."""
    if any(isinstance(m, nn.RNNBase) for m in layer.modules()):
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()


@contextmanager
def _dense_embeddings(model: nn.Module) -> Iterator[None]:
    """Embeddings with ``sparse=True`` give dense gradients inside: torch.func cannot batch sparse ones (the values are
    the same)."""
    sparse = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in sparse:
        m.sparse = False
    try:
        yield
    finally:
        for m in sparse:
            m.sparse = True


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    """||g||^2, at least in float32."""
    return torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).square()


#: ``torch.OutOfMemoryError`` is PyTorch 2.5's name; 2.4 (the oldest supported) has only the CUDA one it aliases.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _vmap_or_loop(fn: Callable, *args: Any) -> Any:
    """``vmap(fn)(*args)`` over dim 0 of every tensor in ``args`` (tensors, or dicts of dicts or of tensors); where
    torch.func cannot batch a kernel (recurrent layers), one call per sample, the results stacked. Out of memory is
    raised, not taken for a kernel vmap cannot batch (a per-sample loop would hide it and run for hours)."""
    try:
        return vmap(fn)(*args)
    except _OUT_OF_MEMORY:
        raise
    except RuntimeError:
        n = len(args[-1])  # the last argument is a tensor of samples

        def pick(value: Any, i: int) -> Any:
            if isinstance(value, dict):
                return {k: pick(v, i) for k, v in value.items()}
            return [pick(v, i) for v in value] if isinstance(value, list) else value[i]

        rows = [fn(*(pick(a, i) for a in args)) for i in range(n)]
        if isinstance(rows[0], dict):
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return torch.stack(rows)

def _vmap_sums(
    model: nn.Module,
    x: Any,
    cotangents: Callable[[torch.Tensor], Any],
    likelihood: str,
    chunk: int,
    forward: Optional[Forward],
    *,
    only: Optional[set[int]] = None,
    passes: Optional[Any] = None,
) -> dict[str, torch.Tensor]:
    """Per-module sums of per-sample squared norms from ``torch.func`` per-sample gradients, in chunks of samples
    (every input tensor split by sample: masks too). ``only``: the ids of the parameters to differentiate (the others
    held fixed), all trainable ones when None. ``passes``: the backward passes (output cotangents and weights) already
    drawn for this batch, so that the hooks and this path use the same labels; drawn from the output when None."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: p for n, p in trainable.items() if only is None or id(model.get_parameter(n)) in only}
    fixed = {n: p for n, p in trainable.items() if n not in params}
    buffers = dict(model.named_buffers())
    owner = {n: n.rpartition(".")[0] for n in params}

    def projected_output(p: dict[str, torch.Tensor], leaves: list[torch.Tensor], vi: torch.Tensor) -> torch.Tensor:
        args, kwargs = call_arguments(with_leaves(x, [t.unsqueeze(0) for t in leaves]), forward)
        out = logits(functional_call(model, ({**fixed, **p}, buffers), args, kwargs))
        return (out.float().reshape(-1) * vi.reshape(-1)).sum()

    def per_sample_grads(p: dict[str, torch.Tensor], leaves: list, vs: torch.Tensor) -> dict[str, torch.Tensor]:
        return _vmap_or_loop(lambda li, vi: grad(projected_output)(p, li, vi), leaves, vs)

    n = num_samples(x)
    if passes is None:
        with torch.no_grad():
            passes = cotangents(check_output(run(model, x, forward), n, likelihood))
    leaves = [t.detach() for t in tensor_leaves(x)]
    sums: dict[str, torch.Tensor] = {}
    with _dense_embeddings(model):
        for v, weight in passes:
            for start in range(0, n, chunk):
                piece = [t[start : start + chunk] for t in leaves]
                grads = per_sample_grads(params, piece, v.detach()[start : start + chunk])
                for name, g in grads.items():
                    norms = accumulate(_per_sample_sq_norm(g))
                    if weight is not None:
                        norms = norms * weight[start : start + chunk]
                    key = owner[name]
                    sums[key] = sums[key] + norms.sum() if key in sums else norms.sum()
    return sums


#: Samples per vmap call when ``chunk_size`` is not given: the per-module fallback's chunks, and the most a
#: whole-model chunk holds.
DEFAULT_CHUNK = 32
#: Bytes of per-sample gradients a whole-model chunk may hold where the device's free memory is unknown (CPU): 256 MiB.
HOST_CHUNK_BYTES = 2**28


def whole_model_chunk(model: nn.Module, chunk_size: Optional[int], only: Optional[set[int]] = None) -> int:
    """Samples per whole-model vmap call: ``chunk_size`` when given; else as many as keep the chunk's per-sample
    gradients (one copy of every trainable parameter per sample; of those in ``only`` when given) within a quarter of
    the accelerator's free memory (CUDA) or :data:`HOST_CHUNK_BYTES` elsewhere, between 1 and :data:`DEFAULT_CHUNK`.
    A 124M-parameter float32 model needs 0.5 GB per sample: 32 samples would be 16 GB."""
    if chunk_size is not None:
        return chunk_size
    params = [p for p in model.parameters() if p.requires_grad and (only is None or id(p) in only)]
    per_sample = sum(p.numel() * max(p.element_size(), 4) for p in params) or 1  # gradients at least in float32
    device = params[0].device if params else torch.device("cpu")
    return max(1, min(DEFAULT_CHUNK, _memory_budget(device) // per_sample))


def _memory_budget(device: torch.device) -> int:
    """Bytes a whole-model chunk of per-sample gradients may take on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4  # the rest for the activations of the chunk's forward and backward
    return HOST_CHUNK_BYTES


def _whole_model_is_small(model: nn.Module, chunk: int) -> bool:
    """Whether the per-sample gradients of a chunk of samples for the whole model are small (at most 2^25 numbers):
    then one per-sample pass over the whole model (``method="vmap"``) costs less than the hooks' pass plus a per-sample
    pass for some parameters; for a larger model the hooks keep memory low."""
    return chunk * sum(p.numel() for p in model.parameters() if p.requires_grad) <= 2**25


def _whole_model_pass_is_cheaper(model: nn.Module, chunk: int) -> bool:
    """Whether the model's own forward uses a parameter directly (a learned position or class token) while the whole
    model is small (:func:`_whole_model_is_small`). Such a parameter's per-sample gradients need a per-sample pass over
    the whole model anyway; then one such pass gives every layer at once."""
    return "" in owned_parameters(model) and _whole_model_is_small(model, chunk)
