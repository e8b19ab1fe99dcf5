"""Gradient dynamics of Liu et al. (2023, "Dropout Reduces Underfitting", Section 3), pure PyTorch (no Lightning).

Four numbers follow how dropout changes the first steps of training:

* the gradient norm ||g||_2 of the mini-batch gradient the optimizer receives;
* the model distance ||w_t - w_0||_2 travelled from the initial weights;
* the gradient direction variance over K mini-batch gradients g_1..g_K, the mean cosine distance over pairs,
  GDV = 2 / (K (K - 1)) sum_{i<j} (1 - cos(g_i, g_j)) / 2;
* the gradient direction error, the mean cosine distance to the gradient of the whole set,
  GDE = 1/K sum_k (1 - cos(g_k, g)) / 2, with g = 1/K sum_k g_k.

Neither needs the K gradients kept: with the unit vectors u_k = g_k / ||g_k||, U = sum_k u_k and S = sum_k g_k,
sum_{i<j} cos(g_i, g_j) = (||U||^2 - K) / 2 and sum_k cos(g_k, g) = U . S / ||S||. Two float64 vectors of the model's
size hold a whole measurement, and under data parallelism they are summed across processes like any gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_startwell._precision import accumulate
from lightning_startwell.model_call import Forward, run

Loss = Literal["cross_entropy", "mse"]
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


#: The target that marks a position to leave out (PyTorch's ``cross_entropy`` and Hugging Face's ``labels``).
IGNORE_INDEX = -100


def mean_loss(
    loss: Loss, output: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The mean ``loss`` of a mini-batch over its samples, or over its positions when the model predicts one value
    per position (the loss a language model or a segmentation model trains on).

    ``cross_entropy`` takes (N, C) logits with (N,) class indices; (N, T, C) logits (a sequence: a language model's
    tokens) with (N, T) targets; (N, C, H, W, ...) logits (per pixel) with (N, H, W, ...) targets. The target at
    position t is the class of that position (for a causal language model, the token at t + 1: Hugging Face's
    ``labels`` are unshifted, and its models shift them inside). Targets equal to -100 are left out, and so are the
    positions where ``mask`` (the shape of the targets) is 0; the mean is over the positions kept, as
    ``F.cross_entropy(..., ignore_index=-100)`` and Hugging Face's language-model loss take it. ``mse`` takes outputs
    and targets of one shape; ``mask``, of the output's shape up to its last dims, leaves positions out.
    """
    if loss == "cross_entropy":
        sequence = output.ndim == 3 and targets.shape == output.shape[:2]
        per_item = output.ndim == 2 and targets.shape == output.shape[:1]
        dense = output.ndim >= 4 and targets.shape == (output.shape[0], *output.shape[2:])
        if not (sequence or per_item or dense):
            raise ValueError(
                f"cross_entropy needs (N,) targets for (N, C) logits, (N, T) for (N, T, C) or (N, H, W) for"
                f" (N, C, H, W); got targets {tuple(targets.shape)} for an output {tuple(output.shape)}. Set"
                " `target_key` to the class indices aligned with the output's positions."
            )
        if mask is not None:
            targets = targets.masked_fill(mask.to(torch.bool).logical_not(), IGNORE_INDEX)
        logits = output.transpose(1, 2) if sequence else output
        return F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX)
    if targets.shape != output.shape:
        raise ValueError(f"mse needs targets of the output's shape {tuple(output.shape)}, got {tuple(targets.shape)}.")
    if mask is None:
        return F.mse_loss(output, targets.to(output.dtype))
    kept = mask.to(output.dtype).reshape(*mask.shape, *([1] * (output.ndim - mask.ndim))).expand_as(output)
    return ((output - targets.to(output.dtype)) ** 2 * kept).sum() / kept.sum()


class DirectionStatistics(NamedTuple):
    """Gradient direction variance and error of a set of gradients (both in [0, 1]; 0 when all point the same way)."""

    variance: float
    error: float


def gradient_norm(gradients: Iterable[Optional[torch.Tensor]]) -> torch.Tensor:
    """||g||_2 over all the tensors of ``gradients`` (None skipped), as a 0-d float32 tensor on their device: nothing
    is read back to the host. Accumulated in float32 whatever the gradients' dtype (fp16 squares overflow)."""
    norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in gradients if g is not None]
    if not norms:
        return torch.zeros(())
    device = norms[0].device  # parameters on several devices (model parallel) meet on the first one's
    return torch.linalg.vector_norm(torch.stack([n if n.device == device else n.to(device) for n in norms]))


def parameter_distance(parameters: Sequence[torch.Tensor], initial: Sequence[torch.Tensor]) -> torch.Tensor:
    """||w - w_0||_2 over all the tensors (``parameters[i]`` against ``initial[i]``), a 0-d float32 tensor."""
    if len(parameters) != len(initial):
        raise ValueError(f"`initial` must hold one tensor per parameter, got {len(initial)} for {len(parameters)}.")
    return gradient_norm(
        p.detach().float() - w0.to(p.device).float() for p, w0 in zip(parameters, initial, strict=True)
    )


