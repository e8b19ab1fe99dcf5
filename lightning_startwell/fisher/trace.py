"""The public functions: :func:`fisher_trace` and :func:`fisher_trace_sums`, which choose the path (hooks or
whole-model vmap) and run it over batches of inputs in measurement mode."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_startwell._compile import eager
from lightning_startwell._validation import check_int
from lightning_startwell.fisher.checks import check_fisher_arguments
from lightning_startwell.fisher.fallbacks import (
    DEFAULT_CHUNK,
    _vmap_sums,
    _whole_model_pass_is_cheaper,
    whole_model_chunk,
)
from lightning_startwell.fisher.hooks import _auto_sums
from lightning_startwell.fisher.likelihoods import _cotangents
from lightning_startwell.fisher.ownership import _parameter_holders, owned_parameters
from lightning_startwell.fisher.provenance import Provenance, cached_provenance
from lightning_startwell.model_call import Forward, map_tensors, num_samples, routed, run, select


@dataclass(frozen=True)
class FisherTrace:
    """Trace of the Fisher information averaged over ``num_samples`` inputs: ``total`` and its split ``per_layer``
    (module name -> the part of the trace carried by that module's own parameters; they add up to ``total``)."""

    total: float
    per_layer: dict[str, float]
    num_samples: int

@contextmanager
def _measurement_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autocast off for the measurement; every module's mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        with torch.autocast(device_type=device_type, enabled=False), torch.enable_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training

def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's parameters and the dtype of its floating-point ones (float32 without any)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return device, dtype


def _model_input(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Inputs on the model's device, floats in the dtype of its parameters (float32, or bfloat16 / float16 for a model
    in half precision); integer ids as they are."""
    return map_tensors(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device), x)


def fisher_trace_sums(
    model: nn.Module,
    inputs: Any,
    *,
    fisher: str = "true",
    targets: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    likelihood: str = "categorical",
    noise_std: float = 1.0,
    method: str = "auto",
    forward: Optional[Forward] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-module sums over ``inputs`` of the per-sample squared gradient norms (float64 tensors; float32 on a device
    without float64), and the number of samples: the quantities to add across processes before dividing. See
    :func:`fisher_trace`."""
    check_fisher_arguments(fisher, likelihood, method, noise_std)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    if batch_size is not None:
        check_int("batch_size", batch_size)
    count = num_samples(inputs)
    if fisher == "empirical" and (targets is None or len(targets) != count):
        raise ValueError("fisher='empirical' needs `targets`, one per input.")
    if mask is not None and len(mask) != count:
        raise ValueError(f"`mask` must hold one row per input ({count}), got {tuple(mask.shape)}.")
    device, dtype = _placement(model)
    step = batch_size or count
    module_chunk = chunk_size or DEFAULT_CHUNK
    hooks = method == "auto" and not _whole_model_pass_is_cheaper(model, module_chunk)
    totals: dict[str, torch.Tensor] = {}
    with _measurement_mode(model), routed(model, forward), eager():  # compiled models too: see _compile
        provenance: Optional[Provenance] = None
        if hooks and count:  # which tensors hold the samples, from runs of one and two samples (see provenance.py),
            # kept between measurements under a key of the model, its inputs' layout and forward; re-checked now and
            # then (see cached_provenance)
            first_two = _model_input(select(inputs, slice(0, 2)), device, dtype)
            provenance = cached_provenance(model, first_two, _parameter_holders(model), forward)
        for start in range(0, count, step):
            x = _model_input(select(inputs, slice(start, start + step)), device, dtype)
            y = targets[start : start + step] if targets is not None else None
            m = mask[start : start + step] if mask is not None else None

            def cotangents(output: torch.Tensor, y: Optional[torch.Tensor] = y, m: Optional[torch.Tensor] = m) -> Any:
                return _cotangents(output, fisher, likelihood, y, generator, noise_std, m)

            sums = None
            if hooks:
                sums = _auto_sums(model, x, cotangents, likelihood, module_chunk, forward, provenance, chunk_size)
            if sums is None:
                sums = _vmap_sums(model, x, cotangents, likelihood, whole_model_chunk(model, chunk_size), forward)
            for name, value in sums.items():
                totals[name] = totals[name] + value if name in totals else value
    return totals, count


def layer_order(model: nn.Module, inputs: Any, forward: Optional[Forward] = None) -> list[str]:
    """The layers of the per-layer trace (:func:`~lightning_startwell.fisher.owned_parameters`) in the order the model
    first calls them on the first sample of ``inputs`` (one forward pass in measurement mode, without gradients); layers
    it does not call follow in registration order."""
    owners = {name: model.get_submodule(name) for name in owned_parameters(model)}
    called: dict[str, None] = {}
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: called.setdefault(name))
        for name, module in owners.items()
    ]
    try:
        with _measurement_mode(model), torch.no_grad():
            run(model, _model_input(select(inputs, slice(0, 1)), *_placement(model)), forward)
    finally:
        for handle in handles:
            handle.remove()
    return [*called, *(name for name in owners if name not in called)]


