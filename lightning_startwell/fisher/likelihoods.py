"""Likelihoods: the model output they accept, and the backward passes (output cotangents) of each Fisher kind.

An output of shape (N, T, D) holds T positions per sample (a language model's tokens), each with its own likelihood
(categorical over D classes, or Gaussian in D dimensions); the log-likelihood of sample i is the sum over its positions
t of log p(y_it | x_i), positions left out by ``mask`` (and, for ``empirical``, by a target of -100) excluded. An output
of shape (N, D) is one position per sample. An output of shape (N, D, H, W) (or more spatial dims: (N, D, d1, ..., dk),
k >= 2) is PyTorch's ``cross_entropy`` layout of a dense prediction (segmentation logits): the classes along dim 1, one
position per pixel, the pixels taken as the T positions of a sequence in row-major order; its ``mask`` and categorical
``targets`` are (N, H, W).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional

import torch

from lightning_startwell._precision import accumulate

#: The target that marks a position to leave out (PyTorch's ``cross_entropy`` and Hugging Face's ``labels``).
IGNORE_INDEX = -100

Pass = tuple[torch.Tensor, Optional[torch.Tensor]]


def check_output(output: torch.Tensor, num_inputs: int, likelihood: str) -> torch.Tensor:
    """The model output as (N, D), (N, T, D) or (N, D, H, W, ...): logits with C >= 2 classes for ``categorical``;
    (N,), (N, D), (N, T, D) or (N, D, H, W, ...) for ``gaussian``."""
    if isinstance(output, torch.Tensor) and likelihood == "gaussian" and output.ndim == 1 and len(output) == num_inputs:
        return output[:, None]
    ok = isinstance(output, torch.Tensor) and output.ndim >= 2 and output.shape[0] == num_inputs
    if not ok or (likelihood == "categorical" and _classes(output.shape) < 2):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        expected = (
            "(N, C), (N, T, C) or per-pixel (N, C, H, W) logits with C >= 2"
            if likelihood == "categorical"
            else "(N,), (N, D), (N, T, D) or per-pixel (N, D, H, W) outputs"
        )
        raise ValueError(f"fisher_trace needs the model to return {expected} for N={num_inputs} inputs, got {shape}.")
    return output


def _classes(shape: tuple) -> int:
    """The number of classes (or output dimensions) of an output of ``shape``: along dim 1 for a dense prediction
    (4 dims or more), else along the last dim."""
    return shape[1] if len(shape) >= 4 else shape[-1]


def _position_shape(shape: tuple) -> tuple:
    """The shape of one value per position (a mask, categorical targets) for an output of ``shape``: (N,), (N, T), or
    (N, H, W, ...) for (N, C, H, W, ...)."""
    return (shape[0], *shape[2:]) if len(shape) >= 4 else tuple(shape[:-1])


def _per_position(t: torch.Tensor) -> torch.Tensor:
    """An output (or a tensor of its layout) as (N, T, D): positions along dim 1, classes last; (N, D, H, W, ...)
    becomes (N, H x W x ..., D), the pixels in row-major order."""
    if t.ndim == 2:
        return t[:, None]
    if t.ndim >= 4:
        return t.movedim(1, -1).reshape(t.shape[0], -1, t.shape[1])
    return t


def _as_output(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``v`` (N, T, D) back in the layout of an output of ``shape`` (the inverse of :func:`_per_position`)."""
    if len(shape) >= 4:
        return v.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return v.reshape(shape)


