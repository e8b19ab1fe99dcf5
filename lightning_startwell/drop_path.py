"""Stochastic depth without module surgery (pure PyTorch, no Lightning): forward hooks drop whole residual branches.

Huang et al. (2016): in training, block l computes x + b_l f_l(x) with b_l ~ Bernoulli(p_l) drawn for the whole
mini-batch (timm and torchvision's default draw it per sample; both are offered, ``per``). We use the
inverted form x + b_l f_l(x) / p_l, so evaluation is the plain x + f_l(x) and the model's eval output does not change.
A forward hook on the module whose output is f_l(x) does the multiplication, so the model keeps its structure and its
checkpoints load without this library. The rates live in one tensor on the model's device, updated in place: no host
sync per block, and a ``torch.compile``d model sees the same graph whatever the rates. Dynamo does not guard on hooks:
attaching and detaching the hooks of a compiled model drops its compiled code, so that the next call is traced with the
hooks it has (:mod:`lightning_startwell._compile`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_startwell._compile import forget_compiled_code
from lightning_startwell._validation import check_choice, check_rate
from lightning_startwell.dropout import RateSlot
from lightning_startwell.init import find_residual_branches
from lightning_startwell.schedules import PERS, Per

# Drop-path modules of other libraries, by class name, and the attribute that holds their rate.
DROP_PATH_CLASSES = {"DropPath": "drop_prob", "StochasticDepth": "p"}

_BERT_BRANCHES = (("attention.output.dropout", "crossattention.output.dropout", "output.dropout"),)
#: Transformer layers whose residual branches a hook can isolate, by class name: layouts (the first one the layer has
#: any module of is used) of the modules, by relative name, whose outputs are the branches f(x) before the residual
#: addition. BERT-style post-LN layers add inside ``LayerNorm(dropout(dense(h)) + x)``, so the branch is that
#: dropout's output; GPT-2's ``attn`` returns a tuple, the branch first; Hugging Face ViT (transformers 5) applies one
#: ``dropout`` module to both branches (two calls, two draws), its older versions one per branch.
TRANSFORMER_BRANCHES: dict[str, tuple[tuple[str, ...], ...]] = {
    "BertLayer": _BERT_BRANCHES,
    "RobertaLayer": _BERT_BRANCHES,
    "XLMRobertaLayer": _BERT_BRANCHES,
    "ElectraLayer": _BERT_BRANCHES,
    "CamembertLayer": _BERT_BRANCHES,
    "GPT2Block": (("attn", "crossattention", "mlp"),),
    "ViTLayer": (("dropout",), ("attention.output.dropout", "output.dropout")),
    "TransformerEncoderLayer": (("dropout1", "dropout2"),),
    "TransformerDecoderLayer": (("dropout1", "dropout2", "dropout3"),),
}

#: How a block is dropped: its branches' outputs scaled by b / (1 - p) (drop-path, Huang et al.), or the whole layer
#: replaced by its input (LayerDrop, Fan et al. 2019: no rescaling).
Drop = Literal["branch", "layer"]


def drop_path(x: torch.Tensor, rate: Union[torch.Tensor, float], per: str = "sample") -> torch.Tensor:
    """Inverted drop of a residual branch: ``x * b / (1 - rate)`` with ``b ~ Bernoulli(1 - rate)`` drawn for each
    sample (dim 0, ``per="sample"``: timm, torchvision ``mode="row"``) or once for the whole mini-batch
    (``per="batch"``: Huang et al. 2016, torchvision ``mode="batch"``).

    ``rate`` is a 0-d tensor in [0, 1) (a Python float works too); nothing is read back to the host. The uniforms are
    drawn in float32 whatever the activations' dtype: in bfloat16 (8 significant bits) ``rand >= rate`` keeps a
    biased fraction (0.898 for 0.9).
    """
    shape = ((x.shape[0] if per == "sample" else 1),) + (1,) * (x.ndim - 1)
    keep = torch.rand(shape, device=x.device, dtype=torch.float32) >= rate
    return x * keep.to(x.dtype) / (1.0 - rate)


class DropPath(nn.Module):
    """Stochastic depth as a module, for models written with it: ``drop_path(x, drop_prob)`` in training, the identity
    in evaluation. Put it on the residual branch (``x + DropPath(p)(f(x))``); StochasticDepthSchedule finds and
    schedules it like timm's module of the same name.

    Args:
        drop_prob: probability of dropping the branch for a sample (or the mini-batch), in [0, 1).
        per: ``sample`` (a draw per sample) or ``batch`` (one draw for the mini-batch).
    """

    def __init__(self, drop_prob: float = 0.0, per: Per = "sample") -> None:
        super().__init__()
        check_rate("drop_prob", drop_prob)
        check_choice("per", per, PERS)
        self.drop_prob = drop_prob
        self.per = per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        return drop_path(x, self.drop_prob, self.per)  # a float: no tensor built per forward

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, per={self.per}"


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block for stochastic depth: its name and the modules whose outputs are its residual branches
    (a timm ViT block has two, ``drop_path1`` and ``drop_path2``; they share the block's rate). With ``drop="layer"``
    the one output is a whole layer's, replaced by the layer's input when dropped (LayerDrop)."""

    name: str
    outputs: tuple[str, ...]
    drop: Drop = "branch"