def fisher_trace(
    model: nn.Module,
    inputs: Any,
    *,
    fisher: str = "true",
    targets: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    likelihood: str = "categorical",
    noise_std: float = 1.0,
    per_layer: bool = True,
    method: str = "auto",
    forward: Optional[Forward] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> FisherTrace:
    """Trace of the Fisher information of ``model`` on ``inputs``: total, per layer, number of samples.

    tr F = (1/N) sum_i E_y ||grad_w log p_w(y | x_i)||^2 with y from the model (``true``, one draw per input from
    ``generator``), the ``targets`` (``empirical``) or the expectation over y in closed form (``exact``).

    Sequences: for (N, T, C) logits (a language model) every position t has its own categorical likelihood and
    log p(y | x_i) = sum_t log p(y_t | x_i), over the positions that ``mask`` keeps (and, for ``empirical``, whose
    target is not -100). ``true`` draws one label per position and costs one backward pass; ``exact`` costs one
    backward pass per position and class, T x C (the positions' labels are independent, so their cross terms vanish
    in expectation only one position at a time): on a vocabulary of V tokens, T x V passes. Use ``true`` for language
    models: an unbiased estimate of ``exact`` at the cost of one pass. Per-pixel (N, C, H, W) logits (segmentation,
    PyTorch's ``cross_entropy`` layout) are the same with the H x W pixels as the positions, in row-major order.

    Args:
        model: returns (N, C), (N, T, C) or per-pixel (N, C, H, W) logits (``categorical``) or (N,), (N, D),
            (N, T, D) or (N, D, H, W) means (``gaussian``); an output with ``.logits`` (a Hugging Face
            ``ModelOutput``) or a dict with ``"logits"`` is read through.
        inputs: N examples: a tensor (``model(x)``), a tuple of tensors (``model(*inputs)``) or a dict of tensors
            (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``), every tensor with the samples along dim
            0 (all are split by sample, masks included).
        fisher: ``true``, ``empirical`` or ``exact``.
        targets: dataset labels (or regression targets), for ``empirical``: (N,), or (N, T) for sequences, aligned
            with the logits' positions (for a causal LM, the next token: ``input_ids`` shifted left, the last -100),
            or (N, H, W) for per-pixel logits; a label of -100 leaves its position out. Gaussian targets are shaped
            as the outputs.
        mask: (N, T), for (N, T, C) outputs, or (N, H, W) for per-pixel (N, C, H, W) outputs: positions where it is
            0 are left out for every kind (padding: the ``attention_mask``; pixels outside the region of interest).
        likelihood: ``categorical`` (softmax of logits) or ``gaussian`` (N(output, noise_std^2 I), for regression).
        noise_std: standard deviation of the Gaussian likelihood.
        per_layer: also return the split per module (module name -> its share); otherwise ``per_layer`` is empty.
        method: ``auto`` (closed forms and per-module vmap, see the module doc) or ``vmap`` (whole-model ``torch.func``
            per-sample gradients).
        forward: a function of ``inputs`` returning the model's output, called instead of the model (e.g. a
            LightningModule's ``startwell_forward``); it gets each chunk of ``inputs`` whole.
        generator: CPU generator for the ``true`` Fisher's draws.
        batch_size: inputs per forward pass (default: all at once).
        chunk_size: samples per vmap call in the fallbacks. Default: 32 per module; for the whole model, as many as
            keep the chunk's per-sample gradients within a quarter of the free CUDA memory (256 MiB on CPU), 1 to 32
            (see :func:`~lightning_startwell.fisher.fallbacks.whole_model_chunk`). Out of memory is raised.

    Returns:
        A :class:`FisherTrace`.

    Example::

        trace = fisher_trace(model, x, fisher="exact")
        print(trace.total, trace.per_layer)
    """
    sums, count = fisher_trace_sums(
        model, inputs, fisher=fisher, targets=targets, mask=mask, likelihood=likelihood, noise_std=noise_std,
        method=method, forward=forward, generator=generator, batch_size=batch_size, chunk_size=chunk_size,
    )
    per = {name: value.item() / count for name, value in sums.items()}
    return FisherTrace(total=math.fsum(per.values()), per_layer=per if per_layer else {}, num_samples=count)
