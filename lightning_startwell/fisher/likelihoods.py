"""Likelihoods: the model output they accept, and the backward passes (output cotangents) of each Fisher kind."""

from __future__ import annotations

from typing import Optional

import torch


def check_output(output: torch.Tensor, num_inputs: int, likelihood: str) -> torch.Tensor:
    """The model output as (N, D): (N, C) logits with C >= 2 for ``categorical``, (N, D) or (N,) for ``gaussian``."""
    if isinstance(output, torch.Tensor) and likelihood == "gaussian" and output.ndim == 1 and len(output) == num_inputs:
        return output[:, None]
    ok = isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[0] == num_inputs
    if not ok or (likelihood == "categorical" and output.shape[1] < 2):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        expected = "(N, C) logits with C >= 2" if likelihood == "categorical" else "(N, D) or (N,) outputs"
        raise ValueError(f"fisher_trace needs the model to return {expected} for N={num_inputs} inputs, got {shape}.")
    return output


def _cotangents(
    output: torch.Tensor,
    fisher: str,
    likelihood: str,
    targets: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    noise_std: float,
) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The backward passes to run, as (v, w): v (N, D) is d log p(y_i | x_i) / d output_i for the label(s) y_i of
    this pass, w (N,) weights its per-sample norms (None: 1).

    Categorical (softmax of logits f): d log p_c / df = e_c - softmax(f); ``exact`` runs every class c weighted by p_c.
    Gaussian N(f, noise_std^2 I): d log p(y) / df = (y - f) / noise_std^2; ``true`` draws y = f + noise_std * eps, so
    v = eps / noise_std; ``exact`` runs every output dimension k with v = e_k / noise_std (tr F = sum_k ||J_k||^2 / s^2).
    """
    f = output.detach().float()
    n, d = f.shape
    eye = torch.eye(d, device=f.device)
    if likelihood == "categorical":
        probs = f.softmax(-1)
        if fisher == "exact":
            return [(eye[c] - probs, probs[:, c].double()) for c in range(d)]
        if fisher == "empirical":
            labels = targets.to(f.device).long()
        else:
            draw = probs.cpu()
            draw[~torch.isfinite(draw).all(1)] = 1.0  # non-finite outputs: any label will do, the trace is non-finite
            labels = torch.multinomial(draw, 1, generator=generator).squeeze(1).to(f.device)
        return [(eye[labels] - probs, None)]
    if fisher == "exact":
        return [(eye[k].expand(n, d) / noise_std, None) for k in range(d)]
    if fisher == "empirical":
        return [((targets.to(f.device).float().reshape(n, d) - f) / noise_std**2, None)]
    eps = torch.randn(n, d, generator=generator).to(f.device)
    return [(eps / noise_std, None)]