def _positions(
    f: torch.Tensor, shape: torch.Size, mask: Optional[torch.Tensor], targets: Optional[torch.Tensor], ignore: bool
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Targets laid out as (N, T) (categorical) or (N, T, D), and the (N, T) weights of the positions: 0 where
    ``mask`` is 0 or (``ignore``) the target is -100, else 1. ``shape`` is the model's output shape, for messages."""
    n, t, _ = f.shape
    keep = torch.ones(n, t, device=f.device)
    if mask is not None:
        if tuple(mask.shape) != _position_shape(shape) or len(shape) < 3:
            raise ValueError(
                "`mask` must be (N, T) for (N, T, C) outputs, or (N, H, W) for per-pixel (N, C, H, W) outputs, got a"
                f" mask of {tuple(mask.shape)} for {tuple(shape)}."
            )
        keep = keep * (mask.to(f.device).reshape(n, t) != 0)
    if targets is None:
        return None, keep
    targets = targets.to(f.device)
    if ignore:
        if targets.numel() != n * t:
            expected, got = _position_shape(shape), tuple(targets.shape)
            raise ValueError(f"`targets` must hold one label per position, {expected}, got {got}.")
        targets = targets.reshape(n, t).long()
        keep = keep * (targets != IGNORE_INDEX)
        return targets.clamp(min=0), keep
    if len(shape) >= 4:
        if tuple(targets.shape) != tuple(shape):
            raise ValueError(f"`targets` must be shaped as the outputs, {tuple(shape)}, got {tuple(targets.shape)}.")
        return _per_position(targets.float()), keep
    return targets.float().reshape(f.shape), keep


class _PositionPasses(Sequence):
    """One backward pass per position t and class (or output dimension) k: v is ``scale * e_k - centre[:, t]`` at
    position t of each sample (0 elsewhere and where ``keep`` is 0), its norms weighted by ``weights[:, t, k]`` (None:
    1). Built when used (for a sequence there are T x D of them), shaped as the model's output (``shape``)."""

    def __init__(
        self,
        centre: torch.Tensor,
        scale: float,
        keep: torch.Tensor,
        weights: Optional[torch.Tensor],
        shape: tuple,
    ) -> None:
        self.centre, self.scale, self.keep, self.weights, self.shape = centre, scale, keep, weights, shape
        classes = range(centre.shape[2])
        self.positions = [(t, k) for t in range(centre.shape[1]) if keep[:, t].any() for k in classes]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Pass:  # type: ignore[override]
        t, k = self.positions[i]
        v = torch.zeros_like(self.centre)
        v[:, t] = -self.centre[:, t]
        v[:, t, k] += self.scale
        v[:, t] *= self.keep[:, t, None]
        return _as_output(v, self.shape), None if self.weights is None else accumulate(self.weights[:, t, k])

    def __iter__(self) -> Iterator[Pass]:
        return (self[i] for i in range(len(self)))


def _cotangents(
    output: torch.Tensor,
    fisher: str,
    likelihood: str,
    targets: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    noise_std: float,
    mask: Optional[torch.Tensor] = None,
) -> Sequence[Pass]:
    """The backward passes to run, as (v, w): v (shaped as ``output``) is d log p(y_i | x_i) / d output_i for the
    label(s) y_i of this pass, w (N,) weights its per-sample norms (None: 1).

    Per position, categorical (softmax of logits f): d log p_c / df = e_c - softmax(f); ``exact`` runs every position
    t and class c weighted by p_tc: E_y ||sum_t g_t(y_t)||^2 = sum_t E ||g_t(y_t)||^2, since the positions' labels are
    independent and E g_t = 0, so the positions cannot share a pass (T x C passes; C for one position). Gaussian
    N(f, noise_std^2 I): d log p(y) / df = (y - f) / noise_std^2; ``true`` draws y = f + noise_std * eps, so
    v = eps / noise_std; ``exact`` runs every position and output dimension k with v = e_k / noise_std.
    """
    f = _per_position(output.detach().float())  # (N, T, D); the pixels of (N, D, H, W) as T positions
    n, t, d = f.shape
    labels, keep = _positions(f, output.shape, mask, targets if fisher == "empirical" else None,
                              ignore=likelihood == "categorical")

    def one(v: torch.Tensor) -> list[Pass]:
        return [(_as_output(v * keep[..., None], output.shape), None)]

    if likelihood == "categorical":
        probs = f.softmax(-1)
        if fisher == "exact":
            return _PositionPasses(probs, 1.0, keep, probs, output.shape)
        if fisher == "true":
            draw = probs.reshape(n * t, d).cpu()
            draw[~torch.isfinite(draw).all(1)] = 1.0  # non-finite outputs: any label will do, the trace is non-finite
            labels = torch.multinomial(draw, 1, generator=generator).reshape(n, t).to(f.device)
        assert labels is not None  # fisher == "empirical": the targets
        return one((-probs).scatter_add(-1, labels[..., None], torch.ones_like(probs[..., :1])))  # e_y - p
    if fisher == "exact":
        return _PositionPasses(torch.zeros_like(f), 1 / noise_std, keep, None, output.shape)
    if fisher == "empirical":
        assert labels is not None
        return one((labels - f) / noise_std**2)
    eps = torch.randn(n, t, d, generator=generator).to(f.device)
    return one(eps / noise_std)
