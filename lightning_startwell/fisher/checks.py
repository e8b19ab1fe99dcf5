"""The Fisher kinds, likelihoods and methods accepted, and the check of these arguments."""

from __future__ import annotations

from typing import Literal

from lightning_startwell._validation import check_choice

FisherKind = Literal["true", "empirical", "exact"]
Method = Literal["auto", "vmap"]
Likelihood = Literal["categorical", "gaussian"]
LIKELIHOODS: tuple[str, ...] = Likelihood.__args__  # type: ignore[attr-defined]
FISHERS: tuple[str, ...] = FisherKind.__args__  # type: ignore[attr-defined]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


def check_fisher_arguments(fisher: str, likelihood: str, method: str, noise_std: float) -> None:
    """Raise a ValueError naming the first of these arguments that is not accepted."""
    check_choice("fisher", fisher, FISHERS)
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("method", method, METHODS)
    if not noise_std > 0:
        raise ValueError(f"`noise_std` must be > 0, got {noise_std!r}.")


__all__ = ["FISHERS", "LIKELIHOODS", "METHODS", "FisherKind", "Likelihood", "Method", "check_fisher_arguments"]
