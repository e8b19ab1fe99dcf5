"""Forward and backward signal propagation, layer by layer (pure PyTorch, no Lightning).

The lecture's condition (1) asks that the variance of the pre-activations z^l stay the same through depth in the forward
pass, and that of the errors delta^l = dL/dz^l stay the same in the backward pass (exercise 1: dL/dw^l = a^{l-1}
delta^l, so a vanishing delta starves the first layers of gradient). :class:`SignalRecorder` measures both on a real
step: a forward hook on each layer takes the moments of its output and registers a tensor hook on that output for the
gradient. Tensor hooks on layer outputs, unlike module full-backward hooks, work with in-place ops after the layer
(torchvision's ``ReLU(inplace=True)``, ``out += identity``).

Moments are kept as float64 sums (float32 on a device without float64) on the layer's device, reduced from the values
in place (no float64 copy of an activation or a gradient) and with no host transfer per layer, so sums from several
processes can be added before the variance is taken. Under a ``GradScaler`` (``16-mixed``) the recorded gradients are
scaled: :func:`unscale_backward` divides their moments by the scale, on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_startwell._precision import accumulation_dtype

#: Layers whose parameters pack several matrices and whose output is a tuple, the layer's output first: recurrent
#: layers (``output, h_n`` or ``output, (h_n, c_n)``) and ``nn.MultiheadAttention`` (``attn_output, weights``).
PACKED_LAYERS = (nn.RNNBase, nn.MultiheadAttention)


def layer_output(layer: nn.Module, output: object) -> object:
    """What a layer outputs as its signal: the first element of a packed layer's tuple (see :data:`PACKED_LAYERS`),
    else the output itself."""
    if isinstance(layer, PACKED_LAYERS) and isinstance(output, tuple) and output:
        return output[0]
    return output

DIRECTIONS = ("forward", "backward")


def moments(x: torch.Tensor) -> torch.Tensor:
    """``[count, sum, sum of squares]`` of all elements of ``x``, in the accumulation dtype of its device (float64
    where it has it), on that device: reductions that convert as they read, no converted copy of ``x``."""
    x = x.detach()
    dtype = accumulation_dtype(x.device)
    count = torch.full((), x.numel(), dtype=dtype, device=x.device)  # a fill kernel, not a host-to-device copy
    return torch.stack([count, x.sum(dtype=dtype), torch.linalg.vector_norm(x, dtype=dtype).square()])


def unscale_backward(stacked: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``(layers, 2, 3)`` moments whose backward row was recorded on gradients multiplied by ``scale`` (a GradScaler's,
    a 0-d tensor on the device), with that row's sum divided by ``scale`` and its sum of squares by ``scale^2``: the
    moments of the true gradients, whatever the scale at this step. No host sync; None leaves them as they are."""
    if scale is None:
        return stacked
    factors = torch.ones(2, 3, dtype=stacked.dtype, device=stacked.device)
    scale = scale.to(stacked.dtype)
    factors[1, 1], factors[1, 2] = scale.reciprocal(), scale.square().reciprocal()
    return stacked * factors


def variance_from_moments(m: torch.Tensor) -> torch.Tensor:
    """Unbiased variance from ``[..., 3]`` moments: (sum_sq - sum^2 / n) / (n - 1); NaN where n < 2."""
    count, total, total_sq = m[..., 0], m[..., 1], m[..., 2]
    var = (total_sq - total.square() / count) / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan")))


