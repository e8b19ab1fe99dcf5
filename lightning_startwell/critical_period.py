"""When does the critical period end? An online rule on a measured signal, and the Fisher-penalty signal (pure
PyTorch, no Lightning).

The rule (:class:`CriticalPeriodRule`, :func:`critical_period_end`) reads a signal measured during training — the
Fisher trace (Achille et al. 2017), its cheap proxy the Fisher penalty (Jastrzebski et al. 2021), the gradient
direction error (Liu et al. 2023) — that rises early and then falls, and declares the end of the critical period once
the fall has lasted. With x_1, x_2, ... the measurements (non-finite ones left out), ``w`` the window, ``f`` the
fraction, ``p`` the patience and ``m`` the minimum number of measurements:

* smoothed: s_i = mean(x_j for max(1, i - w + 1) <= j <= i), a trailing moving average (over the i measurements
  there are while i < w);
* running maximum: M_i = max_{j <= i} s_j;
* below: b_i = [s_i < f M_i] (s_i is then not the maximum: the peak is behind), c_i = c_{i-1} + 1 if b_i else 0;
* the end is the first i with c_i >= p and i >= m.

:func:`fisher_penalty` is Jastrzebski et al.'s estimate on one mini-batch: ||grad_w (1/N) sum_n -log p_w(y_n | x_n)||^2
with y_n ~ p_w(. | x_n) drawn from the model's own predictive distribution. It is the squared norm of the mean
gradient, not the mean of the per-sample squared norms that the trace of the Fisher is: a biased proxy of the trace
(smaller by about the batch size, and it also counts the squared mean of the per-sample gradients), cheap (one
forward and one backward pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from lightning_startwell._precision import accumulate
from lightning_startwell._validation import check_int
from lightning_startwell.dynamics import buffers_kept, mean_loss, seeded_random_streams
from lightning_startwell.model_call import Forward, run


def check_rule_arguments(window: Any, fraction: Any, patience: Any, min_measurements: Any) -> None:
    """Raise a ValueError naming the argument and what is accepted for a bad rule argument."""
    check_int("window", window)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be a number in (0, 1), got {fraction!r}.")
    check_int("patience", patience)
    check_int("min_measurements", min_measurements)


class CriticalPeriodRule:
    """The online end-of-critical-period rule of the module doc: feed it one measurement at a time with
    :meth:`update`; it says when the end is reached, and stays ended.

    Args:
        window: measurements in the trailing moving average (1: no smoothing).
        fraction: the smoothed signal counts as fallen when below ``fraction`` x its running maximum.
        patience: consecutive fallen measurements that end the period.
        min_measurements: the end is never declared before this many measurements.

    Example::

        rule = CriticalPeriodRule(window=1, patience=2, min_measurements=1)
        [rule.update(x) for x in [1.0, 4.0, 1.0, 1.0, 1.0]]  # [False, False, False, True, True]; rule.end_index == 3
    """

    def __init__(self, window: int = 3, fraction: float = 0.5, patience: int = 3, min_measurements: int = 5) -> None:
        check_rule_arguments(window, fraction, patience, min_measurements)
        self.window = window
        self.fraction = float(fraction)
        self.patience = patience
        self.min_measurements = min_measurements
        self.recent: list[float] = []  # the last `window` measurements
        self.count = 0  # measurements seen (finite ones)
        self.smoothed: Optional[float] = None
        self.maximum = -math.inf
        self.below = 0  # consecutive measurements with smoothed < fraction * maximum
        self.end_index: Optional[int] = None  # index (from 0, among the finite measurements) where the period ended

    @property
    def ended(self) -> bool:
        """Whether the end was declared."""
        return self.end_index is not None

    def update(self, value: float) -> bool:
        """Take the next measurement; return whether the period has ended (at this one or before). A non-finite value
        is left out (not counted, the state unchanged)."""
        if not math.isfinite(value):
            return self.ended
        self.recent = [*self.recent, float(value)][-self.window :]
        self.count += 1
        self.smoothed = math.fsum(self.recent) / len(self.recent)
        self.maximum = max(self.maximum, self.smoothed)
        self.below = self.below + 1 if self.smoothed < self.fraction * self.maximum else 0
        if self.end_index is None and self.below >= self.patience and self.count >= self.min_measurements:
            self.end_index = self.count - 1
        return self.ended


def critical_period_end(
    values: Iterable[float], window: int = 3, fraction: float = 0.5, patience: int = 3, min_measurements: int = 5
) -> Optional[int]:
    """The index in ``values`` of the measurement where the rule of the module doc ends the critical period, or None.
    Non-finite values are left out of the rule (their index still counts in the answer)."""
    rule = CriticalPeriodRule(window, fraction, patience, min_measurements)
    for index, value in enumerate(values):
        if not rule.ended and rule.update(value):
            return index
    return None


def smoothed_signal(values: Sequence[float], window: int = 3) -> list[float]:
    """The trailing moving average s_i of the module doc, one per finite value (non-finite values left out)."""
    check_int("window", window)
    kept = [float(v) for v in values if math.isfinite(v)]
    starts = [max(0, i - window + 1) for i in range(len(kept))]
    return [math.fsum(kept[start : i + 1]) / (i + 1 - start) for i, start in enumerate(starts)]


def sample_labels(output: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class indices drawn from softmax(``output``) per sample and position, on the CPU with ``generator``, returned
    on the output's device: (N,) for (N, C) logits, (N, T) for (N, T, C), (N, H, W) for per-pixel (N, C, H, W)."""
    logits = output.detach().float()
    per_pixel = logits.ndim >= 4
    classes = logits.shape[1] if per_pixel else (logits.shape[-1] if logits.ndim >= 2 else 0)
    if classes < 2:  # one "class" has probability 1: the penalty would be 0 whatever the model, a wrong number
        raise ValueError(
            "The Fisher penalty needs class logits with C >= 2 classes, (N, C), (N, T, C) or (N, C, H, W); got"
            f" {tuple(logits.shape)}. A regression output has no categorical likelihood: set `signal` to 'fisher'"
            " with a FisherTraceMonitor(likelihood='gaussian')."
        )
    last = logits.movedim(1, -1) if per_pixel else logits  # the classes on the last dim
    probs = last.reshape(-1, last.shape[-1]).softmax(-1).cpu()
    probs[~torch.isfinite(probs).all(1)] = 1.0  # non-finite logits: any label will do, the penalty is non-finite
    labels = torch.multinomial(probs, 1, generator=generator).reshape(last.shape[:-1])
    return labels.to(output.device)


