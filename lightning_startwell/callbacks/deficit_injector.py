"""DeficitInjector: a sensory deficit on the training batches of chosen epochs (critical learning periods)."""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell import _trainer
from lightning_startwell._validation import check_bool, check_choice, check_int
from lightning_startwell.callbacks._common import (
    BatchKey,
    InstanceStateKey,
    batch_tensor,
    first_train_batch,
    first_train_inputs,
    listed,
    log_scalars,
    report_attached,
    run_length,
    write_tensor,
)
from lightning_startwell.callbacks._schedule_overview import ScheduleDrawing
from lightning_startwell.callbacks._strategy import refuse_sharded, sharded_strategy
from lightning_startwell.deficits import (
    DEFICITS,
    Deficit,
    blur,
    check_blur_size,
    class_permutation,
    deprivation,
    label_permutation,
    moments,
    noise,
    vertical_flip,
)

# Examples the deprivation's mean and standard deviation are measured on (the first training batches).
DEPRIVATION_STATISTICS_ITEMS = 4096


def _windows(start_epoch: Union[int, list[int]], end_epoch: Union[int, list[int]]) -> list[tuple[int, int]]:
    starts = [start_epoch] if isinstance(start_epoch, int) else list(start_epoch)
    ends = [end_epoch] if isinstance(end_epoch, int) else list(end_epoch)
    if len(starts) != len(ends) or not starts:
        raise ValueError(
            f"`start_epoch` and `end_epoch` must pair up into windows, got {start_epoch!r} and {end_epoch!r}."
        )
    for start, end in zip(starts, ends, strict=True):
        check_int("start_epoch", start, minimum=0)
        check_int("end_epoch", end, minimum=0)
        if end <= start:
            raise ValueError(f"`end_epoch` must be > `start_epoch` in every window, got [{start}, {end}).")
    windows = sorted(zip(starts, ends, strict=True))
    for (_, end), (start, _) in itertools.pairwise(windows):
        if start < end:
            raise ValueError(f"`start_epoch`/`end_epoch` windows overlap: {windows}.")
    return windows