def transformer_block(name: str, layer: nn.Module) -> Optional[ResidualBlock]:
    """The block of a transformer layer of a known family (:data:`TRANSFORMER_BRANCHES`): its branch outputs, those
    the layer has; None for another module."""
    layouts = TRANSFORMER_BRANCHES.get(type(layer).__name__)
    if layouts is None:
        return None
    modules = dict(layer.named_modules())
    for layout in layouts:
        outputs = tuple(f"{name}.{r}" if name else r for r in layout if r in modules)
        if outputs:
            return ResidualBlock(name, outputs)
    return ResidualBlock(name, (name,), "layer")  # a layout we do not know: the layer dropped whole


def _named_block(name: str, module: nn.Module) -> list[ResidualBlock]:
    """The blocks of a module a ``blocks`` pattern names: a known transformer layer's branches; for a container of
    layers (``nn.ModuleList`` / ``nn.Sequential``, ``"bert.encoder.layer"``), each layer's (a layer of an unknown
    family dropped whole, LayerDrop); else the module's own output as the branch."""
    if isinstance(module, (nn.ModuleList, nn.Sequential)):
        children = [(f"{name}.{child}", layer) for child, layer in module.named_children()]
        return [transformer_block(n, layer) or ResidualBlock(n, (n,), "layer") for n, layer in children]
    return [transformer_block(name, module) or ResidualBlock(name, (name,))]


def _is_drop_path_slot(name: str, module: nn.Module) -> bool:
    short = name.rpartition(".")[2]
    return type(module).__name__ in DROP_PATH_CLASSES or (
        isinstance(module, nn.Identity) and short.startswith("drop_path")
    )


