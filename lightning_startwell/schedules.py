"""Rate schedules over optimizer steps: standard, early and late dropout (Liu et al. 2023) and the stochastic-depth
layer rule (Huang et al. 2016). Pure functions of the step, so a resumed run recomputes exactly the same rates.

Early dropout uses the rate p until the cutoff and 0 after it; its ``linear`` shape is ``numpy.linspace(p, 0,
cutoff_steps)`` as in the official code (facebookresearch/dropout, ``drop_scheduler.py``), ``cosine`` follows
p (1 + cos(pi t / (cutoff_steps - 1))) / 2 between the same end points. Late dropout is 0 until the cutoff and p after.

:class:`WarmupCosineLR` is the learning-rate side of Liu et al.'s recipe, per epoch: a linear warm-up, then a cosine
decay to 0.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from lightning_startwell._validation import check_choice, check_int, check_rate

Mode = Literal["standard", "early", "late"]
Shape = Literal["constant", "linear", "cosine"]
Rule = Literal["linear", "linspace", "uniform"]
Per = Literal["sample", "batch"]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]
SHAPES: tuple[str, ...] = Shape.__args__  # type: ignore[attr-defined]
RULES: tuple[str, ...] = Rule.__args__  # type: ignore[attr-defined]
PERS: tuple[str, ...] = Per.__args__  # type: ignore[attr-defined]
# Liu et al. (2023) cut off at epoch 50 of 300: the cutoff used when none is given.
DEFAULT_CUTOFF_FRACTION = 50 / 300


def check_schedule(rate_name: str, rate: float, mode: str, shape: str) -> None:
    """Raise a ValueError naming the first argument of a schedule that is not accepted."""
    check_rate(rate_name, rate)
    check_choice("mode", mode, MODES)
    check_choice("shape", shape, SHAPES)
    if mode == "late" and shape != "constant":
        raise ValueError(f"`shape` must be 'constant' for mode 'late' (0, then the rate), got {shape!r}.")


def scheduled_rate(step: int, rate: float, mode: str, shape: str = "constant", cutoff_steps: int = 0) -> float:
    """The rate at optimizer step ``step`` (0-based).

    * ``standard``: ``rate`` at every step;
    * ``early``: for step < ``cutoff_steps``, ``rate`` (``constant``), ``rate (1 - step / (cutoff_steps - 1))``
      (``linear``) or ``rate (1 + cos(pi step / (cutoff_steps - 1))) / 2`` (``cosine``); 0 from the cutoff on;
    * ``late``: 0 for step < ``cutoff_steps``, then ``rate``.
    """
    if mode == "standard":
        return rate
    if mode == "late":
        return 0.0 if step < cutoff_steps else rate
    if step >= cutoff_steps:
        return 0.0
    if shape == "constant" or cutoff_steps == 1:
        return rate
    progress = step / (cutoff_steps - 1)
    if shape == "linear":
        return rate * (1.0 - progress)
    return rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def quantize(value: float, rate: float, levels: Optional[int]) -> float:
    """Round ``value`` in [0, rate] to the nearest of ``levels`` evenly spaced values 0, rate/(levels-1), ..., rate
    (so a compiled model sees at most ``levels`` distinct rates); None leaves it exact."""
    if not levels or rate == 0.0:
        return value
    step = rate / (levels - 1)
    return round(value / step) * step


def resolve_cutoff(
    cutoff_epochs: Optional[int],
    cutoff_steps: Optional[int],
    cutoff_fraction: Optional[float],
    steps_per_epoch: Optional[int],
    total_steps: Optional[int],
) -> int:
    """The cutoff in optimizer steps from one of epochs, steps or a fraction of ``total_steps`` (default
    :data:`DEFAULT_CUTOFF_FRACTION`). A cutoff past ``total_steps`` is returned as it is (see
    :func:`schedule_completes`): a short debug run of a long recipe is a valid run.

    Raises:
        ValueError: naming the cutoff if it needs a length that is unknown (an iterable loader, endless training).
    """
    if cutoff_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("`cutoff_epochs` needs a train loader whose length is known; give `cutoff_steps` instead.")
        return cutoff_epochs * steps_per_epoch
    if cutoff_steps is not None:
        return cutoff_steps
    cutoff_fraction = DEFAULT_CUTOFF_FRACTION if cutoff_fraction is None else cutoff_fraction
    if total_steps is None or not math.isfinite(total_steps):
        raise ValueError("`cutoff_fraction` needs a finite training length: set `max_steps` or `max_epochs`.")
    return round(cutoff_fraction * total_steps)


def schedule_completes(rate: float, mode: str, shape: str, cutoff_steps: int, total_steps: int) -> bool:
    """Whether a run of ``total_steps`` optimizer steps reaches the schedule's final rate (0 for ``early``, ``rate``
    for ``late``) by its last step; ``standard`` always does. False means the run ends before the switch."""
    final = rate if mode != "early" else 0.0
    return total_steps > 0 and scheduled_rate(total_steps - 1, rate, mode, shape, cutoff_steps) == final


def check_cutoff(
    mode: str, cutoff_epochs: Optional[int], cutoff_steps: Optional[int], cutoff_fraction: Optional[float]
) -> None:
    """At most one cutoff for ``early`` / ``late`` (none for ``standard``), non-negative, a fraction in [0, 1].
    With none, callers use :data:`DEFAULT_CUTOFF_FRACTION`."""
    given = {
        name: value
        for name, value in (
            ("cutoff_epochs", cutoff_epochs),
            ("cutoff_steps", cutoff_steps),
            ("cutoff_fraction", cutoff_fraction),
        )
        if value is not None
    }
    if mode == "standard":
        if given:
            raise ValueError(f"mode 'standard' takes no cutoff, got {sorted(given)}.")
        return
    if not given:
        return
    if len(given) > 1:
        raise ValueError(
            f"mode {mode!r} takes one of `cutoff_epochs`, `cutoff_steps`, `cutoff_fraction`, got {sorted(given)}."
        )
    ((name, value),) = given.items()
    if value < 0 or (name == "cutoff_fraction" and value > 1):
        raise ValueError(f"`{name}` must be {'in [0, 1]' if name == 'cutoff_fraction' else '>= 0'}, got {value!r}.")


def block_drop_rates(drop_rate: float, num_blocks: int, rule: str = "linear") -> list[float]:
    """Drop rate of each of ``num_blocks`` residual blocks (1 - survival), block 1 the nearest the input.

    * ``linear``: Huang et al. (2016), p_l = 1 - (l / L)(1 - p_L) for l = 1..L: block l drops with (l / L)
      ``drop_rate``, the last with ``drop_rate`` = 1 - p_L (the input, l = 0, always survives);
    * ``linspace``: ``linspace(0, drop_rate, L)``, block l drops with ((l - 1) / (L - 1)) ``drop_rate``: the first
      block never drops. What Liu et al.'s code (facebookresearch/dropout, ``models/*.py``) and timm
      (``drop_path_rate``) build; a single block gets 0, as ``torch.linspace(0, rate, 1)`` gives;
    * ``uniform``: every block drops with ``drop_rate``.
    """
    check_choice("rule", rule, RULES)
    if rule == "uniform":
        return [drop_rate] * num_blocks
    if rule == "linspace":
        return [drop_rate * block / (num_blocks - 1) if num_blocks > 1 else 0.0 for block in range(num_blocks)]
    return [drop_rate * (block + 1) / num_blocks for block in range(num_blocks)]


def expected_depth(drop_rates: list[float]) -> float:
    """Expected number of residual blocks that run in a training pass: sum_l p_l = sum_l (1 - drop rate_l)."""
    return sum(1.0 - rate for rate in drop_rates)


def warmup_cosine_factor(epoch: int, warmup_epochs: int, max_epochs: int) -> float:
    """The learning-rate factor of epoch ``epoch`` (from 0): ``(epoch + 1) / warmup_epochs`` during the warm-up, then
    ``(1 + cos(pi t / T)) / 2`` with ``t = epoch - warmup_epochs`` and ``T = max_epochs - warmup_epochs`` (1 at the
    first epoch after the warm-up, 0 at epoch ``max_epochs``)."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    decay_epochs = max(max_epochs - warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * min(epoch - warmup_epochs, decay_epochs) / decay_epochs))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 at ``max_epochs`` (:func:`warmup_cosine_factor`),
    stepped once per epoch: the learning rate of epoch e is ``base_lr * warmup_cosine_factor(e, ...)``.

    Args:
        optimizer: the optimizer whose learning rates it sets.
        warmup_epochs: epochs of linear warm-up (0: none).
        max_epochs: the epoch at which the rate reaches 0.

    Example::

        scheduler = WarmupCosineLR(torch.optim.AdamW(model.parameters(), lr=1e-3), warmup_epochs=5, max_epochs=50)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: int = 0, max_epochs: int = 100) -> None:
        check_int("warmup_epochs", warmup_epochs, minimum=0)
        check_int("max_epochs", max_epochs)
        if warmup_epochs >= max_epochs:
            raise ValueError(f"`warmup_epochs` ({warmup_epochs}) must be below `max_epochs` ({max_epochs}).")
        self.warmup_epochs, self.max_epochs = warmup_epochs, max_epochs
        super().__init__(optimizer, self._factor)

    def _factor(self, epoch: int) -> float:
        return warmup_cosine_factor(epoch, self.warmup_epochs, self.max_epochs)


__all__ = [
    "WarmupCosineLR",
    "warmup_cosine_factor",
    "DEFAULT_CUTOFF_FRACTION",
    "PERS",
    "RULES",
    "block_drop_rates",
    "check_cutoff",
    "check_schedule",
    "expected_depth",
    "quantize",
    "resolve_cutoff",
    "schedule_completes",
    "scheduled_rate",
]
