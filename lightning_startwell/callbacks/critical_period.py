"""CriticalPeriodMonitor: estimate online when the critical period ends, from a signal measured during training."""

from __future__ import annotations

import math
import random
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell._precision import accumulation_dtype
from lightning_startwell._validation import check_batch_key, check_choice, check_int
from lightning_startwell.callbacks._common import (
    BatchKey,
    InputKey,
    InstanceStateKey,
    as_training_batch,
    batch_forward,
    batch_tensor,
    check_input_key,
    input_description,
    log_scalars,
    model_inputs,
    random_streams_kept,
    report_attached,
    require_forward,
)
from lightning_startwell.callbacks._strategy import refuse_sharded
from lightning_startwell.callbacks.fisher_monitor import FisherTraceMonitor
from lightning_startwell.callbacks.gradient_dynamics import GradientDynamicsMonitor
from lightning_startwell.critical_period import (
    CriticalPeriodRule,
    OutlierRule,
    check_outlier_arguments,
    check_rule_arguments,
    confusion_gradients,
    fisher_penalty_gradient,
    gradient_confusion,
)
from lightning_startwell.dynamics import seeded_random_streams

PREFIX = "startwell/critical_period/"

Signal = Literal["fisher", "fisher_penalty", "direction_error", "gradient_confusion"]
SIGNALS = ("fisher", "fisher_penalty", "direction_error", "gradient_confusion")
MEASURED = ("fisher_penalty", "gradient_confusion")  # the signals this callback measures itself
Source = Union[FisherTraceMonitor, GradientDynamicsMonitor]