class SignalRecorder:
    """Accumulates, per layer, the moments of its outputs (forward) and of the gradients w.r.t. them (backward).

    Hooks exist only between :meth:`attach` and :meth:`detach` (or inside a ``with`` block).

    Args:
        layers: the layers to watch, by name.
        keep_values: also keep a flat copy of up to ``keep_values`` output and gradient values per layer (for
            histograms); 0 keeps none.

    Example::

        with SignalRecorder(layers) as recorder:
            model(x).logsumexp(-1).sum().backward()
        forward_var, backward_var = recorder.variances()
    """

    def __init__(self, layers: dict[str, nn.Module], keep_values: int = 0) -> None:
        self.layers = layers
        self.keep_values = keep_values
        self._moments: dict[tuple[str, str], torch.Tensor] = {}
        self.values: dict[tuple[str, str], torch.Tensor] = {}
        self._forward_handles: list[RemovableHandle] = []  # the layers' forward hooks
        self._handles: list[RemovableHandle] = []  # the gradient hooks on the outputs recorded

    def attach(self) -> SignalRecorder:
        for name, layer in self.layers.items():
            self._forward_handles.append(layer.register_forward_hook(self._forward_hook(name)))
        return self

    def stop_forward(self) -> None:
        """Remove the forward hooks only: later forward passes are not recorded, while the outputs recorded so far
        still report their gradients (until :meth:`detach`)."""
        for handle in self._forward_handles:
            handle.remove()
        self._forward_handles.clear()

    def detach(self) -> None:
        self.stop_forward()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> SignalRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _add(self, direction: str, name: str, x: torch.Tensor) -> None:
        key = (direction, name)
        m = moments(x)
        self._moments[key] = self._moments[key] + m if key in self._moments else m
        if self.keep_values and key not in self.values:  # kept on the device: moved to the host once, when written
            self.values[key] = x.detach().flatten()[: self.keep_values].float().clone()

    def _forward_hook(self, name: str):  # noqa: ANN202
        def hook(layer: nn.Module, _inputs: object, output: object) -> None:
            output = layer_output(layer, output)
            if not isinstance(output, torch.Tensor):  # a PackedSequence, a container: not a signal we can read
                return
            self._add("forward", name, output)
            if output.requires_grad and self._forward_handles:
                self._handles.append(output.register_hook(lambda grad: self._add("backward", name, grad)))

        return hook

    def names(self) -> list[str]:
        """Layers that produced an output, in the order they first ran."""
        return list(dict.fromkeys(name for direction, name in self._moments if direction == "forward"))

    def stacked_moments(
        self, names: Optional[Sequence[str]] = None, device: Optional[torch.device] = None
    ) -> torch.Tensor:
        """Moments as one ``(layers, 2, 3)`` tensor (direction 0 forward, 1 backward; zeros where nothing was seen),
        ready for one all-reduce across processes: on ``device`` (default: where the moments are, else the CPU), which a
        collective needs whether or not this process recorded anything (NCCL takes CUDA tensors only)."""
        names = self.names() if names is None else names
        if device is None:
            device = next(iter(self._moments.values())).device if self._moments else torch.device("cpu")
        dtype = accumulation_dtype(device)
        zeros = torch.zeros(3, dtype=dtype, device=device)

        def placed(m: torch.Tensor) -> torch.Tensor:  # a call of .to() only where it moves something
            return m if (m.device, m.dtype) == (zeros.device, dtype) else m.to(device, dtype)

        rows = [torch.stack([placed(self._moments.get((d, name), zeros)) for d in DIRECTIONS]) for name in names]
        return torch.stack(rows) if rows else torch.zeros(0, 2, 3, dtype=dtype, device=device)

    def variances(self) -> tuple[dict[str, float], dict[str, float]]:
        """Variance of the outputs and of their gradients per layer, in forward order."""
        names = self.names()
        return variances_by_name(names, self.stacked_moments(names))


def variances_by_name(names: Sequence[str], stacked: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward variance per layer from ``(layers, 2, 3)`` moments (one host transfer)."""
    var = variance_from_moments(stacked).cpu().tolist()
    return {n: v[0] for n, v in zip(names, var, strict=True)}, {n: v[1] for n, v in zip(names, var, strict=True)}


def propagation_ratios(forward: dict[str, float], backward: dict[str, float]) -> tuple[float, float]:
    """Summary of a measurement: Var[z^last] / Var[z^first] (forward) and Var[delta^first] / Var[delta^last] (backward:
    what reaches the first layer over what left the last). 1 is perfect propagation; << 1 vanishing, >> 1 exploding."""
    f, b = list(forward.values()), list(backward.values())
    forward_ratio = f[-1] / f[0] if f and f[0] > 0 else float("nan")
    backward_ratio = b[0] / b[-1] if b and b[-1] > 0 else float("nan")
    return forward_ratio, backward_ratio


__all__ = [
    "SignalRecorder",
    "moments",
    "propagation_ratios",
    "unscale_backward",
    "variance_from_moments",
    "variances_by_name",
]
