"""Per-layer closed forms of per-sample squared gradient norms, from a layer's input and its output gradient
(see the package doc). Adding a layer type means a rule here and a line in :func:`_closed_form`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.grad import conv1d_weight, conv2d_weight

from lightning_startwell._precision import upcast


def _per_sample_sq_norm(g: torch.Tensor) -> torch.Tensor:
    # A reduction (no squared copy of g), at least in float32 (no upcast copy of a half-precision g either).
    return torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.promote_types(g.dtype, torch.float32)).square()


def _chunk_samples(per_sample: int, like: torch.Tensor) -> int:
    """Samples per chunk of per-sample intermediates (``per_sample`` numbers each): at most 2^25 numbers on an
    accelerator, 2^18 (1 MiB of float32) on CPU, where fresh multi-MiB buffers per layer cost more in page faults than
    the arithmetic (demo ResNet, batch 128: 112 vs 90 ms and 110 vs 76 ms in two runs; docs/benchmarks.md)."""
    budget = 2**18 if like.device.type == "cpu" else 2**25
    return max(1, budget // per_sample)


def _sequence_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||D_i^T A_i||_F^2 per sample for A (N, T, d) and D (N, T, p).

    Ghost norm <A_i A_i^T, D_i D_i^T>_F costs T^2 (d + p) per sample, materialising D_i^T A_i costs T p d: the cheaper
    one is used, over chunks of samples so that the intermediates (T^2 or p d numbers per sample) stay bounded.
    """
    n, t, dim_a = a.shape
    dim_d = d.shape[2]
    ghost = t * (dim_a + dim_d) <= dim_a * dim_d
    per_sample = t * t if ghost else dim_a * dim_d
    step = _chunk_samples(per_sample, a)
    norms = []
    for s in range(0, n, step):
        a_s, d_s = upcast(a[s : s + step]), upcast(d[s : s + step])
        if ghost:
            norms.append((a_s @ a_s.transpose(1, 2) * (d_s @ d_s.transpose(1, 2))).flatten(1).sum(1))
        else:
            norms.append(_per_sample_sq_norm(d_s.transpose(1, 2) @ a_s))
    return torch.cat(norms)


