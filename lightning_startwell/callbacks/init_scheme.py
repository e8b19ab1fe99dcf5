"""InitScheme: variance-preserving initialisation of any LightningModule, once, at the start of a fresh fit."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_startwell._validation import check_bool, check_int
from lightning_startwell.callbacks._common import (
    InputKey,
    InstanceStateKey,
    batch_forward,
    check_input_key,
    first_train_batch,
    has_forward,
    input_description,
    listed,
    log_image,
    log_scalars,
    model_inputs,
    report_attached,
    require_forward,
)
from lightning_startwell.callbacks._strategy import refuse_sharded
from lightning_startwell.figures import signal_profile
from lightning_startwell.fisher import owned_parameters
from lightning_startwell.init import (
    Mode,
    Nonlinearity,
    Scheme,
    calibration_mode,
    check_init_arguments,
    forward_variances,
    init_weights,
    tied_to_excluded,
    weight_layers,
)


class InitScheme(InstanceStateKey, Callback):
    r"""Initialise the model with a variance-preserving scheme at the start of a fresh ``fit``.

    Runs in ``on_fit_start``: after ``configure_model`` (layers built there are covered) and after the DDP wrap, in
    place under ``no_grad`` so the optimizer keeps its tensors. It never runs once trained weights were loaded from a
    checkpoint (``fit(ckpt_path=...)``, whether or not that run had InitScheme; the tuners' own step-0 restores do not
    count), in validate/test/predict, or on a second ``fit`` of the same trainer. Every DDP rank draws the same weights
    from one seed (``seed``, or one drawn on rank 0 and broadcast), and rank 0's result is then broadcast, so
    data-dependent LSUV agrees across ranks too.

    Logs at step 0, per layer: ``startwell/init/std/<layer>`` (std obtained), ``startwell/init/target_std/<layer>``,
    and ``startwell/init/forward_ratio/<layer>`` = Var[z^l] / Var[z^1] on one training batch (train mode, dropout off);
    with ``log_images``, these ratios against depth as the TensorBoard picture ``startwell/init/profile`` (rank 0).

    Args:
        scheme: ``glorot_normal``, ``glorot_uniform``, ``he_normal``, ``he_uniform``, ``lecun_normal``, ``orthogonal``,
            ``fixup`` or ``lsuv`` (see :func:`~lightning_startwell.init.init_weights`).
        mode: ``fan_in`` or ``fan_out`` (He schemes and Fixup).
        nonlinearity: ``relu``, ``leaky_relu``, ``tanh`` or ``linear``.
        negative_slope: leaky-ReLU slope alpha in [0, 1).
        include: glob patterns of layer names to initialise (default all); each must match a layer.
        exclude: glob patterns of module names to leave alone (normalisation layers too); a layer holding a parameter of
            an excluded module (GPT-2's ``lm_head``, tied to ``transformer.wte``) is left alone too, and the report
            at fit start names it with the module it is tied to.
        keep_bias: keep biases instead of zeroing them.
        forget_gate_bias: the forget-gate bias of every ``nn.LSTM`` (1.0 is common); recurrent layers and
            ``nn.MultiheadAttention`` are drawn per gate / per projection, recurrent matrices orthogonal (see
            :func:`~lightning_startwell.init.init_weights`).
        zero_init_residual: zero the last normalisation layer of each residual branch.
        residual_branches: glob patterns of residual-branch modules (default: found automatically).
        lsuv_tol: tolerance on |Var - 1| for ``lsuv``.
        lsuv_max_iters: rescalings per layer at most for ``lsuv``.
        seed: seed of the draws; None draws one on rank 0 (reproducible under ``seed_everything``).
        input_key: what the model is called with, for ``lsuv`` and the logged ratios: a tuple index or dict key (one
            tensor), or a list of them (dict keys: keyword arguments; indices: positional arguments). Not used when
            the LightningModule defines ``startwell_forward(batch)``, which is then called instead.
        log_forward_ratio: measure and log Var[z^l] / Var[z^1] on one training batch (needs the module's
            ``forward``; without one, the ratios are skipped with a warning, the weights still initialised).
        log_images: draw the forward ratios against depth (TensorBoard only; with ``log_forward_ratio``).

    Example::

        trainer = Trainer(callbacks=[InitScheme("he_normal", nonlinearity="leaky_relu", negative_slope=0.2)])

    In YAML::

        trainer:
          callbacks:
            - class_path: lightning_startwell.callbacks.InitScheme
              init_args: {scheme: fixup}
    """

    state_key_arguments = ("scheme", "include", "exclude")  # they tell two instances apart in a checkpoint

    def __init__(
        self,
        scheme: Scheme = "he_normal",
        mode: Mode = "fan_in",
        nonlinearity: Nonlinearity = "relu",
        negative_slope: float = 0.0,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        keep_bias: bool = False,
        forget_gate_bias: float = 0.0,
        zero_init_residual: bool = False,
        residual_branches: Optional[list[str]] = None,
        lsuv_tol: float = 0.1,
        lsuv_max_iters: int = 10,
        seed: Optional[int] = None,
        input_key: InputKey = 0,
        log_forward_ratio: bool = True,
        log_images: bool = True,
    ) -> None:
        check_init_arguments(scheme, mode, nonlinearity, negative_slope, forget_gate_bias)
        if not 0.0 < lsuv_tol < 1.0:
            raise ValueError(f"`lsuv_tol` must be in (0, 1), got {lsuv_tol!r}.")
        check_int("lsuv_max_iters", lsuv_max_iters)
        check_input_key(input_key)
        check_bool("log_images", log_images)
        self.scheme = scheme
        self.mode = mode
        self.nonlinearity = nonlinearity
        self.negative_slope = negative_slope
        self.include = include
        self.exclude = exclude
        self.keep_bias = keep_bias
        self.forget_gate_bias = forget_gate_bias
        self.zero_init_residual = zero_init_residual
        self.residual_branches = residual_branches
        self.lsuv_tol = lsuv_tol
        self.lsuv_max_iters = lsuv_max_iters
        self.seed = seed
        self.input_key = input_key
        self.log_forward_ratio = log_forward_ratio
        self.log_images = log_images
        self.applied = False
        self._loaded_trained_weights = False
        self.report: list[Any] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                "InitScheme",
                "parameters are sharded, so each rank would draw and rescale its slice of a layer (per-layer"
                " standard deviations, orthogonal draws and LSUV variances computed on slices)",
                "Initialise with DDP or a single device, save a checkpoint and load it under the sharded strategy.",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied or self._loaded_trained_weights:
            report_attached(trainer, "startwell/init", "InitScheme", {"initialised": "none (the weights are trained)"})
            return
        seed = self.seed
        if seed is None:  # drawn on rank 0 and shared, so every rank gets the same weights
            seed = trainer.strategy.broadcast(int(torch.randint(2**62, (1,)).item()))
        if self.scheme == "lsuv":
            require_forward(pl_module, "InitScheme(scheme='lsuv')")  # before any weight changes
        log_forward_ratio = self.log_forward_ratio and has_forward(pl_module)
        if self.log_forward_ratio and not log_forward_ratio:
            rank_zero_warn(
                f"InitScheme: {type(pl_module).__name__} defines no `forward`, so the forward ratios are not measured"
                " (the weights are initialised). Define `startwell_forward(self, batch)` (or `forward`) on the"
                " LightningModule to get them, or pass `log_forward_ratio=False` to silence this."
            )
        needs_batch = self.scheme == "lsuv" or log_forward_ratio
        inputs = model_inputs(first_train_batch(trainer), self.input_key, pl_module) if needs_batch else None
        forward = batch_forward(pl_module)
        with warnings.catch_warnings():
            if trainer.global_rank != 0:  # the core's warnings (fixup on a normalised branch) once, on rank zero
                warnings.simplefilter("ignore")
            self.report = init_weights(
                pl_module,
                self.scheme,
                mode=self.mode,
                nonlinearity=self.nonlinearity,
                negative_slope=self.negative_slope,
                include=self.include,
                exclude=self.exclude,
                keep_bias=self.keep_bias,
                forget_gate_bias=self.forget_gate_bias,
                zero_init_residual=self.zero_init_residual,
                residual_branches=self.residual_branches,
                lsuv_inputs=inputs,
                lsuv_tol=self.lsuv_tol,
                lsuv_max_iters=self.lsuv_max_iters,
                generator=torch.Generator().manual_seed(seed),
                forward=forward,
                lsuv_reduce=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),  # every rank tests the same variance
            )
        _share_rank_zero_weights(pl_module)
        self.applied = True
        metrics = {}
        for layer in self.report:
            metrics[f"startwell/init/std/{layer.name}"] = layer.std
            if not math.isnan(layer.target_std):
                metrics[f"startwell/init/target_std/{layer.name}"] = layer.target_std
        if log_forward_ratio:
            assert inputs is not None  # needs_batch
            layers = weight_layers(pl_module, self.include, self.exclude)
            with calibration_mode(pl_module):
                variances = forward_variances(pl_module, inputs, layers, forward)
            first = next(iter(variances.values()))
            for name, var in variances.items():
                metrics[f"startwell/init/forward_ratio/{name}"] = var / first if first > 0 else math.nan
            if self.log_images:
                log_image(trainer, "startwell/init/profile", lambda: signal_profile([(0, variances, {})]), step=0)
        log_scalars(trainer, metrics, step=0)
        self._report(trainer, pl_module, inputs if log_forward_ratio else None)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio_inputs: Any) -> None:
        initialised = list(dict.fromkeys(layer.module_name for layer in self.report))
        modules = dict(pl_module.named_modules())
        drawn = {id(p): n for n in initialised for p in modules[n].parameters(recurse=False)}
        through_tie = {}  # modules whose parameter is one an initialised layer holds too (a tied weight)
        for name, module in modules.items():
            holders = [drawn[id(p)] for p in module.parameters(recurse=False) if id(p) in drawn]
            if name not in initialised and holders:
                through_tie[name] = holders[0]
        facts = {
            f"initialised ({self.scheme})": listed(initialised),
            "skipped (own parameters, not initialised)": listed(
                [
                    n or type(pl_module).__name__
                    for n in owned_parameters(pl_module)
                    if n not in set(initialised) and n not in through_tie
                ]
            ),
        }
        tied = tied_to_excluded(pl_module, self.exclude)
        if tied:
            facts["left alone (a parameter tied to an excluded module)"] = listed(
                [f"{n} (tied to {owner})" for n, owner in tied.items()]
            )
        if through_tie:
            facts["initialised through a tied weight"] = listed(
                [f"{n} (tied to {holder})" for n, holder in through_tie.items()]
            )
        zeroed = [layer.name for layer in self.report if layer.target_std == 0]
        if zeroed:
            facts["zeroed (last layer of a residual branch)"] = listed(zeroed)
        if ratio_inputs is not None:
            facts["forward ratios on"] = f"the first training batch, {input_description(pl_module, self.input_key)}"
        report_attached(trainer, "startwell/init", "InitScheme", facts)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Any checkpoint past step 0 holds trained weights (a resume, even of a run without InitScheme): never
        # overwrite them. The tuners (LR finder, batch-size finder) restore their own step-0 checkpoint inside a fresh
        # fit, and `trainer.ckpt_path` then names it: that fit still wants initialising.
        self._loaded_trained_weights = self._loaded_trained_weights or checkpoint.get("global_step", 0) > 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict["applied"]


@torch.no_grad()
def _share_rank_zero_weights(module: torch.nn.Module) -> None:
    """Under torch.distributed, copy rank 0's parameters and buffers to every rank: the seeded draws agree already,
    but a data-dependent scheme (LSUV on each rank's own first batch) would not."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)