class CriticalPeriodMonitor(InstanceStateKey, Callback):
    r"""Estimate online when the critical period ends: follow a signal that rises early in training and then falls
    (the Fisher trace of Achille et al. 2017, its cheap proxy the Fisher penalty of Jastrzebski et al. 2021, or the
    gradient direction error of Liu et al. 2023), and declare the end once the smoothed signal has stayed below
    ``fraction`` x its running maximum for ``patience`` measurements in a row (the peak rule of
    :mod:`lightning_startwell.critical_period`); or follow the gradient confusion of Fukase et al. 2025 with their
    rule, the end at the first low outlier (every ``check_interval`` measurements, below Q1 - ``outlier_threshold`` x
    IQR of the earlier ones). A schedule that regularises only during the critical period (Golatkar et al. 2019) reads
    :attr:`end_step`.

    Signals:

    * ``fisher_penalty`` (default): measured by this callback at every ``every_n_steps``-th optimizer step (step 0
      included), before the step, on that step's training batch: the squared norm of the gradient of the mean
      cross-entropy with labels drawn from the model's own softmax (one extra forward and backward pass). It is the
      norm of the mean gradient, a biased proxy of the Fisher trace, not the trace. Under DDP the per-rank gradients
      are averaged (all-reduced) before the norm, so every rank gets the same number. The pass runs in the modules'
      training modes, in fp32, with ``torch.autograd.grad`` (``.grad`` untouched), BatchNorm buffers restored, the
      dropout masks and labels drawn from ``seed``, the step and the rank on forked random streams: the training run is
      the same with or without the monitor.
    * ``fisher``: the ``startwell/fisher/trace`` that a :class:`FisherTraceMonitor` of the same Trainer measures (its
      cadence; the first one found); refused at fit start without one.
    * ``direction_error``: the ``startwell/dynamics/direction_error`` that a :class:`GradientDynamicsMonitor` (with
      ``measure_directions``) of the same Trainer measures; refused at fit start without one.
    * ``gradient_confusion``: measured by this callback at every ``every_n_steps``-th optimizer step (step 0
      included), before the step, on a fixed probe: ``num_chunks`` mini-batches of ``chunk_size`` training items
      (default: the loader's batch size // ``num_chunks``, so one training batch's worth), drawn once with ``seed``
      and kept, as Fukase et al. measure on a fixed set (their whole training set in batches of 32, once per epoch).
      The value is the largest cosine similarity between two of the chunks' gradients of the mean cross-entropy with
      the true targets (at ``target_key``), the model in evaluation mode as in their Keras code
      (:func:`lightning_startwell.critical_period.gradient_confusion`). Its rule is theirs, not the peak rule. Under
      DDP every rank measures the same probe and the ranks' values are averaged.

    Logged under ``startwell/critical_period/`` at the step of each measurement: ``signal``, ``smoothed`` (peak rule)
    or ``lower_bound`` (outlier rule, at the measurements it checks), ``ended`` (0 or 1), and ``end_step`` once, when
    the end is declared. The history of measurements and the end step are kept in the checkpoint: a resumed run goes on
    from them (after the end, it keeps the end step). A run that ends before the end is declared warns and logs
    ``ended`` 0 at its last step. The decision is the same on every DDP rank (the four signals are reduced values).

    Args:
        signal: ``fisher_penalty``, ``fisher``, ``direction_error`` or ``gradient_confusion``.
        every_n_steps: ``fisher_penalty`` and ``gradient_confusion``: measure at every ``every_n_steps``-th optimizer
            step (30: 1.01x a training step on ResNet-18 for ``fisher_penalty``, measured; 1.13x at 10).
        window: peak rule: measurements in the trailing moving average.
        fraction: peak rule: fallen when the smoothed signal is below ``fraction`` x its running maximum, in (0, 1).
        patience: peak rule: consecutive fallen measurements that end the period.
        min_measurements: peak rule: the end is never declared before this many measurements.
        check_interval: outlier rule (``gradient_confusion``): check at every ``check_interval``-th measurement, on
            the measurements before it but the last (Fukase et al.'s ``initial_distribution_size``, 10).
        outlier_threshold: outlier rule: the IQR multiplier of the lower bound Q1 - t IQR (their ``threshold``, 1.5).
        num_chunks: ``gradient_confusion``: K, the probe's mini-batches (gradients compared in pairs), >= 2.
        chunk_size: ``gradient_confusion``: training items per probe mini-batch; None: the train loader's batch size
            // ``num_chunks``.
        seed: ``fisher_penalty``: seed of the label draws and dropout masks; ``gradient_confusion``: of the probe draw
            (the items and their augmentation).
        input_key: ``fisher_penalty``, ``gradient_confusion``: what the model is called with (a tuple index or dict
            key of a batch, or a list of them); not used when the LightningModule defines ``startwell_forward(batch)``.
        target_key: ``gradient_confusion``: where the class indices are in a batch.
        mask_key: ``fisher_penalty``, ``gradient_confusion``, for a model that predicts one class per position
            ((N, T, C) logits): where the mask of the positions to count is in a batch (``"attention_mask"``); 0 leaves
            a position out.

    Example::

        monitor = CriticalPeriodMonitor(signal="fisher_penalty", every_n_steps=20)
        # or: CriticalPeriodMonitor(signal="gradient_confusion", check_interval=10, outlier_threshold=1.5)
        trainer = Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        monitor.end_step  # the optimizer step where the critical period was declared over, or None
    """

    state_key_arguments = ("signal",)  # tells two instances apart in a checkpoint

    def __init__(
        self,
        signal: Signal = "fisher_penalty",
        every_n_steps: int = 30,
        window: int = 3,
        fraction: float = 0.5,
        patience: int = 3,
        min_measurements: int = 5,
        check_interval: int = 10,
        outlier_threshold: float = 1.5,
        num_chunks: int = 4,
        chunk_size: Optional[int] = None,
        seed: int = 0,
        input_key: InputKey = 0,
        target_key: BatchKey = 1,
        mask_key: Optional[BatchKey] = None,
    ) -> None:
        check_choice("signal", signal, SIGNALS)
        check_int("every_n_steps", every_n_steps)
        check_rule_arguments(window, fraction, patience, min_measurements)
        check_outlier_arguments(check_interval, outlier_threshold)
        check_int("num_chunks", num_chunks, minimum=2)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size)
        check_int("seed", seed, minimum=0)
        check_input_key(input_key)
        check_batch_key("target_key", target_key)
        check_batch_key("mask_key", mask_key, optional=True)
        self.signal = signal
        self.every_n_steps = every_n_steps
        self.window = window
        self.fraction = fraction
        self.patience = patience
        self.min_measurements = min_measurements
        self.check_interval = check_interval
        self.outlier_threshold = outlier_threshold
        self.num_chunks = num_chunks
        self.chunk_size = chunk_size
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.mask_key = mask_key
        self._probe: list[tuple[Any, torch.Tensor, Optional[torch.Tensor]]] = []  # gradient_confusion's mini-batches
        #: The global step of the measurement at which the end of the critical period was declared; None before.
        self.end_step: Optional[int] = None
        self._history: list[tuple[int, float]] = []  # (step, signal) of every measurement
        self._rule = self._new_rule()
        self._last_step = -1  # the step of the latest measurement taken in
        self._source: Optional[Source] = None
        self._trainer: Optional[pl.Trainer] = None  # between setup and teardown: a checkpoint takes pending values in
        self._warned_non_finite = False

    @property
    def ended(self) -> bool:
        """Whether the end of the critical period was declared."""
        return self.end_step is not None

    @property
    def history(self) -> list[tuple[int, float]]:
        """``(step, signal)`` of every measurement so far (a copy)."""
        return list(self._history)

    def _new_rule(self) -> Union[CriticalPeriodRule, OutlierRule]:
        if self.signal == "gradient_confusion":
            return OutlierRule(self.check_interval, self.outlier_threshold)
        return CriticalPeriodRule(self.window, self.fraction, self.patience, self.min_measurements)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(
            trainer,
            "CriticalPeriodMonitor",
            "the Fisher penalty's and the gradient confusion's gradients would be shards of each rank's parameters,"
            " their norms and inner products never reduced over the shards: a wrong signal with no error",
        )
        self._source = self._find_source(trainer)
        self._trainer = trainer

    def _find_source(self, trainer: pl.Trainer) -> Optional[Source]:
        if self.signal in MEASURED:
            return None
        callbacks = _trainer.callbacks(trainer)
        if self.signal == "fisher":
            found: list[Source] = [c for c in callbacks if isinstance(c, FisherTraceMonitor)]
            if not found:
                raise ValueError(
                    "CriticalPeriodMonitor(signal='fisher') reads the trace of a FisherTraceMonitor, and the Trainer"
                    " has none: add `FisherTraceMonitor(...)` to `callbacks`, or use `signal='fisher_penalty'`."
                )
            return found[0]
        found = [c for c in callbacks if isinstance(c, GradientDynamicsMonitor)]
        if not found:
            raise ValueError(
                "CriticalPeriodMonitor(signal='direction_error') reads the direction error of a"
                " GradientDynamicsMonitor, and the Trainer has none: add `GradientDynamicsMonitor(...)` to"
                " `callbacks`, or use `signal='fisher_penalty'`."
            )
        with_directions = [c for c in found if isinstance(c, GradientDynamicsMonitor) and c.measure_directions]
        if not with_directions:
            raise ValueError(
                "CriticalPeriodMonitor(signal='direction_error'): the GradientDynamicsMonitor has"
                " `measure_directions=False` and never measures the direction error; set it to True."
            )
        return with_directions[0]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signal in MEASURED:
            require_forward(pl_module, f"CriticalPeriodMonitor(signal={self.signal!r})")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signal == "fisher_penalty":
            measured = f"Fisher penalty on the training batch every {self.every_n_steps} steps, " + input_description(
                pl_module, self.input_key
            )
            if self.mask_key is not None:
                measured += f", positions masked by mask_key={self.mask_key!r}"
        elif self.signal == "gradient_confusion":
            self._probe = self._draw_probe(trainer)
            size = len(self._probe[0][1]) if self._probe else 0
            measured = (
                f"gradient confusion (largest pairwise cosine) of {len(self._probe)} fixed probe mini-batches of"
                f" {size} (seed {self.seed}), evaluation mode, every {self.every_n_steps} steps, "
                + input_description(pl_module, self.input_key)
                + f", targets at target_key={self.target_key!r}"
            )
        else:
            assert self._source is not None  # found in setup
            measured = f"{self.signal} of {self._source.state_key}"
        rule = (
            f"end when the mean of the last {self.window} measurements stays below {self.fraction} x its running"
            f" maximum for {self.patience} measurements, after at least {self.min_measurements}"
        )
        if self.signal == "gradient_confusion":
            rule = (
                f"end at the first low outlier: every {self.check_interval} measurements, below Q1 -"
                f" {self.outlier_threshold} x IQR of the measurements before it but the last (Fukase et al. 2025)"
            )
        facts = {"signal": measured, "rule": rule}
        if self.end_step is not None:
            facts["resumed"] = f"the end was declared at step {self.end_step}"
        report_attached(trainer, PREFIX.rstrip("/"), "CriticalPeriodMonitor", facts)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.signal in MEASURED:
            if step % self.every_n_steps == 0 and step > self._last_step:
                if self.signal == "fisher_penalty":
                    value = self._fisher_penalty(trainer, pl_module, batch, step)
                else:
                    value = self._gradient_confusion(trainer, pl_module)
                self._take(trainer, step, value)
        else:
            self._poll(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._poll(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._poll(trainer)
        if self.end_step is not None:
            return
        if not _trainer.fast_dev_run(trainer):
            rank_zero_warn(
                f"CriticalPeriodMonitor: training ended at step {trainer.global_step} before the end of the critical"
                f" period was detected ({len(self._history)} measurements of `{self.signal}`); `end_step` is None."
            )
        if self._last_step != trainer.global_step:  # the last measurement logged `ended` 0 at that step already
            log_scalars(trainer, {PREFIX + "ended": 0.0}, step=trainer.global_step)

    def _fisher_penalty(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> float:
        """The Fisher penalty on ``batch``: this rank's gradient, averaged over the ranks, squared norm."""
        gradient = self._local_gradient(trainer, pl_module, batch, step)
        if trainer.world_size > 1:  # the mean of the ranks' gradients, as DDP's: the same vector on every rank
            gradient = trainer.strategy.reduce(gradient, reduce_op="sum") / trainer.world_size
        return float(gradient.dot(gradient).item())

    def _local_gradient(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int
    ) -> torch.Tensor:
        """This rank's Fisher-penalty gradient on its training batch (labels and dropout masks drawn from ``seed``, the
        step and the rank)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        label_seed = penalty_seed(self.seed, step, trainer.global_rank)
        return fisher_penalty_gradient(
            pl_module,
            model_inputs(batch, self.input_key, pl_module),
            params,
            forward=batch_forward(pl_module),
            seed=label_seed + 2**31,  # dropout masks, apart from the label draws
            generator=torch.Generator().manual_seed(label_seed),
            mask=None if self.mask_key is None else batch_tensor(batch, self.mask_key, "mask_key"),
        )

    def _draw_probe(self, trainer: pl.Trainer) -> list[tuple[Any, torch.Tensor, Optional[torch.Tensor]]]:
        """``gradient_confusion``'s fixed probe: ``num_chunks`` mini-batches of ``chunk_size`` training items drawn
        with ``seed`` (the same items and augmentations on every rank and after a resume), as ``training_step`` gets
        them, as (inputs, targets, mask); the training run's random streams untouched."""
        who = "CriticalPeriodMonitor(signal='gradient_confusion')"
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(f"{who} draws its probe from a map-style training dataset (with __len__ and __getitem__).")
        assert loader is not None  # it has a dataset
        size = self.chunk_size or (getattr(loader, "batch_size", None) or 0) // self.num_chunks
        if not size:
            raise ValueError(
                f"{who}: the train loader's batch size ({getattr(loader, 'batch_size', None)}) gives no item per"
                f" chunk for `num_chunks`={self.num_chunks}; give `chunk_size`."
            )
        if self.num_chunks * size > len(dataset):
            raise ValueError(
                f"{who}: `num_chunks` x `chunk_size` = {self.num_chunks} x {size} items, more than the"
                f" {len(dataset)} of the training dataset."
            )
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        pl_module = trainer.lightning_module
        device = trainer.strategy.root_device
        probe = []
        with random_streams_kept(device), seeded_random_streams(device, self.seed):
            random.seed(self.seed)
            np.random.seed(self.seed)
            for k in range(self.num_chunks):
                batch = loader.collate_fn([dataset[int(i)] for i in order[k * size : (k + 1) * size]])
                batch = as_training_batch(trainer, pl_module, batch)
                mask = None if self.mask_key is None else batch_tensor(batch, self.mask_key, "mask_key")
                targets = batch_tensor(batch, self.target_key, "target_key")
                probe.append((model_inputs(batch, self.input_key, pl_module), targets, mask))
        return probe

    def _gradient_confusion(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The gradient confusion of the probe's mini-batches; under DDP the mean of the ranks' values (each rank
        measures the same probe: the same number up to rounding, then exactly the same)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        gradients = confusion_gradients(pl_module, self._probe, params, forward=batch_forward(pl_module))
        value = gradient_confusion(gradients)
        if trainer.world_size > 1:
            total = torch.tensor(value, dtype=accumulation_dtype(pl_module.device), device=pl_module.device)
            value = float(trainer.strategy.reduce(total, reduce_op="sum").item()) / trainer.world_size
        return value

    def _poll(self, trainer: pl.Trainer) -> None:
        """Take in the source callback's latest measurement, if it is new."""
        source = self._source
        latest: Optional[tuple[int, float]] = None
        if isinstance(source, FisherTraceMonitor):
            latest = source.last_trace
        elif isinstance(source, GradientDynamicsMonitor):
            latest = source.last_direction_error
        if latest is not None and latest[0] > self._last_step:
            self._take(trainer, *latest)

    def _take(self, trainer: pl.Trainer, step: int, value: float) -> None:
        """One measurement of the signal at ``step``: into the history and the rule, then logged."""
        self._last_step = step
        self._history.append((step, value))
        already = self._rule.ended
        self._rule.update(value)
        metrics = {PREFIX + "signal": value}
        if not math.isfinite(value) and not self._warned_non_finite:
            self._warned_non_finite = True
            rank_zero_warn(
                f"CriticalPeriodMonitor: the {self.signal} signal at step {step} is {value}; left out of the rule,"
                " training goes on (said once)."
            )
        rule = self._rule
        if math.isfinite(value):  # a left-out value changes nothing: not logged
            if isinstance(rule, CriticalPeriodRule) and rule.smoothed is not None:
                metrics[PREFIX + "smoothed"] = rule.smoothed
            elif isinstance(rule, OutlierRule) and rule.lower_bound is not None:
                metrics[PREFIX + "lower_bound"] = rule.lower_bound
        if self._rule.ended and not already and self.end_step is None:
            self.end_step = step
            metrics[PREFIX + "end_step"] = float(step)
        metrics[PREFIX + "ended"] = float(self.end_step is not None)
        log_scalars(trainer, metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None:  # a source measurement this callback has not taken in yet goes in the checkpoint
            self._poll(self._trainer)
        return {"history": [list(item) for item in self._history], "end_step": self.end_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [(int(step), float(value)) for step, value in state_dict["history"]]
        self._rule = self._new_rule()
        end_index = None
        for index, (_, value) in enumerate(self._history):  # the rule's state, as if the run had not stopped
            if self._rule.update(value) and end_index is None:
                end_index = index
        saved = state_dict["end_step"]
        self.end_step = saved if saved is not None else (None if end_index is None else self._history[end_index][0])
        self._last_step = self._history[-1][0] if self._history else -1


def penalty_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the Fisher penalty's label draws at ``step`` on ``rank`` (its dropout masks: this + 2**31)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def find_critical_period_monitor(trainer: pl.Trainer) -> Optional[CriticalPeriodMonitor]:
    """The first :class:`CriticalPeriodMonitor` among the trainer's callbacks, or None (for a schedule that switches
    at the end of the critical period)."""
    for callback in _trainer.callbacks(trainer):
        if isinstance(callback, CriticalPeriodMonitor):
            return callback
    return None


__all__ = ["CriticalPeriodMonitor", "find_critical_period_monitor"]