def direction_sums(gradients: Iterable[torch.Tensor], sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add flat gradients to the sums of a direction measurement: a (2, P) tensor, row 0 the sum of the unit vectors
    g_k / ||g_k||, row 1 the sum of the gradients g_k (a new one when ``sums`` is None, else ``sums`` in place), in
    float64 (float32 on a device without it). Sums from separate sets of gradients add up to the sums of their union."""
    for gradient in gradients:
        g = accumulate(gradient.detach().reshape(-1))
        if sums is None:
            sums = torch.zeros(2, g.numel(), dtype=g.dtype, device=g.device)
        sums[0].add_(g / torch.linalg.vector_norm(g))
        sums[1].add_(g)
    if sums is None:
        raise ValueError("`gradients` is empty: a direction measurement needs at least two gradients.")
    return sums


def direction_statistics(sums: torch.Tensor, count: int) -> DirectionStatistics:
    """Direction variance and error of ``count`` gradients from their :func:`direction_sums` (see the module doc).

    A zero gradient has no direction: its statistics are NaN.
    """
    if count < 2:
        raise ValueError(f"`count` must be >= 2 (pairs of gradients), got {count}.")
    units, total = sums[0], sums[1]
    mean_pair_cosine = (units.dot(units).item() - count) / (count * (count - 1))
    mean_cosine_to_total = units.dot(total).item() / (count * torch.linalg.vector_norm(total).item())
    return DirectionStatistics((1.0 - mean_pair_cosine) / 2.0, (1.0 - mean_cosine_to_total) / 2.0)


def gradient_directions(gradients: Sequence[torch.Tensor]) -> DirectionStatistics:
    """Direction variance and error of the flat ``gradients`` (at least two): :func:`direction_statistics` of
    :func:`direction_sums`."""
    return direction_statistics(direction_sums(gradients), len(gradients))


@contextmanager
def seeded_random_streams(device: torch.device, seed: int) -> Iterator[None]:
    """Inside, the global random streams of the CPU and of ``device`` start from ``seed`` (dropout masks are then
    reproducible); on exit they are back where they were, so training draws the same numbers as without the block."""
    accelerator = device.type != "cpu"
    index = device.index if device.index is not None else 0
    devices, device_type = ([index], device.type) if accelerator else ([], "cuda")
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        elif accelerator:
            torch.get_device_module(device.type).manual_seed(seed)
        yield


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """On exit every buffer of ``model`` (BatchNorm running statistics, their counters) holds its value from entry."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def probe_gradient(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    parameters: Sequence[torch.Tensor],
    *,
    loss: Loss = "cross_entropy",
    forward: Optional[Forward] = None,
    seed: int = 0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gradient of the mean ``loss`` (:func:`mean_loss`) of ``model`` on one mini-batch with respect to
    ``parameters``, flattened and concatenated in their order (float32; zeros for a parameter the loss does not reach).

    The model runs in the modes its modules are in (in training mode dropout is active, as for the optimizer), in
    fp32 (autocast off), with the dropout masks drawn from ``seed``. Nothing that training uses is touched: not
    ``.grad`` (``torch.autograd.grad``), not the buffers (BatchNorm running statistics restored), not the global
    random streams (forked).

    Args:
        model: the model.
        inputs: what the model is called with (see :mod:`lightning_startwell.model_call`).
        targets: class indices (``cross_entropy``; per position for a sequence or per-pixel output, -100 left out)
            or regression targets (``mse``).
        parameters: the tensors to differentiate with respect to.
        loss: ``cross_entropy`` or ``mse``, mean over the mini-batch.
        forward: a function of ``inputs`` that returns the model's output, used instead of calling the model.
        seed: seed of the random streams inside the measurement.
        mask: for an output with positions, 1 for the positions to count and 0 for those to leave out (padding).
    """
    device = parameters[0].device if parameters else torch.device("cpu")
    with buffers_kept(model), seeded_random_streams(device, seed), torch.enable_grad():
        with torch.autocast(device_type=device.type, enabled=False):
            value = mean_loss(loss, run(model, inputs, forward).float(), targets, mask)
        grads = torch.autograd.grad(value, list(parameters), allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).float()
            for g, p in zip(grads, parameters, strict=True)
        ]
    )


__all__ = [
    "LOSSES",
    "DirectionStatistics",
    "Loss",
    "buffers_kept",
    "direction_statistics",
    "direction_sums",
    "mean_loss",
    "gradient_directions",
    "gradient_norm",
    "parameter_distance",
    "probe_gradient",
    "seeded_random_streams",
]
