"""SignalPropagationMonitor: per-layer forward and backward variance on real training steps."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_startwell._compile import eager
from lightning_startwell._validation import check_bool, check_int
from lightning_startwell.callbacks._common import (
    InstanceStateKey,
    listed,
    log_image,
    log_scalars,
    report_attached,
    tensorboard_experiments,
)
from lightning_startwell.callbacks._strategy import refuse_sharded
from lightning_startwell.figures import MAX_EARLIER_PROFILES, SignalMeasurement, signal_profile, spread_over_steps
from lightning_startwell.init import watched_layers
from lightning_startwell.propagation import SignalRecorder, propagation_ratios, unscale_backward, variances_by_name

_HISTOGRAM_VALUES = 65536


class SignalPropagationMonitor(InstanceStateKey, Callback):
    r"""Watch vanishing and exploding signals: every ``every_n_steps`` optimizer steps, on the training step itself,
    the variance of every Linear/conv layer's output z^l (forward) and of the gradient dL/dz^l (backward).

    Only the training step's own forward and backward are recorded: on a measured step the LightningModule's
    ``training_step`` is wrapped for its next call (from ``on_train_batch_start``), the layers' forward hooks exist
    only while it runs, and the gradient hooks sit on the outputs it produced, removed after its backward. Another
    callback's probe passes (GradientDynamicsMonitor's probe gradients, FisherTraceMonitor's trace), whatever the
    order of the callbacks, run outside it and are not recorded. The other steps run untouched and nothing is computed
    twice. On a ``torch.compile``d model the measured training step runs eagerly (compiled code would skip hooks it
    was not traced with); the other steps run the compiled code, which never saw the hooks, and nothing is
    recompiled. Under DDP the moments of all ranks are summed before the variance
    is taken, so the numbers are those of the global batch. Under ``16-mixed`` with a GradScaler the gradients the
    hooks see are multiplied by the loss scale: the backward moments are divided by it (the variance by scale^2), so
    the logged variances are those of the true gradients whatever the scale. With gradient accumulation the first
    micro-batch of the step is measured, and its backward variances are those of the loss ``training_step`` returns
    (Lightning's division by ``accumulate_grad_batches`` is undone), so they do not change with the accumulation.

    Logged at the optimizer step of the measurement (``trainer.global_step``):

    * ``startwell/signal/forward/<layer>``: Var[z^l];
    * ``startwell/signal/backward/<layer>``: Var[dL/dz^l];
    * ``startwell/signal/forward_ratio``: Var[z^last] / Var[z^first];
    * ``startwell/signal/backward_ratio``: Var[dL/dz^first] / Var[dL/dz^last];
    * with ``log_histograms``, TensorBoard histograms ``startwell/signal/{forward,backward}_hist/<layer>``;
    * with ``log_images``, the TensorBoard picture ``startwell/signal/profile``: Var[z^l] / Var[z^1] and
      Var[dL/dz^l] / Var[dL/dz^L] against depth on a log scale, the latest measurement over the earlier ones (faded),
      with the flat line of a variance-preserving initialisation (drawn on rank 0, at measured steps only).

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0`` (so step 0, at initialisation, is measured).
        include: glob patterns of layer names to watch (default all Linear and conv layers); each must match a layer.
        exclude: glob patterns of layer names not to watch.
        log_histograms: also log histograms of the values (up to 65,536 per layer) to TensorBoard.
        log_images: draw the profile picture at every measurement (TensorBoard only).

    Example::

        trainer = Trainer(callbacks=[SignalPropagationMonitor(every_n_steps=20)])
    """

    state_key_arguments = ("every_n_steps", "include", "exclude")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        log_histograms: bool = False,
        log_images: bool = True,
    ) -> None:
        check_int("every_n_steps", every_n_steps)
        check_bool("log_histograms", log_histograms)
        check_bool("log_images", log_images)
        self.every_n_steps = every_n_steps
        self.include = include
        self.exclude = exclude
        self.log_histograms = log_histograms
        self.log_images = log_images
        self._profiles: list[SignalMeasurement] = []  # for the picture: the measurements, thinned as they accumulate
        self._recorder: Optional[SignalRecorder] = None
        self._measuring = ExitStack()  # the recorder's gradient hooks and the training_step wrapper, up to backward
        self._last_measured_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                "SignalPropagationMonitor",
                "its layers are found by type and name, which FSDP's wrapping changes, and under tensor parallelism"
                " the outputs and output gradients its hooks read are shards; per-layer variances over them have not"
                " been shown right on any sharded strategy",
            )
            watched_layers(pl_module, self.include, self.exclude)  # a pattern that matches nothing fails here

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = list(watched_layers(pl_module, self.include, self.exclude))
        facts = {
            "layers watched (Linear, conv, recurrent, attention)": listed(layers),
            "every_n_steps": str(self.every_n_steps),
        }
        report_attached(trainer, "startwell/signal", "SignalPropagationMonitor", facts)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_measured_step:
            return
        layers = watched_layers(pl_module, self.include, self.exclude)
        recorder = SignalRecorder(layers, keep_values=_HISTOGRAM_VALUES if self.log_histograms else 0)
        self._measuring.callback(recorder.detach)
        self._measuring.callback(_record_next_training_step(pl_module, recorder))
        self._recorder = recorder
        self._last_measured_step = step

    def _stop_measuring(self) -> Optional[SignalRecorder]:
        """Remove the hooks and leave the eager stance; the recorder of the step, or None outside a measured step."""
        recorder, self._recorder = self._recorder, None
        self._measuring.close()
        return recorder

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._stop_measuring()
        if recorder is None:
            return
        names = list(recorder.layers)  # the same order on every rank, for the all-reduce
        local = unscale_backward(recorder.stacked_moments(names, pl_module.device), _grad_scale(trainer))
        stacked = trainer.strategy.reduce(local, reduce_op="sum")
        forward, backward = variances_by_name(names, stacked)
        forward = {n: v for n, v in forward.items() if not math.isnan(v)}
        # Lightning's automatic optimization divides the loss by accumulate_grad_batches before backward: undo it,
        # so the backward variances are those of the training step's loss whatever the accumulation.
        rescale = trainer.accumulate_grad_batches**2 if pl_module.automatic_optimization else 1
        backward = {n: v * rescale for n, v in backward.items() if not math.isnan(v)}
        metrics = {f"startwell/signal/forward/{n}": v for n, v in forward.items()}
        metrics.update({f"startwell/signal/backward/{n}": v for n, v in backward.items()})
        order = recorder.names()  # forward order, for the first/last layers of the ratios and the picture
        forward = {n: forward[n] for n in order if n in forward}
        backward = {n: backward[n] for n in order if n in backward}
        forward_ratio, backward_ratio = propagation_ratios(forward, backward)
        metrics["startwell/signal/forward_ratio"] = forward_ratio
        metrics["startwell/signal/backward_ratio"] = backward_ratio
        step = trainer.global_step
        log_scalars(trainer, metrics, step=step)
        for writer in tensorboard_experiments(trainer):
            for (direction, name), values in recorder.values.items():
                writer.add_histogram(f"startwell/signal/{direction}_hist/{name}", values.cpu(), global_step=step)
        if self.log_images:
            self._profiles.append((step, forward, backward))
            if len(self._profiles) > 4 * MAX_EARLIER_PROFILES:  # bounded memory and checkpoint on a long run
                self._profiles = spread_over_steps(self._profiles, 2 * MAX_EARLIER_PROFILES)
            log_image(trainer, "startwell/signal/profile", lambda: signal_profile(self._profiles), step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_measuring()  # the step skipped its backward (e.g. the loss was None)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_measuring()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_measured_step": self._last_measured_step, "profiles": self._profiles}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_measured_step = state_dict["last_measured_step"]
        self._profiles = list(state_dict.get("profiles", []))  # absent from checkpoints written before the pictures


def _record_next_training_step(pl_module: pl.LightningModule, recorder: SignalRecorder) -> Callable[[], None]:
    """Wrap ``pl_module.training_step`` for its next call: that call runs eagerly with the recorder's forward hooks
    on (removed when it returns; the gradient hooks it set stay for the backward), then the wrapper takes itself away.
    Returns the function that takes it away (for a step that never called it). Lightning calls the method through
    the instance (``getattr``) on one device and under DDP, so the wrapper sees exactly the training step."""
    owned = vars(pl_module)
    had_own, own = "training_step" in owned, owned.get("training_step")  # e.g. Lightning's compiled training_step
    original = pl_module.training_step

    def restore() -> None:
        if owned.get("training_step") is training_step:
            if had_own:
                owned["training_step"] = own
            else:
                del owned["training_step"]

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        restore()
        with eager():
            recorder.attach()
            try:
                return original(*args, **kwargs)
            finally:
                recorder.stop_forward()

    owned["training_step"] = training_step
    return restore


def _grad_scale(trainer: pl.Trainer) -> Optional[torch.Tensor]:
    """The loss scale of this step's backward under a GradScaler (``16-mixed`` on CUDA), as a device tensor (reading
    it as a float would sync), or None without one."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._get_scale_async()  # the public get_scale() is a host sync; this is the tensor it reads
