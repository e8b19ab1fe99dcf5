"""FisherTraceMonitor: the trace of the Fisher information, total and per layer, over training."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

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
    has_tensor,
    input_description,
    listed,
    log_image,
    log_scalars,
    model_inputs,
    random_streams_kept,
    replace_tensor,
    report_attached,
    require_forward,
    run_length,
    tensorboard_experiments,
)
from lightning_startwell.callbacks._strategy import refuse_sharded
from lightning_startwell.callbacks.deficit_injector import DeficitInjector
from lightning_startwell.figures import fisher_heatmap, spread_over_steps
from lightning_startwell.fisher import (
    FisherKind,
    Likelihood,
    Method,
    check_fisher_arguments,
    fisher_trace_sums,
    layer_order,
    owned_parameters,
)
from lightning_startwell.fisher.trace import _measurement_mode
from lightning_startwell.model_call import run, select

#: The heatmap keeps between this many and twice this many measurements (columns): past twice, the history is thinned
#: to this many, evenly spread over the steps measured (the first and the latest kept).
MAX_HEATMAP_COLUMNS = 128


class FisherTraceMonitor(InstanceStateKey, Callback):
    r"""Log the trace of the Fisher information on a fixed probe set: at the start of training (the initialisation),
    then every ``every_n_steps`` optimizer steps or every ``every_n_epochs`` epochs.

    Achille et al. (2017) read critical learning periods off this curve: it rises fast early (the network takes in
    information), then falls (it forgets what it does not need); its split per layer shows where that happens.

    The probe set is ``num_samples`` training examples drawn once with ``seed`` (so the curve is comparable over time),
    passed once through what a training batch goes through (the precision plugin's ``convert_input``, the module's
    ``on_before_batch_transfer``, the strategy's ``batch_to_device`` and ``on_after_batch_transfer``: on-device
    normalisation applies), on forked random streams (torch, numpy, Python: a randomly augmenting dataset leaves the
    training run as it would be without the monitor), and measured by
    :func:`~lightning_startwell.fisher.fisher_trace_sums` in batches of ``batch_size``: exact per-sample gradient norms,
    in eval mode, fp32, without touching ``.grad``, the model's mode restored. Under DDP every rank takes its share of
    the probe set (the same draw on every rank, split by rank) and the per-layer sums and counts are all-reduced, so the
    number equals a single process's on the same samples. The ``true`` Fisher's label draws use a generator seeded from
    ``seed`` and the step, so a measurement is reproducible.

    ``probe="clean"`` (the default) measures every time on the same clean examples: the curve follows the network
    alone, on the distribution it is finally judged on. ``probe="training"`` passes the probe through the
    :class:`DeficitInjector` callbacks active in the epoch of the measurement (the epoch just trained, or epoch 0 at the
    initialisation), so the trace is measured on the distribution the network is trained on at that moment — blurred
    inputs during a blur — as in Achille et al. (2017), whose Fisher is an expectation over the training data. The
    noise of ``noise`` and ``deprivation`` is drawn from ``seed`` and the step; ``label_permutation`` changes only the
    ``empirical`` Fisher (the other kinds draw their labels from the model). Without an injector in the trainer the two
    settings agree, and ``training`` warns once.

    Logs ``startwell/fisher/trace`` and ``startwell/fisher/layer/<module>`` (the part of the trace carried by that
    module's parameters; they add up to the total), and, in TensorBoard, a custom-scalars chart ("startwell" tab,
    "Fisher trace per layer") with all layer curves on one plot. With ``log_images``, TensorBoard also gets, at every
    measurement, the picture ``startwell/fisher/heatmap``: layers (in forward order) against the measurements so far,
    each layer divided by its own maximum — so the rise and fall of every layer shows, whatever its scale — under the
    total trace on the same step axis (drawn on rank 0, after the measurement, never in a training step; its history,
    kept only with a TensorBoard logger, is thinned past ``2 * MAX_HEATMAP_COLUMNS`` measurements). A non-finite
    trace is logged, warned about, and training goes on.

    Args:
        num_samples: size of the probe set (capped at the training set's size).
        batch_size: probe examples per forward pass.
        every_n_steps: measure after every ``every_n_steps`` optimizer steps.
        every_n_epochs: measure after every ``every_n_epochs`` training epochs (at most one of the two cadences; with
            neither, every epoch).
        fisher: ``true``, ``empirical`` or ``exact`` (see :func:`~lightning_startwell.fisher.fisher_trace`).
        likelihood: ``categorical`` (classification logits: (N, C), (N, T, C) per position, (N, C, H, W) per pixel) or
            ``gaussian`` (regression outputs).
        noise_std: standard deviation of the Gaussian likelihood.
        method: ``auto`` (closed forms) or ``vmap``.
        seed: seed of the probe draw and of the ``true`` Fisher's labels.
        input_key: what the model is called with: a tuple index or dict key of a batch (one tensor), or a list of
            them (dict keys: keyword arguments, e.g. ``[input_ids, attention_mask]``; indices: positional arguments).
            Not used when the LightningModule defines ``startwell_forward(batch)``, which is then called on the
            collated probe batches instead.
        target_key: where the labels are (for ``empirical``). For a model that returns one prediction per position
            (a language model's (N, T, V) logits) they are (N, T), aligned with the logits (for a causal LM the next
            token, not Hugging Face's unshifted ``labels``), (N, H, W) for per-pixel (N, C, H, W) logits; positions
            labelled -100 are left out.
        mask_key: for a model that returns one prediction per position: where the (N, T) mask of the positions to
            measure is in the batch ((N, H, W) for per-pixel outputs), e.g. ``attention_mask`` (positions where it is
            0, padding, are left out, for every kind of Fisher). Without it every position counts; a batch with an
            ``attention_mask`` and a model with per-position outputs then warns once.
        log_per_layer: also log the per-layer split.
        probe: ``clean`` (the probe as drawn) or ``training`` (through the deficits active at the measurement).
        log_images: draw the per-layer heatmap at every measurement (TensorBoard only).
        chunk_size: samples per ``torch.func.vmap`` call where no closed form applies (a smaller value needs less
            memory). Default: 32 per module; for the whole model, as many as keep the chunk's per-sample gradients
            within a quarter of the free CUDA memory (256 MiB on CPU). Out of memory is raised, never hidden.

    Example::

        trainer = Trainer(callbacks=[FisherTraceMonitor(every_n_epochs=1, num_samples=512)])
    """

    state_key_arguments = ("fisher", "likelihood", "probe")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        num_samples: int = 256,
        batch_size: int = 64,
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        fisher: FisherKind = "true",
        likelihood: Likelihood = "categorical",
        noise_std: float = 1.0,
        method: Method = "auto",
        seed: int = 0,
        input_key: InputKey = 0,
        target_key: BatchKey = 1,
        mask_key: Optional[BatchKey] = None,
        log_per_layer: bool = True,
        probe: Literal["clean", "training"] = "clean",
        log_images: bool = True,
        chunk_size: Optional[int] = None,
    ) -> None:
        check_int("num_samples", num_samples)
        check_int("batch_size", batch_size)
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError(
                "Give at most one of `every_n_steps` and `every_n_epochs`, got"
                f" every_n_steps={every_n_steps!r}, every_n_epochs={every_n_epochs!r}."
            )
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None:
                check_int(name, value)
        check_fisher_arguments(fisher, likelihood, method, noise_std)
        check_choice("probe", probe, ("clean", "training"))
        check_input_key(input_key)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size)
        check_batch_key("mask_key", mask_key, optional=True)
        check_bool("log_images", log_images)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.fisher = fisher
        self.likelihood = likelihood
        self.noise_std = noise_std
        self.method = method
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.mask_key = mask_key
        self.log_per_layer = log_per_layer
        self.probe = probe
        self.log_images = log_images
        self._history: list[tuple[int, dict[str, float]]] = []  # (step, per-layer trace): the heatmap's columns
        self._layer_order: Optional[list[str]] = None  # forward order, found at the first picture
        self.chunk_size = chunk_size
        self._batch: Any = None  # this rank's share of the probe set, collated
        self._last_step = -1
        self._layout_written = False
        #: ``(step, trace)`` of the latest measurement of this fit (None before the first): read by other callbacks
        #: (``CriticalPeriodMonitor(signal="fisher")``); the same on every DDP rank.
        self.last_trace: Optional[tuple[int, float]] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                "FisherTraceMonitor",
                "its per-sample gradient norms are taken over the parameters each rank holds, which are shards"
                " (flattened, or empty); a trace summed over one rank's slice and never reduced over the shards would"
                " be a wrong number with no error",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_forward(pl_module, "FisherTraceMonitor")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = self._draw_probe(trainer)
        if self.probe == "training" and not _injectors(trainer):
            rank_zero_warn("FisherTraceMonitor(probe='training') found no DeficitInjector: the probe stays clean.")
        if not _trainer.fast_dev_run(trainer):
            self._warn_if_unusual_for_this_run(trainer)
        self._warn_if_padding_counts(pl_module)
        self._report(trainer, pl_module)
        if trainer.global_step == 0:  # the curve starts at the initialisation; a resumed run has that point already
            self._measure(trainer, pl_module)

    def _warn_if_unusual_for_this_run(self, trainer: pl.Trainer) -> None:
        """Valid settings that this run cannot honour: a probe set larger than the data, a cadence past the end."""
        size = len(_train_dataset(trainer))
        if self.num_samples > size:
            rank_zero_warn(f"FisherTraceMonitor: `num_samples`={self.num_samples} > {size} training items; all used.")
        steps_per_epoch, total = run_length(trainer)
        if total is None or not steps_per_epoch:
            return
        if (self.every_n_steps or 0) > total or (self.every_n_epochs or 0) > math.ceil(total / steps_per_epoch):
            name = "every_n_steps" if self.every_n_steps else "every_n_epochs"
            cadence = f"`{name}`={getattr(self, name)}"
            rank_zero_warn(
                f"FisherTraceMonitor: {cadence} is past the end of this run ({total} optimizer steps): the trace is"
                " measured at the initialisation only."
            )

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        size = min(self.num_samples, len(_train_dataset(trainer)))
        cadence = f"every {self.every_n_steps} steps" if self.every_n_steps else f"every {self.every_n_epochs} epochs"
        inputs = input_description(pl_module, self.input_key)
        if self.mask_key is not None:
            inputs += f", positions masked by mask_key={self.mask_key!r}"
        if self.fisher == "empirical":
            inputs += f", labels at target_key={self.target_key!r}"
        facts = {
            "probe set": f"{size} training items (seed {self.seed}, {self.probe}), in batches of {self.batch_size}",
            "inputs": inputs,
            "measured": f"{self.fisher} Fisher, {self.likelihood} likelihood, at step 0 and {cadence}",
            "layers (modules owning parameters)": listed(sorted(owned_parameters(pl_module))),
        }
        report_attached(trainer, "startwell/fisher", "FisherTraceMonitor", facts)

    def _warn_if_padding_counts(self, pl_module: pl.LightningModule) -> None:
        """One warning when the probe batch has an ``attention_mask`` that ``mask_key`` does not name while the model
        returns one prediction per position: its padded positions would count in the trace."""
        batch = self._batch
        if self.mask_key is not None or not has_tensor(batch, "attention_mask"):
            return
        with _measurement_mode(pl_module), torch.no_grad():  # eval mode: no dropout draws from the training streams
            output = run(pl_module, select(model_inputs(batch, self.input_key, pl_module), slice(0, 1)),
                         batch_forward(pl_module))
        if isinstance(output, torch.Tensor) and output.ndim == 3:
            rank_zero_warn(
                "FisherTraceMonitor: the model returns one prediction per position and the batch has an"
                " `attention_mask`, but `mask_key` is not set: padded positions count in the Fisher trace. Set"
                " `mask_key='attention_mask'` to leave them out."
            )

    def _draw_probe(self, trainer: pl.Trainer) -> Any:
        """This rank's share of ``num_samples`` training items drawn with ``seed`` (the same draw on every rank)."""
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise ValueError("FisherTraceMonitor needs a map-style training dataset (with __len__ and __getitem__).")
        assert loader is not None  # it has a dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
        chosen = order[: self.num_samples][trainer.global_rank :: trainer.world_size]
        if not len(chosen):
            return None
        # What a training batch goes through (a dataset's augmentation, the transfer hooks), on forked random streams:
        # the training run draws the same numbers as without the monitor.
        with random_streams_kept(trainer.strategy.root_device):
            batch = loader.collate_fn([dataset[int(i)] for i in chosen])
            batch = as_training_batch(trainer, trainer.lightning_module, batch)
        if batch is not None and self.fisher == "empirical":
            batch_tensor(batch, self.target_key, "target_key")  # fails now, naming the argument, not at a measurement
        if batch is not None and self.mask_key is not None:
            batch_tensor(batch, self.mask_key, "mask_key")
        return batch

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._measure(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._measure(trainer, pl_module)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        sums, count = self._local_sums(trainer, pl_module, step)
        names = sorted(owned_parameters(pl_module))  # the same layers, in the same order, on every rank
        device = pl_module.device
        dtype = accumulation_dtype(device)
        local = torch.stack([sums.get(n, torch.zeros((), dtype=dtype, device=device)).to(device, dtype) for n in names])
        local = torch.cat([local, torch.full((1,), count, dtype=dtype, device=device)])
        total_sums = trainer.strategy.reduce(local, reduce_op="sum").cpu()
        num = total_sums[-1].item()
        per_layer = {n: v / num for n, v in zip(names, total_sums[:-1].tolist(), strict=True)}
        trace = math.fsum(per_layer.values())
        self.last_trace = (step, trace)
        metrics = {"startwell/fisher/trace": trace}
        if self.log_per_layer:
            metrics.update({f"startwell/fisher/layer/{n}": v for n, v in per_layer.items()})
        if not math.isfinite(trace):
            rank_zero_warn(f"FisherTraceMonitor: the Fisher trace at step {step} is {trace}; training goes on.")
        log_scalars(trainer, metrics, step=step)
        self._write_layout(trainer)
        if self.log_images and tensorboard_experiments(trainer):  # the heatmap's columns, kept where it is drawn only
            self._history.append((step, per_layer))
            if len(self._history) > 2 * MAX_HEATMAP_COLUMNS:  # bounded memory and checkpoint on a long run
                self._history = spread_over_steps(self._history, MAX_HEATMAP_COLUMNS)
            log_image(trainer, "startwell/fisher/heatmap", lambda: self._heatmap(pl_module), step)

    def _heatmap(self, pl_module: pl.LightningModule) -> Any:
        if self._layer_order is None and self._batch is not None:  # found once, on the first probe item
            inputs = model_inputs(self._batch, self.input_key, pl_module)
            self._layer_order = layer_order(pl_module, inputs, batch_forward(pl_module))
        names = self._layer_order or list(self._history[-1][1])
        values = [[layers.get(name, math.nan) for _, layers in self._history] for name in names]
        return fisher_heatmap([step for step, _ in self._history], names, values)

    def _local_sums(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, torch.Tensor], int]:
        if self._batch is None:
            return {}, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        batch = self._probe_now(trainer, step)
        targets = batch_tensor(batch, self.target_key, "target_key") if self.fisher == "empirical" else None
        mask = batch_tensor(batch, self.mask_key, "mask_key") if self.mask_key is not None else None
        return fisher_trace_sums(
            pl_module,
            model_inputs(batch, self.input_key, pl_module),
            fisher=self.fisher,
            targets=targets,
            mask=mask,
            likelihood=self.likelihood,
            noise_std=self.noise_std,
            method=self.method,
            forward=batch_forward(pl_module),
            generator=generator,
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
        )

    def _probe_now(self, trainer: pl.Trainer, step: int) -> Any:
        """The probe batch as drawn, or (``probe="training"``) through the deficits active in the current epoch,
        each at its own key (a new container: the drawn probe is kept clean)."""
        batch = self._batch
        if self.probe == "clean":
            return batch
        # Seeded apart from the label draws of the same step.
        noise_generator = None
        for injector in _injectors(trainer):
            if not injector.active(trainer.current_epoch):
                continue
            key = injector.target_key if injector.acts_on_targets else injector.input_key
            value = batch_tensor(batch, key)
            if noise_generator is None:
                noise_generator = torch.Generator(value.device).manual_seed(self.seed * 1_000_003 + step + 2**31)
            batch = replace_tensor(batch, key, injector.transform(value, noise_generator))
        return batch

    def _write_layout(self, trainer: pl.Trainer) -> None:
        if self._layout_written or not self.log_per_layer:
            return
        for writer in tensorboard_experiments(trainer):
            writer.add_custom_scalars(
                {
                    "startwell": {
                        "Fisher trace": ["Multiline", ["startwell/fisher/trace"]],
                        "Fisher trace per layer": ["Multiline", [r"startwell/fisher/layer/.*"]],
                    }
                }
            )
        self._layout_written = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "history": self._history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        history = list(state_dict.get("history", []))  # absent from checkpoints written before the pictures
        self._history = history if len(history) <= 2 * MAX_HEATMAP_COLUMNS else spread_over_steps(
            history, MAX_HEATMAP_COLUMNS
        )  # written before the bound



def _injectors(trainer: pl.Trainer) -> list[DeficitInjector]:
    return [callback for callback in _trainer.callbacks(trainer) if isinstance(callback, DeficitInjector)]


def _train_dataset(trainer: pl.Trainer) -> Any:
    """The train loader's dataset, once the probe was drawn from it (``_draw_probe`` refuses a loader without one)."""
    loader = trainer.train_dataloader
    assert loader is not None
    return loader.dataset
