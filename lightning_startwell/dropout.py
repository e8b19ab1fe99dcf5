"""Finding every dropout rate a model holds, and setting it (pure PyTorch, no Lightning).

Covered: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` (attribute ``p``), the float
``dropout`` of ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer``/``DecoderLayer`` are fully covered: their
``dropout*`` modules and ``self_attn.dropout``), the float attention-dropout probabilities of Hugging Face attention
modules (read by the attention function at each call, not held by a dropout module: ``attention_dropout`` of ViT,
Llama, Mistral, CLIP...; ``dropout`` / ``dropout_prob`` of a module whose class name has ``Attention``, as BART's), and
float attributes named by the user (``"blocks.*.attn.drop_p"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

#: Float attributes that hold an attention-dropout probability: on any module (Hugging Face's name for it) ...
ATTENTION_RATE_ANYWHERE = ("attention_dropout",)
#: ... and on a module whose class name contains "Attention" (Hugging Face's BART family, older attention classes).
ATTENTION_RATE_NAMES = ("attention_dropout", "attn_dropout", "dropout", "dropout_prob", "dropout_p", "attn_pdrop")

SlotKind = Literal["module", "attention", "attribute"]


@dataclass(frozen=True)
class RateSlot:
    """One float rate: ``getattr(module, attr)`` of the module named ``module_name``; ``kind`` says how it was found:
    a dropout module's ``p`` (``module``), an attention dropout probability (``attention``: ``nn.MultiheadAttention``'s
    ``dropout``, a Hugging Face attention module's float), or a float named by the user (``attribute``)."""

    module_name: str
    module: nn.Module
    attr: str
    kind: SlotKind = "module"

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    def get(self) -> float:
        return float(getattr(self.module, self.attr))

    def set(self, rate: float) -> None:
        setattr(self.module, self.attr, rate)


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _is_rate(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _module_rates(name: str, module: nn.Module) -> list[RateSlot]:
    """The rates ``module`` itself holds: a dropout module's ``p``; ``nn.MultiheadAttention.dropout``; the attributes
    of :data:`ATTENTION_RATE_NAMES` holding a float in [0, 1] on a Hugging Face-style attention module (see the module
    doc)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return [RateSlot(name, module, "p")]
    if isinstance(module, nn.MultiheadAttention):
        return [RateSlot(name, module, "dropout", "attention")]
    names = ATTENTION_RATE_NAMES if "Attention" in type(module).__name__ else ATTENTION_RATE_ANYWHERE
    return [RateSlot(name, module, a, "attention") for a in names if _is_rate(vars(module).get(a))]


def find_dropout(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    attributes: Optional[Sequence[str]] = None,
) -> list[RateSlot]:
    """Every dropout rate of ``model`` in module order (dropout modules' ``p``, attention dropout probabilities),
    filtered by glob patterns on module names, plus the named float ``attributes``.

    Raises:
        ValueError: if an ``include`` or ``attributes`` pattern matches nothing.
    """
    slots = [slot for name, module in model.named_modules() for slot in _module_rates(name, module)]
    for pattern in include or ():
        if not any(fnmatch.fnmatchcase(s.module_name, pattern) for s in slots):
            raise ValueError(
                f"`include` pattern {pattern!r} matches no dropout module; they are {[s.name for s in slots]}."
            )
    if include:
        slots = [s for s in slots if _matches(s.module_name, include)]
    slots = [s for s in slots if not _matches(s.module_name, exclude)]
    for pattern in attributes or ():
        module_pattern, _, attr = pattern.rpartition(".")
        found = [
            RateSlot(name, module, attr, "attribute")
            for name, module in model.named_modules()
            if fnmatch.fnmatchcase(name, module_pattern) and isinstance(getattr(module, attr, None), float)
        ]
        if not found:
            raise ValueError(f"`attributes` pattern {pattern!r} matches no float attribute of a module.")
        slots += [s for s in found if s.name not in {t.name for t in slots}]
    return slots


def set_rates(slots: Sequence[RateSlot], rate: float) -> None:
    """Set every slot to ``rate``."""
    for slot in slots:
        slot.set(rate)


__all__ = ["RateSlot", "find_dropout", "set_rates"]
