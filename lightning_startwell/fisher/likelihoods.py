"""Likelihoods: the model output they accept, and the backward passes (output cotangents) of each Fisher kind.

An output of shape (N, T, D) holds T positions per sample (a language model's tokens), each with its own likelihood
(categorical over D classes, or Gaussian in D dimensions); the log-likelihood of sample i is the sum over its positions
t of log p(y_it | x_i), positions left out by ``mask`` (and, for ``empirical``, by a target of -100) excluded. An output
of shape (N, D) is one position per sample.
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
    """The model output as (N, D) or (N, T, D): logits with C >= 2 classes for ``categorical``; (N,), (N, D) or
    (N, T, D) for ``gaussian``."""
    if isinstance(output, torch.Tensor) and likelihood == "gaussian" and output.ndim == 1 and len(output) == num_inputs:
        return output[:, None]
    ok = isinstance(output, torch.Tensor) and output.ndim in (2, 3) and output.shape[0] == num_inputs
    if not ok or (likelihood == "categorical" and output.shape[-1] < 2):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        categorical = likelihood == "categorical"
        expected = "(N, C) or (N, T, C) logits with C >= 2" if categorical else "(N,), (N, D) or (N, T, D) outputs"
        raise ValueError(f"fisher_trace needs the model to return {expected} for N={num_inputs} inputs, got {shape}.")
    return output


def _positions(
    f: torch.Tensor, shape: torch.Size, mask: Optional[torch.Tensor], targets: Optional[torch.Tensor], ignore: bool
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Targets laid out as (N, T) (categorical) or (N, T, D), and the (N, T) weights of the positions: 0 where
    ``mask`` is 0 or (``ignore``) the target is -100, else 1. ``shape`` is the model's output shape, for messages."""
    n, t, _ = f.shape
    keep = torch.ones(n, t, device=f.device)
    if mask is not None:
        if mask.shape != (n, t) or len(shape) != 3:
            raise ValueError(
                f"`mask` must be (N, T) for (N, T, C) outputs, got a mask of {tuple(mask.shape)} for {tuple(shape)}."
            )
        keep = keep * (mask.to(f.device) != 0)
    if targets is None:
        return None, keep
    targets = targets.to(f.device)
    if ignore:
        if targets.numel() != n * t:
            expected, got = tuple(shape[:-1]), tuple(targets.shape)
            raise ValueError(f"`targets` must hold one label per position, {expected}, got {got}.")
        targets = targets.reshape(n, t).long()
        keep = keep * (targets != IGNORE_INDEX)
        return targets.clamp(min=0), keep
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
        self.index = [(t, k) for t in range(centre.shape[1]) if keep[:, t].any() for k in classes]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Pass:  # type: ignore[override]
        t, k = self.index[i]
        v = torch.zeros_like(self.centre)
        v[:, t] = -self.centre[:, t]
        v[:, t, k] += self.scale
        v[:, t] *= self.keep[:, t, None]
        return v.reshape(self.shape), None if self.weights is None else accumulate(self.weights[:, t, k])

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
    f = output.detach().float()
    f = f[:, None] if f.ndim == 2 else f  # (N, T, D)
    n, t, d = f.shape
    labels, keep = _positions(f, output.shape, mask, targets if fisher == "empirical" else None,
                              ignore=likelihood == "categorical")

    def one(v: torch.Tensor) -> list[Pass]:
        return [((v * keep[..., None]).reshape(output.shape), None)]

    if likelihood == "categorical":
        probs = f.softmax(-1)
        if fisher == "exact":
            return _PositionPasses(probs, 1.0, keep, probs, output.shape)
        if fisher == "true":
            draw = probs.reshape(n * t, d).cpu()
            draw[~torch.isfinite(draw).all(1)] = 1.0  # non-finite outputs: any label will do, the trace is non-finite
            labels = torch.multinomial(draw, 1, generator=generator).reshape(n, t).to(f.device)
        return one((-probs).scatter_add(-1, labels[..., None], torch.ones_like(probs[..., :1])))  # e_y - p
    if fisher == "exact":
        return _PositionPasses(torch.zeros_like(f), 1 / noise_std, keep, None, output.shape)
    if fisher == "empirical":
        return one((labels - f) / noise_std**2)
    eps = torch.randn(n, t, d, generator=generator).to(f.device)
    return one(eps / noise_std)
