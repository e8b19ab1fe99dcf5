"""Which module owns which parameters (the "layers" of the per-layer trace), and the tensors a module returns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a module's output (tuples and lists, nested: an LSTM's (out, (h, c)))."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None

def owned_parameters(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Trainable parameters by the module that owns them directly (``recurse=False``); modules owning none are left
    out. These modules are the "layers" of the per-layer trace."""
    owned = {}
    for name, module in model.named_modules():
        params = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        if params:
            owned[name] = params
    return owned


def _parameter_holders(model: nn.Module) -> set[str]:
    """Names of the modules with trainable parameters in their subtree: only these can own or adopt parameters (not
    ReLU, pooling, dropout)."""
    return {n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters())}


def _owners(params: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Parameter names grouped by the (relative) name of the module that owns them."""
    groups: dict[str, list[str]] = {}
    for key in params:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    return groups
