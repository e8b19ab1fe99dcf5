"""Sensory deficits on batched tensors (pure PyTorch, no Lightning), after Achille et al. (2017).

All functions work on the tensor's own device without reading anything back to the host, and return new tensors (the
caller decides where they go). Images are ``(N, C, H, W)``, signals ``(N, C, L)``.

* :func:`blur`: downsample to ``size`` with an antialiased resize, then upsample back (the paper: CIFAR-10 down to 8x8,
  back to 32x32). Detail finer than ``size`` is gone; coarse structure stays.
* :func:`noise`: additive Gaussian noise of standard deviation ``std`` (the input is still there, under the noise).
* :func:`deprivation`: the input replaced by Gaussian noise with the data's mean and standard deviation (the paper's
  sensory deprivation: nothing of the input is left, only its first two moments).
* :func:`vertical_flip`: images upside down (rows reversed); for signals, the signal mirrored about zero (x -> -x),
  the 1-D analogue of flipping the picture vertically. The information is all there, in another form.
* :func:`label_permutation`: classes relabelled by a fixed random permutation, drawn once from a seed; ignored targets
  (``ignore_index``, -100 by default, and any negative target) are kept.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from lightning_startwell._precision import accumulate

Deficit = Literal["blur", "noise", "deprivation", "vertical_flip", "label_permutation"]
DEFICITS: tuple[str, ...] = Deficit.__args__  # type: ignore[attr-defined]


def _check_batched(x: torch.Tensor, what: str) -> None:
    if x.ndim not in (3, 4):
        raise ValueError(
            f"{what} needs images (N, C, H, W) or signals (N, C, L), got a tensor of shape {tuple(x.shape)}."
        )


def check_blur_size(shape: torch.Size, size: int) -> None:
    """``size`` must be >= 1 and no larger than the spatial size of inputs of ``shape``."""
    spatial = tuple(shape[2:])
    if size < 1 or any(size > s for s in spatial):
        raise ValueError(f"`size` must be in [1, {min(spatial)}] for inputs of spatial size {spatial}, got {size!r}.")


def blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample ``x`` to ``size`` (``size x size`` for images) with antialiasing, then upsample back, both bilinear.

    A signal ``(N, C, L)`` is resized as a ``(N, C, 1, L)`` image. ``size`` equal to the input size is the identity.
    ``F.interpolate`` antialiases only when asked (``antialias=True``), which this does for the downsampling.
    """
    _check_batched(x, "blur")
    check_blur_size(x.shape, size)
    image = x.unsqueeze(2) if x.ndim == 3 else x
    height, width = image.shape[-2:]
    small = (1 if x.ndim == 3 else size, size)
    down = F.interpolate(image.float(), size=small, mode="bilinear", antialias=True, align_corners=False)
    up = F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False).to(x.dtype)
    return up.squeeze(2) if x.ndim == 3 else up


def noise(x: torch.Tensor, std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + std * eps`` with ``eps ~ N(0, 1)`` elementwise (``generator`` on ``x``'s device, or the global stream)."""
    if std < 0:
        raise ValueError(f"`noise_std` must be >= 0, got {std!r}.")
    return x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def deprivation(x: torch.Tensor, mean: float, std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise of mean ``mean`` and standard deviation ``std`` in the shape, dtype and device of ``x``; the
    values of ``x`` are not used (``generator`` on ``x``'s device, or the global stream)."""
    if std < 0:
        raise ValueError(f"the deprivation's `std` must be >= 0, got {std!r}.")
    return mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of all the values of ``x`` (computed in float64, or float32 on a device without it),
    the statistics a deprivation keeps."""
    values = accumulate(x.detach())
    return values.mean().item(), values.std().item()


def vertical_flip(x: torch.Tensor) -> torch.Tensor:
    """Images upside down (reverse dim -2); signals ``(N, C, L)`` mirrored about zero (``-x``)."""
    _check_batched(x, "vertical_flip")
    return x.flip(-2) if x.ndim == 4 else -x


def class_permutation(num_classes: int, seed: int) -> torch.Tensor:
    """A random permutation of ``range(num_classes)``, the same for the same seed on any machine."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))


def label_permutation(y: torch.Tensor, permutation: torch.Tensor, ignore_index: Optional[int] = -100) -> torch.Tensor:
    """Class ``c`` becomes ``permutation[c]``; targets equal to ``ignore_index`` (the padding of a per-token target
    tensor, -100 as in ``F.cross_entropy``) and negative targets stay as they are (``None``: only negative ones). Keep
    ``permutation`` on the labels' device: otherwise it is copied there at every call."""
    if permutation.device != y.device:
        permutation = permutation.to(y.device)
    keep = y < 0
    if ignore_index is not None:
        keep = keep | (y == ignore_index)
    return torch.where(keep, y, permutation[y.masked_fill(keep, 0)])


__all__ = [
    "DEFICITS",
    "blur",
    "check_blur_size",
    "class_permutation",
    "deprivation",
    "label_permutation",
    "moments",
    "noise",
    "vertical_flip",
]