def fisher_penalty_gradient(
    model: nn.Module,
    inputs: Any,
    parameters: Sequence[torch.Tensor],
    *,
    forward: Optional[Forward] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The gradient, with respect to ``parameters`` (flattened, concatenated in their order, in float64 where the device
    has it), of the mean cross-entropy of ``model`` on ``inputs`` with labels drawn from its own predictive
    distribution (:func:`sample_labels` with ``generator``), the labels held fixed.

    The model runs in the modes its modules are in (a training batch: dropout active), in fp32 (autocast off), with the
    dropout masks drawn from ``seed``. Nothing that training uses is touched: not ``.grad`` (``torch.autograd.grad``),
    not the buffers (BatchNorm running statistics restored), not the global random streams (forked).

    Args:
        model: the model.
        inputs: what the model is called with (see :mod:`lightning_startwell.model_call`).
        parameters: the tensors to differentiate with respect to.
        forward: a function of ``inputs`` that returns the model's output, used instead of calling the model.
        seed: seed of the random streams inside the measurement (dropout masks).
        generator: CPU generator of the label draws.
        mask: for an output with positions, 1 for the positions to count and 0 for those to leave out (padding); the
            mean is over the positions kept.
    """
    device = parameters[0].device if parameters else torch.device("cpu")
    with buffers_kept(model), seeded_random_streams(device, seed), torch.enable_grad():
        with torch.autocast(device_type=device.type, enabled=False):
            output = run(model, inputs, forward).float()
            value = mean_loss("cross_entropy", output, sample_labels(output, generator), mask)
        grads = torch.autograd.grad(value, list(parameters), allow_unused=True)
    return torch.cat(
        [
            accumulate((g if g is not None else torch.zeros_like(p)).detach().reshape(-1))
            for g, p in zip(grads, parameters, strict=True)
        ]
    )


def fisher_penalty(
    model: nn.Module,
    inputs: Any,
    parameters: Optional[Sequence[torch.Tensor]] = None,
    *,
    forward: Optional[Forward] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    mask: Optional[torch.Tensor] = None,
) -> float:
    """Jastrzebski et al. (2021)'s Fisher penalty on one mini-batch: the squared norm of
    :func:`fisher_penalty_gradient` (``parameters``: the model's trainable ones by default). A biased proxy of the
    Fisher trace: the norm of the mean gradient, not the mean of the per-sample norms (see the module doc).

    Example::

        generator = torch.Generator().manual_seed(0)
        value = fisher_penalty(model, x, generator=generator)
    """
    if parameters is None:
        parameters = [p for p in model.parameters() if p.requires_grad]
    gradient = fisher_penalty_gradient(
        model, inputs, parameters, forward=forward, seed=seed, generator=generator, mask=mask
    )
    return float(gradient.dot(gradient).item())


__all__ = [
    "CriticalPeriodRule",
    "check_rule_arguments",
    "critical_period_end",
    "fisher_penalty",
    "fisher_penalty_gradient",
    "sample_labels",
    "smoothed_signal",
]
