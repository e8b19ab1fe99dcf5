"""StochasticDepthSchedule: stochastic depth (Huang et al. 2016) on any residual model, with a schedule over steps."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from typing_extensions import override

from lightning_startwell._validation import check_choice
from lightning_startwell.callbacks._common import InstanceStateKey, listed, report_attached
from lightning_startwell.callbacks._rate_schedule import CutoffSignal, RateScheduleCallback
from lightning_startwell.callbacks._strategy import refuse_sharded, sharded_strategy
from lightning_startwell.drop_path import (
    DropPathHooks,
    ResidualBlock,
    existing_drop_path_rates,
    find_residual_blocks,
)
from lightning_startwell.dropout import RateSlot
from lightning_startwell.schedules import PERS, RULES, Mode, Per, Rule, Shape, block_drop_rates, expected_depth


class StochasticDepthSchedule(InstanceStateKey, RateScheduleCallback):
    r"""Drop whole residual branches in training, per sample or per mini-batch, with a layer rule and a schedule over
    steps.

    Block l of L survives with p_l = 1 - (l / L)(1 - p_L) (``rule="linear"``, Huang et al., ``drop_rate`` = 1 - p_L),
    with 1 - ((l - 1) / (L - 1)) ``drop_rate`` (``linspace``: ``linspace(0, drop_rate, L)`` as in Liu et al.'s code and
    timm, the first block never dropped) or with 1 - ``drop_rate`` each (``uniform``); the expected depth of a training
    pass is sum_l p_l. ``per="sample"`` draws b_l for each sample (timm, torchvision's ``row``), ``per="batch"`` once
    for the whole mini-batch (Huang et al.). ``drop_rate`` itself
    follows the same ``standard`` / ``early`` / ``late`` schedule as :class:`DropoutSchedule` (Liu et al. 2023: early
    s.d. 0.5 linear, late s.d. 0.4 constant).

    No module is replaced: forward hooks on the modules whose outputs are residual branches multiply them per sample by
    b / p_l, b ~ Bernoulli(p_l) (inverted, so evaluation is the plain network and checkpoints load without this
    library); with ``per="batch"`` every sample of the mini-batch shares the draw. Blocks are found automatically — timm
    ``DropPath`` slots (also the ``nn.Identity`` placeholders of a timm model built with ``drop_path_rate=0``),
    torchvision ``StochasticDepth``, the demo ResNet's ``branch`` modules,
    torchvision ``BasicBlock`` / ``Bottleneck`` — or named by ``blocks``. Existing drop-path modules are set to rate 0
    during ``fit`` (the hooks do the dropping) and restored after. Rates live in one device tensor updated in place:
    no host sync per block, and no recompilation of a ``torch.compile``d model when they change.

    Logs ``startwell/depth/drop_rate`` (the scheduled 1 - p_L) and ``startwell/depth/expected_depth`` every
    ``log_every_n_steps`` optimizer steps and, with ``log_images``, draws the planned per-block drop rates and the
    expected depth in the run's schedule picture ``startwell/schedule/overview`` (TensorBoard only, at the start and the
    end of training).

    Args:
        drop_rate: drop rate of the last block, 1 - p_L, in [0, 1).
        rule: ``linear`` (Huang et al.), ``linspace`` (Liu et al.'s code, timm) or ``uniform``.
        mode: ``standard``, ``early`` or ``late``.
        shape: ``constant``, ``linear`` or ``cosine`` (``late`` takes ``constant``).
        cutoff_epochs: cutoff in epochs.
        cutoff_steps: cutoff in optimizer steps.
        cutoff_fraction: cutoff as a fraction of training, in [0, 1]. With no cutoff given, ``early`` and ``late``
            use 1/6 of training (the paper's epoch 50 of 300).
        blocks: glob patterns of the modules whose outputs are residual branches, in depth order (default: automatic).
        per: ``sample`` (a draw per sample) or ``batch`` (one draw per block for the mini-batch, Huang et al.).
        cutoff_signal: ``"critical_period"``: the cutoff is the ``end_step`` of the trainer's
            ``CriticalPeriodMonitor`` (the rate before the cutoff until it is declared); shape ``constant`` only. A
            fixed cutoff given as well is a deadline: the cutoff if the end has not been declared by then.
        log_images: draw the schedule picture.

    Example::

        trainer = Trainer(callbacks=[StochasticDepthSchedule(drop_rate=0.5, rule="linear")])
    """

    rate_name = "drop_rate"

    state_key_arguments = ("blocks",)  # it tells two instances apart in a checkpoint

    def __init__(
        self,
        drop_rate: float = 0.1,
        rule: Rule = "linear",
        mode: Mode = "standard",
        shape: Shape = "constant",
        cutoff_epochs: Optional[int] = None,
        cutoff_steps: Optional[int] = None,
        cutoff_fraction: Optional[float] = None,
        blocks: Optional[list[str]] = None,
        log_images: bool = True,
        per: Per = "sample",
        cutoff_signal: Optional[CutoffSignal] = None,
    ) -> None:
        super().__init__(
            drop_rate, mode, shape, cutoff_epochs, cutoff_steps, cutoff_fraction, log_images=log_images,
            cutoff_signal=cutoff_signal,
        )
        check_choice("rule", rule, RULES)
        check_choice("per", per, PERS)
        self.rule = rule
        self.per = per
        self.blocks = blocks
        self._hooks: Optional[DropPathHooks] = None
        self._existing: list[RateSlot] = []
        self._original: dict[str, float] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # DeepSpeed (ZeRO) keeps the module tree and splits the data like DDP: supported. FSDP (Lightning's FSDP1)
        # wraps blocks in new modules, ModelParallel's tensor-parallel ranks must draw the same masks: refused.
        if stage == "fit" and sharded_strategy(trainer.strategy) != "DeepSpeedStrategy":
            refuse_sharded(
                trainer,
                "StochasticDepthSchedule",
                "the residual blocks are found by module type and name, which FSDP's wrapping changes (a `blocks`"
                " pattern can match a wrapper and the module it wraps, dropping a branch twice), and under tensor"
                " parallelism the ranks that share a batch would draw different per-sample masks; it has not been"
                " verified on these strategies",
                "Train with `strategy=\"ddp\"` or DeepSpeed, or on a single device.",
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = find_residual_blocks(pl_module, self.blocks)
        if not blocks:
            raise ValueError(
                "StochasticDepthSchedule found no residual block in the model (drop-path slots, transformer layers of"
                " the known families, residual branches); name the modules whose outputs are residual branches, or"
                " the container of the layers to drop whole (`bert.encoder.layer`), with `blocks` (glob patterns)."
            )
        super().on_fit_start(trainer, pl_module)
        self._existing = existing_drop_path_rates(pl_module)
        self._original = {s.name: s.get() for s in self._existing}
        for slot in self._existing:
            slot.set(0.0)
        self._hooks = DropPathHooks(pl_module, blocks, self.per).attach()
        facts = {
            "residual branches (blocks, in depth order)": listed([", ".join(b.outputs) for b in blocks]),
            "dropped": _drop_description(blocks),
            "the model's own drop-path rates set to 0 during fit": listed([s.name for s in self._existing]),
            "schedule": f"{self.schedule_description()}, rule {self.rule}, a draw per {self.per}",
        }
        report_attached(trainer, "startwell/depth", "StochasticDepthSchedule", facts)

    def _block_rates(self, rate: float) -> list[float]:
        assert self._hooks is not None
        return block_drop_rates(rate, len(self._hooks.blocks), self.rule)

    @override
    def apply_rate(self, pl_module: pl.LightningModule, rate: float) -> dict[str, float]:
        rates = self._block_rates(rate)
        assert self._hooks is not None  # set up in on_fit_start, like _block_rates asserts
        self._hooks.set_rates(rates)
        return {"startwell/depth/drop_rate": rate, "startwell/depth/expected_depth": expected_depth(rates)}

    def schedule_plan(self, steps: list[int], steps_per_epoch: Optional[int]) -> dict[str, Any]:
        """The planned drop rate of every block at ``steps``, for the schedule picture."""
        return {"block_rates": [self._block_rates(rate) for rate in self.planned_rates(steps)]}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None
        for slot in self._existing:
            slot.set(self._original[slot.name])


def _drop_description(blocks: list[ResidualBlock]) -> str:
    """How the blocks are dropped, for the fit-start report."""
    branch = sum(b.drop == "branch" for b in blocks)
    layer = len(blocks) - branch
    parts = [f"{branch} per branch (drop-path: x + b f(x) / (1 - p))"] if branch else []
    if layer:
        parts.append(f"{layer} whole layers (LayerDrop: the layer's input passed on, no rescaling)")
    return "; ".join(parts)
