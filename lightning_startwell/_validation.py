"""Argument checks shared by the models, datamodules and callbacks: each error names the argument and what is
accepted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """``value`` must be an int >= ``minimum`` (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``value`` must be True or False (a string or a number such as 0 is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_rate(name: str, value: Any) -> None:
    """``value`` must be a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    """``value`` must be one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {tuple(accepted)}, got {value!r}.")


def check_batch_key(name: str, value: Any, optional: bool = False) -> None:
    """``value`` must name a place in a batch: an int (tuple index) or a str (dict key or field name); None too when
    ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        accepted = "None, an int" if optional else "an int"
        raise ValueError(f"`{name}` must be {accepted} (tuple index) or a str (dict key or field name), got {value!r}.")
