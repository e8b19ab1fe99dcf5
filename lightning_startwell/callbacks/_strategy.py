"""Sharded strategies (FSDP, DeepSpeed, ModelParallel): one check, called by each callback in ``setup(stage="fit")``.

Under a sharded strategy each rank holds a slice of the parameters (and of their gradients): a norm, a distance or a
per-layer statistic computed on it and never reduced over the shards is a silent wrong number, and a forward pass run
on some ranks only is a hang. A callback that has not been shown correct there refuses the strategy at fit start,
before anything changes (docs/accelerators.md, "Sharded strategies", says which and why).
"""

from __future__ import annotations

from typing import Any, Optional

#: Lightning's strategies that shard parameters; a subclass counts as its base.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")

DEFAULT_REMEDY = "Train with `strategy=\"ddp\"` or on a single device, or leave this callback out of the run."


def _lightning_classes() -> tuple[type, ...]:
    """Lightning's sharded strategy classes that import here (imported late: DeepSpeed's module may fail to load)."""
    try:
        from lightning.pytorch import strategies
    except ImportError:
        return ()
    # getattr: an older Lightning may lack one of them
    return tuple(getattr(strategies, name) for name in SHARDED_STRATEGIES if hasattr(strategies, name))


def sharded_strategy(strategy: Any) -> Optional[str]:
    """The sharded strategy ``strategy`` is (``"FSDPStrategy"``, ``"DeepSpeedStrategy"`` or ``"ModelParallelStrategy"``,
    a subclass counting as its base), or None. Checked with ``isinstance`` against Lightning's classes, and by the
    names of the classes ``strategy`` derives from where those cannot be imported."""
    for cls in _lightning_classes():
        if isinstance(strategy, cls):
            return cls.__name__
    for cls in type(strategy).__mro__:
        if cls.__name__ in SHARDED_STRATEGIES:
            return cls.__name__
    return None


def refuse_sharded(trainer: Any, who: str, why: str, remedy: str = DEFAULT_REMEDY) -> None:
    """Raise a ``ValueError`` naming the strategy, ``why`` ``who`` cannot run under it, and ``remedy``, when the
    trainer's strategy shards the parameters; return otherwise. Call it in ``setup(stage="fit")``,
    before anything changes."""
    kind = sharded_strategy(getattr(trainer, "strategy", None))
    if kind is None:
        return
    shown = type(trainer.strategy).__name__
    named = shown if shown == kind else f"{shown} (a subclass of {kind})"
    raise ValueError(f"{who} does not support `strategy`={named}: {why}. {remedy}")


__all__ = ["DEFAULT_REMEDY", "SHARDED_STRATEGIES", "refuse_sharded", "sharded_strategy"]