def _linear_norms(layer: nn.Linear, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        norms = _per_sample_sq_norm(x) * _per_sample_sq_norm(delta)
        return norms + _per_sample_sq_norm(delta) if layer.bias is not None else norms
    return _sequence_linear_norms(x.flatten(1, -2), delta.flatten(1, -2), layer.bias is not None)


def _sequence_linear_norms(a: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    """A Linear map on sequences, A (N, T, d) to D (N, T, p): the weight by :func:`_sequence_norms`, the bias (if
    any) ||sum_t D_i[t]||^2."""
    norms = _sequence_norms(a, d)
    return norms + _per_sample_sq_norm(d.sum(1)) if bias else norms


def _conv_supported(layer: nn.Module) -> bool:
    return (
        isinstance(layer, (nn.Conv1d, nn.Conv2d))
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
    )


def _conv_norms(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norms of a convolution's weight (and bias) gradients.

    With T output positions, d = C_in/groups x kernel inputs and p = C_out/groups outputs per group: ghost norm over
    unfolded patches when T (d + p) <= p d; otherwise the per-sample weight gradients themselves, computed in one
    grouped convolution-weight backward with the batch folded into the groups (no unfold), in sample chunks.
    """
    groups, t = layer.groups, delta[0, 0].numel()
    dim_a = layer.weight[0].numel()
    dim_d = layer.out_channels // groups
    norms = (
        _conv_ghost_norms(layer, x, delta)
        if t * (dim_a + dim_d) <= dim_a * dim_d
        else _conv_weight_norms(layer, x, delta)
    )
    if layer.bias is not None:
        norms = norms + _per_sample_sq_norm(delta.flatten(2).sum(2))
    return norms


def _conv_ghost_norms(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Unfold the input into patches (N x groups, T, C_in/groups x k) and apply the ghost norm per group."""
    assert not isinstance(layer.padding, str)  # _conv_supported: no padding="same"/"valid"
    one_d = isinstance(layer, nn.Conv1d)
    pair = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
    patches = F.unfold(
        x.unsqueeze(2) if one_d else x,
        kernel_size=pair(layer.kernel_size),
        dilation=pair(layer.dilation),
        padding=(0, layer.padding[0]) if one_d else layer.padding,
        stride=pair(layer.stride),
    )  # (N, C_in x k, T)
    n, groups = x.shape[0], layer.groups
    t = patches.shape[-1]
    a = patches.reshape(n, groups, -1, t).transpose(2, 3).reshape(n * groups, t, -1)
    d = delta.reshape(n, groups, -1, t).transpose(2, 3).reshape(n * groups, t, -1)
    return _sequence_norms(a, d).reshape(n, groups).sum(1)


def _conv_weight_norms(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients by one convolution-weight backward with the samples folded into the groups."""
    weight_grad = conv1d_weight if isinstance(layer, nn.Conv1d) else conv2d_weight
    per_sample = layer.weight.numel()
    step = _chunk_samples(per_sample, x)
    norms = []
    for s in range(0, x.shape[0], step):
        x_s, d_s = x[s : s + step], delta[s : s + step]
        n = x_s.shape[0]
        grads = weight_grad(
            x_s.reshape(1, -1, *x_s.shape[2:]),
            (n * layer.out_channels, *layer.weight.shape[1:]),
            d_s.reshape(1, -1, *d_s.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n * layer.groups,
        )
        norms.append(_per_sample_sq_norm(grads.reshape(n, -1)))
    return torch.cat(norms)


def _batch_norm_norms(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm, x_hat = (x - running_mean) / sqrt(running_var + eps) per channel c: gamma_i[c] =
    sum_s delta_i[c, s] x_hat_i[c, s] (the division by the channel's std comes after the sum), beta_i[c] = sum_s
    delta_i[c, s], the sums over the spatial positions s."""

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).sum(2) if t.ndim > 2 else t

    assert layer.running_mean is not None and layer.running_var is not None  # track_running_stats (_closed_form)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma = per_channel(delta * (x - layer.running_mean.reshape(shape))) / torch.sqrt(layer.running_var + layer.eps)
    return _affine_norms(layer, gamma, per_channel(delta))


def _layer_norm_norms(layer: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the trailing ``normalized_shape``: gamma_i = sum delta_i x_hat_i, beta_i = sum delta_i, the sums
    over the leading (sequence) dimensions of sample i."""
    first = x.ndim - len(layer.normalized_shape)
    dims = tuple(range(first, x.ndim))
    x_hat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + layer.eps)

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1, first - 1).sum(1) if first > 1 else t

    return _affine_norms(layer, per_sample(delta * x_hat), per_sample(delta))


def _affine_norms(layer: nn.Module, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """||gamma_i||^2 + ||beta_i||^2 for a norm layer's scale (always there when it has parameters) and shift."""
    norms = _per_sample_sq_norm(gamma)
    return norms + _per_sample_sq_norm(beta) if layer.bias is not None else norms


def _embedding_norms(layer: nn.Embedding, tokens: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample norms of an embedding table's gradient: row v of g_i is the sum of delta_i[t] over the positions t
    holding token v (none for ``padding_idx``), so ||g_i||^2 = sum_{t, t'} [token_t = token_t'] <delta_i[t],
    delta_i[t']>: the ghost norm with one-hot inputs, T^2 per sample, never a (vocabulary x width) gradient."""
    n = len(tokens)
    tokens = tokens.reshape(n, -1)
    d = delta.reshape(n, tokens.shape[1], -1)
    if layer.padding_idx is not None:
        d = d * (tokens != layer.padding_idx).unsqueeze(-1)
    step = _chunk_samples(tokens.shape[1] ** 2, d)
    norms = []
    for s in range(0, n, step):
        t_s, d_s = tokens[s : s + step], d[s : s + step]
        same = t_s.unsqueeze(2) == t_s.unsqueeze(1)
        norms.append((same * (d_s @ d_s.transpose(1, 2))).flatten(1).sum(1))
    return torch.cat(norms)


def _closed_form(layer: nn.Module) -> Optional[Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The closed-form per-sample norm rule for ``layer``, or None for the vmap fallback (also for a layer with some
    parameters frozen: the closed forms count all of them)."""
    if not all(p.requires_grad for p in layer.parameters(recurse=False)):
        return None
    if isinstance(layer, nn.Linear):
        return _linear_norms
    if _conv_supported(layer):
        return _conv_norms
    if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
        return _batch_norm_norms
    if isinstance(layer, nn.LayerNorm):
        return _layer_norm_norms
    if isinstance(layer, nn.Embedding) and not layer.scale_grad_by_freq:  # that scaling depends on the whole batch
        return _embedding_norms
    return None


def _plain_attention(layer: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` with one packed input projection, no extra key/value biases, all trainable."""
    return (
        isinstance(layer, nn.MultiheadAttention)
        and layer._qkv_same_embed_dim
        and layer.bias_k is None
        and not layer.add_zero_attn
        and all(p.requires_grad for p in layer.parameters())
    )


def _attention_norms(
    layer: nn.MultiheadAttention, args: tuple, kwargs: dict, delta: torch.Tensor
) -> Optional[dict[str, torch.Tensor]]:
    """Per-sample norms of a multi-head attention's input projection ("") and output projection ("out_proj").

    Both projections are Linear layers on sequences: W_in maps query, key and value to Q, K, V (three row blocks of
    W_in) and out_proj maps the attention context C to the output. The context and the gradients dL/dQ, dL/dK, dL/dV
    come from re-running the module itself with identity projections on (Q, K, V), so masks and heads are the
    module's own; then the sequence rule of :func:`_sequence_norms` applies to each block. None for unbatched inputs.
    """
    call = inspect.signature(layer.forward).bind(*args, **kwargs).arguments
    inputs = [call["query"], call["key"], call["value"]]
    if any(t.ndim != 3 for t in inputs):
        return None
    in_bias = layer.in_proj_bias.detach().chunk(3) if layer.in_proj_bias is not None else (None,) * 3
    projected = [
        F.linear(t, w, b).detach().requires_grad_()
        for t, w, b in zip(inputs, layer.in_proj_weight.detach().chunk(3), in_bias, strict=True)
    ]
    eye = torch.eye(layer.embed_dim, dtype=delta.dtype, device=delta.device)
    identity = {"in_proj_weight": eye.repeat(3, 1), "out_proj.weight": eye}
    if layer.in_proj_bias is not None:
        identity["in_proj_bias"] = torch.zeros_like(layer.in_proj_bias)
    if layer.out_proj.bias is not None:
        identity["out_proj.bias"] = torch.zeros_like(layer.out_proj.bias)
    call.update(query=projected[0], key=projected[1], value=projected[2], need_weights=False)
    with torch.enable_grad():  # backward hooks run with grad mode off
        context = functional_call(layer, identity, (), call)[0]
        grads = torch.autograd.grad(context, projected, delta @ layer.out_proj.weight.detach())

    def batch_first(t: torch.Tensor) -> torch.Tensor:
        return t if layer.batch_first else t.transpose(0, 1)

    def linear(a: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
        return _sequence_linear_norms(batch_first(a), batch_first(d), bias)

    has_in_bias = layer.in_proj_bias is not None
    return {
        "": cast(torch.Tensor, sum(linear(a, g, has_in_bias) for a, g in zip(inputs, grads, strict=True))),
        "out_proj": linear(context.detach(), delta, layer.out_proj.bias is not None),
    }