class DeficitInjector(InstanceStateKey, ScheduleDrawing):
    r"""Apply a deficit to the training batches of the epochs in ``[start_epoch, end_epoch)`` — the experiment of
    Achille et al. (2017): a network that sees blurred images early, then clean ones, ends up worse the longer the
    deficit lasted; the damage of an early deficit is not undone by training longer.

    The deficit is applied in ``on_train_batch_start`` to the batch on the device (validation and test batches are
    never touched). The batch container is given a new tensor (a list or dict batch), or, for a tuple batch, the
    collated tensor is overwritten in place: the dataset's own storage is never written. Whether an epoch has the
    deficit depends only on ``trainer.current_epoch``, so a resumed run applies it on the same epochs.

    Deficits (see :mod:`lightning_startwell.deficits`): ``blur`` (down to ``size``, antialiased, and back),
    ``noise`` (additive Gaussian, ``noise_std``), ``deprivation`` (the input replaced by Gaussian noise with the mean
    and standard deviation of the training inputs, measured at the start of fit on the first 4,096 training examples of
    this process), ``vertical_flip``, ``label_permutation`` (a fixed random permutation of the classes drawn from
    ``seed``; acts on the targets; ``ignore_index`` and negative targets are kept).

    Logs ``startwell/deficit/active`` (1 or 0) every ``log_every_n_steps`` optimizer steps and, with ``log_images``,
    shades the deficit windows in the run's schedule picture ``startwell/schedule/overview`` (TensorBoard only, at the
    start and the end of training; needs a train loader of known length). Warns once if, when a
    deficit is removed, the learning rate is below ``lr_warning_ratio`` times its value when the deficit began: the
    clean epochs then train at a lower learning rate, a confound of the protocol.

    Args:
        deficit: ``blur``, ``noise``, ``deprivation``, ``vertical_flip`` or ``label_permutation``.
        start_epoch: first epoch with the deficit, or a list of them for several windows.
        end_epoch: first epoch without it again (exclusive), or a list matching ``start_epoch``.
        size: blur resolution (``size x size`` for images, ``size`` samples for signals). The paper keeps 8 of 32 pixels
            per axis (1/4); on MNIST-1D's 40 samples that is ``size=10``.
        noise_std: standard deviation of the noise deficit.
        num_classes: number of classes for ``label_permutation`` (default: the model's ``num_classes``).
        seed: seed of the label permutation.
        input_key: where the inputs are in a batch (tuple index or dict key).
        target_key: where the targets are in a batch.
        lr_warning_ratio: warn when the LR at removal is below this fraction of the LR at onset; 0 disables.
        log_images: draw the deficit windows in the schedule picture.
        ignore_index: for ``label_permutation``, the target value the loss ignores (the padding of per-token targets,
            -100 as in ``F.cross_entropy``): kept as it is, like any negative target. Negative or >= the number of
            classes.

    Example::

        trainer = Trainer(max_epochs=60, callbacks=[DeficitInjector("blur", start_epoch=0, end_epoch=20, size=8)])
    """

    state_key_arguments = ("deficit", "windows")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        deficit: Deficit = "blur",
        start_epoch: Union[int, list[int]] = 0,
        end_epoch: Union[int, list[int]] = 10,
        size: int = 8,
        noise_std: float = 1.0,
        num_classes: Optional[int] = None,
        seed: int = 0,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        lr_warning_ratio: float = 0.5,
        log_images: bool = True,
        ignore_index: int = -100,
    ) -> None:
        check_choice("deficit", deficit, DEFICITS)
        self.windows = _windows(start_epoch, end_epoch)
        check_int("size", size)
        if noise_std < 0:
            raise ValueError(f"`noise_std` must be >= 0, got {noise_std!r}.")
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=2)
        if not 0.0 <= lr_warning_ratio <= 1.0:
            raise ValueError(f"`lr_warning_ratio` must be in [0, 1], got {lr_warning_ratio!r}.")
        check_bool("log_images", log_images)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(
                f"`ignore_index` must be an integer (the target value the loss ignores, -100 for F.cross_entropy),"
                f" got {ignore_index!r}."
            )
        self.deficit = deficit
        self.size = size
        self.noise_std = noise_std
        self.num_classes = num_classes
        self.seed = seed
        self.input_key = input_key
        self.target_key = target_key
        self.lr_warning_ratio = lr_warning_ratio
        self.log_images = log_images
        self.ignore_index = ignore_index
        self._permutation: Optional[torch.Tensor] = None
        self._moments: Optional[tuple[float, float]] = None  # mean and std of the training inputs, for deprivation
        self._onset_lr: dict[int, float] = {}
        self._warned = False
        self._last_logged_step = -1

    def active(self, epoch: int) -> bool:
        """Whether training batches of ``epoch`` get the deficit."""
        return any(start <= epoch < end for start, end in self.windows)

    @property
    def _key(self) -> tuple[BatchKey, str]:
        """Where the deficit acts in a batch, and the argument that says so."""
        if self.acts_on_targets:
            return self.target_key, "target_key"
        return self.input_key, "input_key"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # It only changes each rank's own batches, like under DDP: right under FSDP and DeepSpeed (data parallel).
        # Under ModelParallel the ranks of a tensor-parallel group share one batch: only the deterministic deficits.
        random = self.deficit in ("noise", "deprivation")
        if stage == "fit" and random and sharded_strategy(trainer.strategy) == "ModelParallelStrategy":
            refuse_sharded(
                trainer,
                f"DeficitInjector(deficit={self.deficit!r})",
                "the ranks of a tensor-parallel group must see the same batch, and each would draw its own noise",
                "Use DDP, FSDP or DeepSpeed, or a deterministic deficit (blur, vertical_flip, label_permutation).",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch = first_train_batch(trainer)
        batch_tensor(batch, self.input_key, "input_key")
        key, argument = self._key
        value = batch_tensor(batch, key, argument)
        self._check_applies(value)
        if self.deficit == "label_permutation":
            num_classes = self.num_classes or getattr(pl_module, "num_classes", None)
            if not isinstance(num_classes, int):
                raise ValueError("`num_classes` is needed for 'label_permutation' (the model has no `num_classes`).")
            if 0 <= self.ignore_index < num_classes:
                raise ValueError(
                    f"`ignore_index`={self.ignore_index} is one of the {num_classes} classes: the permutation would"
                    " move other classes onto it. Give the value the loss ignores: negative (-100 for F.cross_entropy)"
                    " or"
                    f" >= `num_classes` ({num_classes})."
                )
            self._permutation = class_permutation(num_classes, self.seed).to(pl_module.device)  # moved once
        elif self.deficit == "blur":
            check_blur_size(value.shape, self.size)
        elif self.deficit == "deprivation" and self._moments is None:  # a resumed run keeps the statistics it had
            self._moments = moments(first_train_inputs(trainer, self.input_key, DEPRIVATION_STATISTICS_ITEMS))
        self._warn_windows_past_the_end(trainer)
        self._report(trainer, value)

    def _report(self, trainer: pl.Trainer, value: torch.Tensor) -> None:
        setting = {"blur": f"size={self.size}", "noise": f"noise_std={self.noise_std}"}.get(self.deficit, "")
        key, argument = self._key
        facts = {
            "deficit": f"{self.deficit}({setting})" if setting else self.deficit,
            "acts on": f"`{argument}`={key!r} ({value.dtype} {tuple(value.shape[1:])} per item)",
            "window (epochs [start, end))": listed([f"[{start}, {end})" for start, end in self.windows]),
        }
        report_attached(trainer, "startwell/deficit", "DeficitInjector", facts)

    def _warn_windows_past_the_end(self, trainer: pl.Trainer) -> None:
        steps_per_epoch, total = run_length(trainer)
        if not steps_per_epoch or total is None or _trainer.fast_dev_run(trainer):
            return
        epochs = math.ceil(total / steps_per_epoch)
        late = [(start, end) for start, end in self.windows if end > epochs]
        if late:
            rank_zero_warn(
                f"DeficitInjector: this run trains for {epochs} epochs; the deficit windows {late} (epochs"
                " [start, end)) reach past its end, so they are cut short or never applied."
            )

    def _check_applies(self, value: torch.Tensor) -> None:
        """Refuse, before training, a tensor the deficit cannot act on (token ids, a mask, float labels)."""
        key, argument = self._key
        if self.deficit == "label_permutation":
            ok = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
            needs = "integer class labels"
        elif self.deficit in ("noise", "deprivation"):
            ok, needs = value.is_floating_point(), "a float tensor"
        else:
            ok = value.is_floating_point() and value.ndim in (3, 4)
            needs = "float images (N, C, H, W) or signals (N, C, L)"
        if not ok:
            raise ValueError(
                f"`deficit`={self.deficit!r} needs {needs} at `{argument}`={key!r}, got a {value.dtype} tensor of shape"
                f" {tuple(value.shape)}. blur and vertical_flip act on float images or signals, noise and deprivation"
                " on any float input, label_permutation on integer targets (whatever the inputs): choose another"
                f" `deficit`, or point `{argument}` at a tensor it applies to."
            )

    def transform(self, value: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The deficit applied to ``value`` — the inputs, or the targets for ``label_permutation`` — whatever the epoch;
        ``generator`` drives the noise of ``noise`` and ``deprivation`` (default: the global stream). Needs the
        statistics and permutation drawn at the start of fit."""
        if self.deficit == "blur":
            return blur(value, self.size)
        if self.deficit == "noise":
            return noise(value, self.noise_std, generator)
        if self.deficit == "deprivation":
            assert self._moments is not None, "the deprivation's statistics are measured in on_fit_start"
            return deprivation(value, *self._moments, generator=generator)
        if self.deficit == "vertical_flip":
            return vertical_flip(value)
        assert self._permutation is not None
        return label_permutation(value, self._permutation, self.ignore_index)

    @property
    def acts_on_targets(self) -> bool:
        """Whether the deficit changes the targets (``label_permutation``) rather than the inputs."""
        return self.deficit == "label_permutation"

    def _apply(self, batch: Any) -> None:
        key, argument = self._key
        value = batch_tensor(batch, key, argument)
        write_tensor(batch, key, self.transform(value))  # the container and its type kept

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        active = self.active(trainer.current_epoch)
        if active:
            self._apply(batch)
        step = trainer.global_step
        if step != self._last_logged_step and step % _trainer.log_every_n_steps(trainer) == 0:
            log_scalars(trainer, {"startwell/deficit/active": float(active)}, step=step)
            self._last_logged_step = step

    def schedule_plan(self, steps: list[int], steps_per_epoch: Optional[int]) -> dict[str, Any]:
        """The deficit windows in optimizer steps, for the schedule picture (none when the epoch length is unknown)."""
        if not steps_per_epoch:
            return {}
        windows = [(start * steps_per_epoch, end * steps_per_epoch, self.deficit) for start, end in self.windows]
        return {"windows": windows}

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            return
        epoch, lr = trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]
        for start, end in self.windows:
            if epoch == start:
                self._onset_lr[start] = lr
            elif epoch == end and start in self._onset_lr and not self._warned:
                onset = self._onset_lr[start]
                if lr < self.lr_warning_ratio * onset:
                    rank_zero_warn(
                        f"DeficitInjector: the deficit of epochs [{start}, {end}) ends with a learning rate of"
                        f" {lr:.3g}, {onset / lr:.1f}x below its {onset:.3g} at onset; the clean epochs train at a"
                        " lower learning rate, a confound of the critical-period protocol (Achille et al. 2017)."
                    )
                    self._warned = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"onset_lr": self._onset_lr, "warned": self._warned, "moments": self._moments}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._onset_lr = dict(state_dict["onset_lr"])
        self._warned = state_dict["warned"]
        saved = state_dict.get("moments")  # absent from checkpoints written before deprivation existed
        self._moments = tuple(saved) if saved is not None else None
