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

:func:`gradient_confusion` is the signal of Fukase et al. (2025, arXiv 2506.15954; code baunilhamarga/critical-periods,
``utils/custom_functions.py::calculate_pairwise_cosine_similarity`` with ``mode='max'``): over K mini-batch gradients
g_1..g_K, the largest pairwise cosine similarity, max_{i<j} <g_i, g_j> / (||g_i|| ||g_j||). Their rule
(:class:`OutlierRule`, ``utils/custom_callbacks.py::GradientConfusion`` with ``utils/custom_functions.py::is_outlier``,
``mode='low'``) ends the period when a measurement is a low outlier of the earlier ones: with x_1, x_2, ... the
measurements, ``c`` the check interval and ``t`` the threshold, at every n with n % c == 0 and n >= 3, on the baseline
B = (x_1, ..., x_{n-2}) (their code leaves out the measurement just before x_n as well as x_n), with Q1, Q3 its
quartiles (linear interpolation, as pandas and NumPy's default):

* end at the first such n with x_n < Q1(B) - t (Q3(B) - Q1(B)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_startwell._precision import accumulate
from lightning_startwell._validation import check_int
from lightning_startwell.dynamics import buffers_kept, mean_loss, probe_gradient, seeded_random_streams
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


def check_outlier_arguments(check_interval: Any, outlier_threshold: Any) -> None:
    """Raise a ValueError naming the argument and what is accepted for a bad :class:`OutlierRule` argument."""
    check_int("check_interval", check_interval)
    if (
        isinstance(outlier_threshold, bool)
        or not isinstance(outlier_threshold, (int, float))
        or not math.isfinite(outlier_threshold)
        or outlier_threshold < 0
    ):
        raise ValueError(f"`outlier_threshold` must be a finite number >= 0, got {outlier_threshold!r}.")


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between the sorted values (pandas' and NumPy's
    default): at position q (n - 1) of the sorted values."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


class OutlierRule:
    """Fukase et al.'s end-of-critical-period rule (module doc): every ``check_interval`` measurements, the period
    ends when the measurement is below Q1 - ``outlier_threshold`` x IQR of the baseline, all the measurements before
    it but the last one. Feed it one measurement at a time with :meth:`update`; it stays ended. A non-finite value is
    left out (not counted, the state unchanged).

    Args:
        check_interval: check at every ``check_interval``-th measurement (their ``initial_distribution_size``, 10).
        outlier_threshold: the IQR multiplier of the lower bound (their ``threshold``, 1.5).

    Example::

        rule = OutlierRule(check_interval=5, outlier_threshold=1.5)
        [rule.update(x) for x in [0.9, 0.8, 0.9, 0.8, 0.1]]  # [False, False, False, False, True]; rule.end_index == 4
    """

    def __init__(self, check_interval: int = 10, outlier_threshold: float = 1.5) -> None:
        check_outlier_arguments(check_interval, outlier_threshold)
        self.check_interval = check_interval
        self.outlier_threshold = float(outlier_threshold)
        self.values: list[float] = []  # the finite measurements so far
        #: The lower bound Q1 - t IQR of the latest measurement's check, None when that measurement was not checked.
        self.lower_bound: Optional[float] = None
        self.end_index: Optional[int] = None  # index (from 0, among the finite measurements) where the period ended

    @property
    def ended(self) -> bool:
        """Whether the end was declared."""
        return self.end_index is not None

    def update(self, value: float) -> bool:
        """Take the next measurement; return whether the period has ended (at this one or before)."""
        if not math.isfinite(value):
            return self.ended
        count = len(self.values) + 1  # n, this measurement's number from 1
        self.lower_bound = None
        if count % self.check_interval == 0 and count - 1 > 1:  # their `len(history) > 1`, history[:-1] the baseline
            baseline = self.values[:-1]
            q1, q3 = quantile(baseline, 0.25), quantile(baseline, 0.75)
            self.lower_bound = q1 - self.outlier_threshold * (q3 - q1)
            if self.end_index is None and value < self.lower_bound:
                self.end_index = count - 1
        self.values.append(float(value))
        return self.ended


def outlier_end(values: Iterable[float], check_interval: int = 10, outlier_threshold: float = 1.5) -> Optional[int]:
    """The index in ``values`` of the measurement where :class:`OutlierRule` ends the critical period, or None.
    Non-finite values are left out of the rule (their index still counts in the answer)."""
    rule = OutlierRule(check_interval, outlier_threshold)
    for index, value in enumerate(values):
        if not rule.ended and rule.update(value):
            return index
    return None


def gradient_confusion(gradients: Union[torch.Tensor, Sequence[torch.Tensor]]) -> float:
    """Fukase et al.'s gradient confusion of K >= 2 gradients (a (K, P) tensor or K tensors, flattened): the
    largest pairwise cosine similarity,

        GC = max_{i < j} <g_i, g_j> / (||g_i|| ||g_j||),

    in [-1, 1], computed in float64 (float32 on a device without it) from the Gram matrix. It is their code's
    ``calculate_pairwise_cosine_similarity(mode='max')`` (``1 - scipy.spatial.distance.cosine``): normalised, and the
    maximum, where Sankararaman et al. (2020)'s gradient confusion eta is the most negative raw inner product,
    <g_i, g_j> >= -eta for all i != j. Two opposite gradients give -1, two of one direction 1. A pair with a zero
    gradient has no cosine and is left out (their loop skips its NaN); with no pair left the value is NaN.
    """
    stacked = gradients if isinstance(gradients, torch.Tensor) else torch.stack([g.reshape(-1) for g in gradients])
    stacked = accumulate(stacked.detach().reshape(stacked.shape[0], -1))
    if stacked.shape[0] < 2:
        raise ValueError(f"`gradients` must hold at least 2 gradients (pairs), got {stacked.shape[0]}.")
    norms = torch.linalg.vector_norm(stacked, dim=1)
    cosines = (stacked @ stacked.T) / (norms[:, None] * norms[None, :])
    upper = torch.triu(torch.ones_like(cosines, dtype=torch.bool), diagonal=1)
    pairs = cosines[upper & (norms[:, None] > 0) & (norms[None, :] > 0)]
    return float(pairs.max().item()) if pairs.numel() else math.nan


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Inside, every module of ``model`` is in evaluation mode; on exit each is back in the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def confusion_gradients(
    model: nn.Module,
    batches: Sequence[tuple[Any, torch.Tensor, Optional[torch.Tensor]]],
    parameters: Sequence[torch.Tensor],
    *,
    forward: Optional[Forward] = None,
) -> torch.Tensor:
    """The K gradients of :func:`gradient_confusion`, a (K, P) tensor: row k the gradient, with respect to
    ``parameters`` (flattened, concatenated), of the mean cross-entropy on ``batches[k] = (inputs, targets, mask)``
    (:func:`lightning_startwell.dynamics.probe_gradient`; ``mask`` None or the positions to count). The model runs in
    evaluation mode, as Fukase et al.'s Keras ``model(x)`` (dropout off, BatchNorm on its running statistics; each
    module's mode restored), in fp32; ``.grad``, the buffers and the global random streams are untouched."""
    with eval_mode(model):
        rows = [
            probe_gradient(model, inputs, targets, parameters, forward=forward, mask=mask)
            for inputs, targets, mask in batches
        ]
    return torch.stack(rows)


__all__ = [
    "CriticalPeriodRule",
    "OutlierRule",
    "check_outlier_arguments",
    "check_rule_arguments",
    "confusion_gradients",
    "critical_period_end",
    "eval_mode",
    "fisher_penalty",
    "fisher_penalty_gradient",
    "gradient_confusion",
    "outlier_end",
    "quantile",
    "sample_labels",
    "smoothed_signal",
]
