"""Finding every dropout rate a model holds, and setting it (pure PyTorch, no Lightning).

Covered: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` (attribute ``p``), the float
``dropout`` of ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer``/``DecoderLayer`` are fully covered: their
``dropout*`` modules and ``self_attn.dropout``), and float attributes named by the user (``"blocks.*.attn.drop_p"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class RateSlot:
    """One float rate: ``getattr(module, attr)`` of the module named ``module_name``."""

    module_name: str
    module: nn.Module
    attr: str

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    def get(self) -> float:
        return float(getattr(self.module, self.attr))

    def set(self, rate: float) -> None:
        setattr(self.module, self.attr, rate)


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def find_dropout(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    attributes: Optional[Sequence[str]] = None,
) -> list[RateSlot]:
    """Every dropout rate of ``model``, filtered by glob patterns on module names, plus the named float ``attributes``.

    Raises:
        ValueError: if an ``include`` or ``attributes`` pattern matches nothing.
    """
    slots = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            slots.append(RateSlot(name, module, "p"))
        elif isinstance(module, nn.MultiheadAttention):
            slots.append(RateSlot(name, module, "dropout"))
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
            RateSlot(name, module, attr)
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
