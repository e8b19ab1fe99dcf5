"""GradientDynamicsMonitor: gradient norm, distance from the initial weights, gradient direction variance and error."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell._precision import accumulation_dtype
from lightning_startwell._validation import check_batch_key, check_bool, check_choice, check_int
from lightning_startwell.callbacks._common import (
    BatchKey,
    InputKey,
    InstanceStateKey,
    as_training_batch,
    batch_forward,
    batch_tensor,
    check_input_key,
    input_description,
    listed,
    log_scalars,
    model_inputs,
    random_streams_kept,
    report_attached,
    require_forward,
)
from lightning_startwell.callbacks._strategy import refuse_sharded
from lightning_startwell.dynamics import (
    LOSSES,
    Loss,
    direction_statistics,
    direction_sums,
    gradient_norm,
    parameter_distance,
    probe_gradient,
)

PREFIX = "startwell/dynamics/"


class GradientDynamicsMonitor(InstanceStateKey, Callback):
    r"""Log the gradient dynamics that Liu et al. (2023, Section 3) use to explain why early dropout reduces
    underfitting: with dropout, gradients are smaller, the model travels further, and mini-batch gradients agree
    better with each other and with the gradient of the whole data.

    Logged under ``startwell/dynamics/``, at optimizer step ``t`` (the weights w_t after t steps):

    * ``grad_norm``: ||g_t||_2 of the mini-batch gradient the optimizer receives at step t (after gradient
      accumulation and the DDP all-reduce, after AMP unscaling, before clipping). With ``every_n_epochs``, the mean of
      ||g|| over the optimizer steps since the previous measurement. A non-finite gradient (a step that the GradScaler
      skips under 16-mixed) is left out: not logged at ``every_n_steps``, not counted in the epoch mean.
    * ``grad_norm_skipped``: with each ``grad_norm`` measurement, how many optimizer steps were left out of it for a
      non-finite gradient (0 or 1 at ``every_n_steps``; at ``every_n_epochs``, since the previous measurement).
    * ``distance``: ||w_t - w_0||_2 over the trainable parameters, w_0 taken when training starts (after every
      ``on_fit_start``, so after an initialisation callback); w_0 is kept in the checkpoint, so a resumed run measures
      from the same w_0.
    * ``direction_variance``: on ``num_batches`` probe mini-batches of ``batch_size`` training items drawn once with
      ``seed``, each gradient g_k taken with the modules in their training modes (dropout active, as the optimizer
      sees it), the mean over pairs i < j of (1 - cos(g_i, g_j)) / 2.
    * ``direction_error``: the mean over k of (1 - cos(g_k, g)) / 2, g = (1/K) sum_k g_k the gradient of the whole
      probe set (batch by batch).

    A probe measurement costs ``num_batches`` forward and backward passes, and two float64 vectors of the model's
    size; it never touches ``.grad``, the optimizer, BatchNorm running statistics or the global random streams (the
    probe's dropout masks come from ``seed`` and the step, so a measurement is reproducible), so the training run is
    the same with or without this callback. Under DDP each rank takes its share of the probe batches and the sums
    are all-reduced: the numbers equal a single process's on the same probe. Non-finite values are logged and warned
    about; training goes on.

    Args:
        num_batches: probe mini-batches K (at least 2).
        batch_size: items per probe mini-batch (default: the train loader's batch size).
        every_n_steps: measure at every ``every_n_steps``-th optimizer step (step 0 included).
        every_n_epochs: measure at the start of training and after every ``every_n_epochs`` epochs (at most one of
            the two cadences; with neither, every 50 steps).
        loss: ``cross_entropy`` (class indices) or ``mse``, mean over the mini-batch, for the probe gradients.
        seed: seed of the probe draw and of its dropout masks.
        input_key: what the model is called with (a tuple index or dict key of a batch, or a list of them); not used
            when the LightningModule defines ``startwell_forward(batch)``.
        target_key: where the targets of a batch are: (N,) class indices for (N, C) logits; for a model that predicts
            one class per position, (N, T) for (N, T, C) logits (the target of position t, for a causal language
            model the token at t + 1: Hugging Face's ``labels`` are unshifted) or (N, H, W) for per-pixel (N, C, H, W)
            logits; -100 left out, the loss the mean over the positions kept.
        mask_key: for a model that predicts per position: where the mask of the positions to count is in a batch
            (``"attention_mask"``); 0 leaves a position out.
        measure_directions: also measure the direction variance and error (off: only the norm and the distance,
            at no extra forward pass).

    Example::

        trainer = Trainer(callbacks=[GradientDynamicsMonitor(every_n_steps=20, num_batches=8)])
    """

    state_key_arguments = ("every_n_steps", "every_n_epochs", "loss")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        num_batches: int = 8,
        batch_size: Optional[int] = None,
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        loss: Loss = "cross_entropy",
        seed: int = 0,
        input_key: InputKey = 0,
        target_key: BatchKey = 1,
        mask_key: Optional[BatchKey] = None,
        measure_directions: bool = True,
    ) -> None:
        check_int("num_batches", num_batches, minimum=2)
        if batch_size is not None:
            check_int("batch_size", batch_size)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                "Give at most one of `every_n_steps` and `every_n_epochs`, got"
                f" every_n_steps={every_n_steps!r}, every_n_epochs={every_n_epochs!r}."
            )
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None:
                check_int(name, value)
        check_choice("loss", loss, tuple(LOSSES))
        check_input_key(input_key)
        check_batch_key("target_key", target_key)
        check_batch_key("mask_key", mask_key, optional=True)
        check_bool("measure_directions", measure_directions)
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps if every_n_steps or every_n_epochs else 50
        self.every_n_epochs = every_n_epochs
        self.loss = loss
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.mask_key = mask_key
        self.measure_directions = measure_directions
        self._probe: list[tuple[int, Any]] = []  # (index k, collated batch on the device): this rank's share
        self._probe_count = 0  # K after capping to the data
        self._initial: Optional[dict[str, torch.Tensor]] = None  # w_0, by parameter name
        self._last_step = -1  # the last step measured (distance and directions)
        self._last_norm_step = -1
        self._norm_sum: Optional[torch.Tensor] = None  # sum of ||g|| since the last measurement (epoch cadence)
        self._norm_count = 0
        self._norm_skipped: Optional[torch.Tensor] = None  # steps with a non-finite ||g|| among the _norm_count
        self._warned_non_finite = False
        #: ``(step, direction_error)`` of the latest direction measurement of this fit (None before the first): read
        #: by other callbacks (``CriticalPeriodMonitor(signal="direction_error")``); the same on every DDP rank.
        self.last_direction_error: Optional[tuple[int, float]] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                "GradientDynamicsMonitor",
                "the gradient norm, the distance ||w_t - w_0|| and the probe gradients would be computed on each"
                " rank's shard of the parameters and gradients and never reduced over the shards: wrong numbers with"
                " no error",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_directions:
            require_forward(pl_module, "GradientDynamicsMonitor")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._initial is None:
            if trainer.global_step > 0:
                rank_zero_warn(
                    "GradientDynamicsMonitor: the checkpoint holds no initial weights of this monitor;"
                    f" `distance` is measured from the weights at step {trainer.global_step}, not from the"
                    " initialisation."
                )
            self._initial = {n: p.detach().clone() for n, p in _trainable(pl_module)}
        else:  # loaded from a checkpoint, on the CPU
            self._initial = {n: t.to(pl_module.device) for n, t in self._initial.items()}
        if self.measure_directions:
            self._probe = self._draw_probe(trainer)
        self._report(trainer, pl_module)
        if self.every_n_epochs and trainer.global_step == 0:
            self._measure(trainer, pl_module)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cadence = f"every {self.every_n_steps} steps" if self.every_n_steps else f"every {self.every_n_epochs} epochs"
        facts = {"parameters tracked": listed([n for n, _ in _trainable(pl_module)]), "measured": cadence}
        if self.measure_directions:
            size = self.batch_size or getattr(trainer.train_dataloader, "batch_size", None)
            inputs = input_description(pl_module, self.input_key)
            facts["probe"] = (
                f"{self._probe_count} batches of {size} (seed {self.seed}), {inputs}, targets at"
                f" target_key={self.target_key!r}, {self.loss} loss"
            )
        report_attached(trainer, "startwell/dynamics", "GradientDynamicsMonitor", facts)

    def _draw_probe(self, trainer: pl.Trainer) -> list[tuple[int, Any]]:
        """This rank's probe batches: ``num_batches`` x ``batch_size`` training items drawn with ``seed`` (the same
        draw on every rank), batch k measured on rank k mod world size."""
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError(
                "GradientDynamicsMonitor needs a map-style training dataset (with __len__ and __getitem__)."
            )
        assert loader is not None  # it has a dataset
        size = self.batch_size or getattr(loader, "batch_size", None)
        if not size:
            raise ValueError("GradientDynamicsMonitor: the train loader has no `batch_size`; give `batch_size`.")
        count = min(self.num_batches, len(dataset) // size)
        if trainer.world_size > 1:  # the smallest rank's: the same K, so the same passes, on every rank
            device = trainer.strategy.root_device
            count = int(trainer.strategy.reduce(torch.tensor(count, device=device), reduce_op="min").item())
        if count < self.num_batches and not _trainer.fast_dev_run(trainer):
            rank_zero_warn(
                f"GradientDynamicsMonitor: {len(dataset)} training items hold {count} probe batches of {size},"
                f" not `num_batches`={self.num_batches}."
            )
        self._probe_count = count
        if count < 2:
            rank_zero_warn("GradientDynamicsMonitor: fewer than 2 probe batches; directions are not measured.")
            return []
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        probe = []
        # Every rank takes ceil(K / world size) batches: past K, batch k mod K again, measured and dropped (a filler),
        # so that every rank runs the same forward and backward passes (SyncBatchNorm's are collectives).
        passes = -(-count // trainer.world_size)
        for k in range(trainer.global_rank, passes * trainer.world_size, trainer.world_size):
            # What a training batch goes through (a dataset's augmentation, the transfer hooks), on forked random
            # streams: the training run draws the same numbers as without the monitor.
            with random_streams_kept(trainer.strategy.root_device):
                batch = loader.collate_fn([dataset[int(i)] for i in order[k % count * size : (k % count + 1) * size]])
                batch = as_training_batch(trainer, trainer.lightning_module, batch)
            batch_tensor(batch, self.target_key, "target_key")  # fails now, naming the argument
            if self.mask_key is not None:
                batch_tensor(batch, self.mask_key, "mask_key")
            probe.append((k, batch))
        return probe

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step == self._last_norm_step:
            return
        if self.every_n_steps and step % self.every_n_steps:
            return
        self._last_norm_step = step
        norm = gradient_norm(p.grad for group in optimizer.param_groups for p in group["params"])
        if self.every_n_steps:
            value = norm.item()
            finite = math.isfinite(value)
            if not finite:
                self._warn_skipped(step, 1)
            metrics = {PREFIX + "grad_norm": value} if finite else {}
            self._log(trainer, {**metrics, PREFIX + "grad_norm_skipped": float(not finite)}, step)
            return
        # A non-finite ||g|| (a step the GradScaler skips) adds 0 and is counted as skipped, on the device: no sync.
        is_finite = torch.isfinite(norm)
        kept, skipped = torch.where(is_finite, norm, torch.zeros_like(norm)), (~is_finite).to(norm.dtype)
        self._norm_sum = kept if self._norm_sum is None else self._norm_sum + kept  # on the first parameter's device
        self._norm_skipped = skipped if self._norm_skipped is None else self._norm_skipped + skipped
        self._norm_count += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or self._initial is None:
            return
        self._last_step = step
        named = dict(pl_module.named_parameters())
        distance = parameter_distance([named[n] for n in self._initial], list(self._initial.values()))
        metrics = {PREFIX + "distance": distance.item()}
        if self._norm_count:
            assert self._norm_sum is not None and self._norm_skipped is not None  # set with every count
            total, skipped = torch.stack([self._norm_sum, self._norm_skipped.to(self._norm_sum)]).tolist()  # one read
            kept = self._norm_count - round(skipped)
            if kept:
                metrics[PREFIX + "grad_norm"] = total / kept
            metrics[PREFIX + "grad_norm_skipped"] = float(round(skipped))
            if round(skipped):
                self._warn_skipped(step, round(skipped))
            self._norm_sum, self._norm_skipped, self._norm_count = None, None, 0
        if self._probe_count >= 2:
            metrics.update(self._directions(trainer, pl_module, step))
        self._log(trainer, metrics, step)

    def _directions(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        params = [p for _, p in _trainable(pl_module)]
        forward = batch_forward(pl_module)

        def gradient(k: int, batch: Any) -> torch.Tensor:
            return probe_gradient(
                pl_module,
                model_inputs(batch, self.input_key, pl_module),
                batch_tensor(batch, self.target_key, "target_key"),
                params,
                loss=self.loss,
                forward=forward,
                seed=_probe_seed(self.seed, step, k % self._probe_count),
                mask=None if self.mask_key is None else batch_tensor(batch, self.mask_key, "mask_key"),
            )

        measured = [(k, batch) for k, batch in self._probe if k < self._probe_count]
        sums = direction_sums(gradient(k, batch) for k, batch in measured) if measured else None
        for k, batch in self._probe[len(measured) :]:  # fillers, last on every rank: the same passes, dropped
            gradient(k, batch)
        if sums is None:  # a rank with no probe batch of its own (more ranks than batches) adds zeros
            size = sum(p.numel() for p in params)
            sums = torch.zeros(2, size, dtype=accumulation_dtype(pl_module.device), device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        variance, error = direction_statistics(sums, self._probe_count)
        self.last_direction_error = (step, error)
        return {PREFIX + "direction_variance": variance, PREFIX + "direction_error": error}

    def _warn_skipped(self, step: int, skipped: int) -> None:
        if not self._warned_non_finite:
            rank_zero_warn(
                f"GradientDynamicsMonitor: {skipped} optimizer step(s) up to step {step} had a non-finite gradient"
                " (under 16-mixed, steps the GradScaler skips): left out of `grad_norm`, counted in"
                " `startwell/dynamics/grad_norm_skipped`; training goes on."
            )
            self._warned_non_finite = True

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not all(math.isfinite(v) for v in metrics.values()) and not self._warned_non_finite:
            rank_zero_warn(f"GradientDynamicsMonitor: a non-finite value at step {step} ({metrics}); training goes on.")
            self._warned_non_finite = True
        log_scalars(trainer, metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": {n: t.cpu() for n, t in (self._initial or {}).items()},
            "last_step": self._last_step,
            "last_norm_step": self._last_norm_step,
            "norm_sum": 0.0 if self._norm_sum is None else self._norm_sum.item(),
            "norm_count": self._norm_count,
            "norm_skipped": 0.0 if self._norm_skipped is None else self._norm_skipped.item(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = state_dict["initial"] or None
        self._last_step = state_dict["last_step"]
        self._last_norm_step = state_dict["last_norm_step"]
        self._norm_count = state_dict["norm_count"]
        self._norm_sum = torch.tensor(state_dict["norm_sum"]) if self._norm_count else None
        self._norm_skipped = torch.tensor(state_dict.get("norm_skipped", 0.0)) if self._norm_count else None


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _probe_seed(seed: int, step: int, batch: int) -> int:
    """A seed per (seed, step, probe batch), the same on every rank."""
    return (seed * 1_000_003 + step) * 1_009 + batch