def find_residual_blocks(model: nn.Module, patterns: Optional[Sequence[str]] = None) -> list[ResidualBlock]:
    """Residual blocks of ``model`` in depth order.

    With ``patterns`` (glob patterns of module names), each matching module is one block: a transformer layer of a known
    family (:data:`TRANSFORMER_BRANCHES`) is dropped per branch; a container of layers (``"bert.encoder.layer"``) gives
    one block per layer (a layer of an unknown family dropped whole: LayerDrop); any other module's output is the branch
    dropped. Otherwise, found automatically: drop-path slots (timm ``DropPath``, torchvision ``StochasticDepth``, or
    timm's ``nn.Identity`` placeholders named ``drop_path*`` when built with ``drop_path_rate=0``), grouped by parent
    block; failing those, transformer layers of the known families (BERT/RoBERTa-style encoders, GPT-2 decoders, HF
    ViT, ``nn.TransformerEncoderLayer``/``DecoderLayer``), per branch; failing those, residual branches (the demo
    ResNet's ``branch`` modules, torchvision's ``BasicBlock`` / ``Bottleneck``).

    Raises:
        ValueError: if a pattern matches no module.
    """
    names = [n for n, _ in model.named_modules()]
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"`blocks` pattern {pattern!r} matches no module of the model.")
        modules = dict(model.named_modules())
        named = [n for n in names if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return [block for n in named for block in _named_block(n, modules[n])]
    slots: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if _is_drop_path_slot(name, module):
            slots.setdefault(name.rpartition(".")[0], []).append(name)
    if slots:
        return [ResidualBlock(parent, tuple(outputs)) for parent, outputs in slots.items()]
    layers = [block for name, module in model.named_modules() if (block := transformer_block(name, module))]
    if layers:
        return layers
    return [ResidualBlock(b.name, (b.output,)) for b in find_residual_branches(model)]


def existing_drop_path_rates(model: nn.Module) -> list[RateSlot]:
    """The rate attributes of drop-path modules already in ``model`` (timm ``DropPath``, torchvision
    ``StochasticDepth``): set them to 0 while hooks drop, or the branch would be dropped twice."""
    return [
        RateSlot(name, module, DROP_PATH_CLASSES[type(module).__name__])
        for name, module in model.named_modules()
        if type(module).__name__ in DROP_PATH_CLASSES
    ]


class DropPathHooks:
    """Forward hooks that apply :func:`drop_path` to the branch outputs of ``blocks``, in training mode only.

    Args:
        model: the model holding the blocks.
        blocks: the blocks, in depth order; block ``l`` is dropped with ``rates[l]``.
        per: ``sample`` (a draw per sample) or ``batch`` (one draw per branch for the whole mini-batch).

    Example::

        hooks = DropPathHooks(model, find_residual_blocks(model)).attach()
        hooks.set_rates(block_drop_rates(0.2, len(hooks.blocks)))
    """

    def __init__(self, model: nn.Module, blocks: Sequence[ResidualBlock], per: Per = "sample") -> None:
        check_choice("per", per, PERS)
        self.model = model
        self.blocks = list(blocks)
        self.per = per
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.rates = torch.zeros(len(self.blocks), device=device)
        self._written: Optional[list[float]] = None  # the rates last copied into ``rates``
        self._handles: list[RemovableHandle] = []

    def attach(self) -> DropPathHooks:
        modules = dict(self.model.named_modules())
        for index, block in enumerate(self.blocks):
            for output in block.outputs:
                hook = self._layer_hook(index) if block.drop == "layer" else self._hook(index)
                self._handles.append(modules[output].register_forward_hook(hook, with_kwargs=block.drop == "layer"))
        forget_compiled_code(self.model)  # code compiled before the hooks would never call them
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._handles:
            forget_compiled_code(self.model)  # code compiled with the hooks would go on calling them
        self._handles.clear()

    def _hook(self, index: int):  # noqa: ANN202
        def hook(module: nn.Module, _inputs: object, output: Any) -> Any:
            if not module.training:
                return None
            if isinstance(output, tuple):  # GPT-2's attention: (branch, weights, ...)
                return (drop_path(output[0], self.rates[index], self.per), *output[1:])
            return drop_path(output, self.rates[index], self.per)

        return hook

    def _layer_hook(self, index: int):  # noqa: ANN202
        """LayerDrop: with probability ``rates[index]`` (per sample or per mini-batch) the layer's output is its input,
        no rescaling (Fan et al. 2019). The input is the first positional argument or ``hidden_states``."""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not module.training:
                return None
            given = args[0] if args else kwargs.get("hidden_states")
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(given, torch.Tensor) or not isinstance(out, torch.Tensor) or given.shape != out.shape:
                raise ValueError(
                    f"StochasticDepth's LayerDrop needs the layer {type(module).__name__} to map a tensor (its first"
                    " argument or `hidden_states`) to a tensor of the same shape; name its residual branches in"
                    " `blocks` instead."
                )
            shape = ((out.shape[0] if self.per == "sample" else 1),) + (1,) * (out.ndim - 1)
            keep = torch.rand(shape, device=out.device, dtype=torch.float32) >= self.rates[index]
            kept = torch.where(keep, out, given.to(out.dtype))
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        return hook

    def set_rates(self, rates: Sequence[float]) -> None:
        """Write the per-block drop rates into the rates tensor, in place: nothing when they did not change (a constant
        schedule, the micro-batches of one step), else one asynchronous host-to-device copy (``non_blocking``: the
        host does not wait for the device's queue)."""
        rates = [float(r) for r in rates]
        if rates == self._written:
            return
        self.rates.copy_(torch.tensor(rates, dtype=self.rates.dtype), non_blocking=True)
        self._written = rates


__all__ = [
    "DropPath",
    "DropPathHooks",
    "ResidualBlock",
    "TRANSFORMER_BRANCHES",
    "drop_path",
    "existing_drop_path_rates",
    "find_residual_blocks",
]
