"""Dtypes of the measurements, whatever the model's (pure PyTorch, no Lightning).

Sums of squares over many values are accumulated in float64 where the device has it (CPU, CUDA) and in float32 where it
does not (Apple MPS has no float64: a float64 tensor there raises). Per-sample quantities computed from half-precision
activations (``bf16-true``, ``16-true``) are upcast to float32 before they are squared and summed: bfloat16 keeps 8
significant bits, so a sum of squares in it loses the small terms.
"""

from __future__ import annotations

from typing import Union

import torch

#: Device types without float64 support.
NO_FLOAT64_DEVICES = {"mps"}


def accumulation_dtype(device: Union[torch.device, str]) -> torch.dtype:
    """float64 where ``device`` supports it, else float32."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64


def accumulate(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the accumulation dtype of its device."""
    return t.to(accumulation_dtype(t.device))


def upcast(t: torch.Tensor) -> torch.Tensor:
    """A half-precision floating tensor in float32; any other tensor unchanged."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


__all__ = ["NO_FLOAT64_DEVICES", "accumulate", "accumulation_dtype", "upcast"]
