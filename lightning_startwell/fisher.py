"""Trace of the Fisher information, total and per layer, from exact per-sample gradient norms (pure PyTorch).

For a classifier p_w(y|x) (softmax of the logits; a Gaussian N(output, s^2 I) for regression), Achille et al. (2017)
follow

    tr F = E_x E_{y ~ p_w(.|x)} || grad_w log p_w(y|x) ||^2,

per layer the same sum restricted to that layer's parameters. Three Fishers:

* ``true``: y drawn once per input from the model's own predictive distribution (seeded);
* ``empirical``: y = the dataset label (a different quantity: it measures the fit to the labels);
* ``exact``: the expectation over y in closed form, sum_c p_c ||grad log p_c||^2 (C backward passes; for the Gaussian,
  sum_k ||grad output_k||^2 / s^2, one pass per output dimension).

The norms are *per sample* (squaring the gradient of a batch mean would be about N times too small). The default method
never materialises per-sample gradients where a closed form exists. Forward hooks keep each layer's input and register a
tensor hook on its output, which receives delta_i = d(sum_i log p(y_i|x_i))/d layer output (tensor hooks on outputs, unlike
module full-backward hooks, survive torchvision's in-place ReLU and ``out += identity``); then, per sample i:

* Linear on (N, d) inputs: ||g_i||^2 = ||a_i||^2 ||delta_i||^2 (+ ||delta_i||^2 for the bias);
* Linear on sequences and Conv1d/Conv2d (inputs unfolded to A_i, T x d; output gradients D_i, T x p):
  ||D_i^T A_i||_F^2, either materialised (T p d operations) or as <A_i A_i^T, D_i D_i^T>_F ("ghost norm", T^2 (d + p)
  operations), whichever is cheaper; bias ||sum_t D_i[t]||^2;
* BatchNorm (eval mode, running statistics) and LayerNorm: gamma_i = sum delta_i * x_hat_i, beta_i = sum delta_i;
* Embedding: the ghost norm with one-hot inputs, sum_{t,t'} [token_t = token_t'] <delta_i[t], delta_i[t']>;
* MultiheadAttention: the module re-run on its projected Q, K, V with identity projections gives the context and
  dL/dQ, dL/dK, dL/dV; both projections are then Linear layers on sequences;
* any other module with its own parameters, or with some of them frozen: per-sample vector-Jacobian products with
  ``torch.func.vmap`` over that module alone, from its recorded inputs (split by sample where their first dimension is
  the batch, keyword arguments such as padding masks included) and output gradients.

A parameter used by several modules, or a module called more than once in a forward pass, makes per-use norms wrong
(the per-sample gradient is the sum over uses): then the whole model falls back to ``torch.func`` per-sample gradients
(``method="vmap"``), in chunks. So does a model whose own forward uses a parameter directly (a learned position),
when a chunk of its per-sample gradients is small: that parameter needs a per-sample pass over the whole model anyway.

The measurement runs in eval mode (BatchNorm with running statistics: per-sample gradients are undefined when samples
are normalised together), in float32 with autocast off, never writes ``.grad``, and restores the mode of every module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from lightning_startwell._validation import check_choice, check_int
from lightning_startwell.model_call import (
    Forward,
    call_arguments,
    logits,
    map_tensors,
    num_samples,
    routed,
    run,
    select,
    tensor_leaves,
    with_leaves,
)

FisherKind = Literal["true", "empirical", "exact"]
Method = Literal["auto", "vmap"]
Likelihood = Literal["categorical", "gaussian"]
LIKELIHOODS: tuple[str, ...] = Likelihood.__args__  # type: ignore[attr-defined]
FISHERS: tuple[str, ...] = FisherKind.__args__  # type: ignore[attr-defined]
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FisherTrace:
    """Trace of the Fisher information averaged over ``num_samples`` inputs: ``total`` and its split ``per_layer``
    (module name -> the part of the trace carried by that module's own parameters; they add up to ``total``)."""

    total: float
    per_layer: dict[str, float]
    num_samples: int


def _per_sample_sq_norm(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()  # a reduction: no squared copy of g


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
        a_s, d_s = a[s : s + step], d[s : s + step]
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
    norms = _conv_ghost_norms(layer, x, delta) if t * (dim_a + dim_d) <= dim_a * dim_d else _conv_weight_norms(layer, x, delta)
    if layer.bias is not None:
        norms = norms + _per_sample_sq_norm(delta.flatten(2).sum(2))
    return norms


def _conv_ghost_norms(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Unfold the input into patches (N x groups, T, C_in/groups x k) and apply the ghost norm per group."""
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
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(layer, nn.Conv1d) else torch.nn.grad.conv2d_weight
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
        F.linear(t, w, b).detach().requires_grad_() for t, w, b in zip(inputs, layer.in_proj_weight.detach().chunk(3), in_bias)
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
        "": sum(linear(a, g, has_in_bias) for a, g in zip(inputs, grads)),
        "out_proj": linear(context.detach(), delta, layer.out_proj.bias is not None),
    }


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


def _vjp_norms(
    layer: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict, delta: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Per-sample ||J_params(layer)^T delta_i||^2, by vmap over samples of a vector-Jacobian product of the layer
    alone (``params``: names relative to the layer). Positional and keyword tensors whose first dimension is the
    batch (inputs, per-sample masks) are split by sample; the others are passed whole. Returns (N, owners): one column
    per module owning parameters, in the order of :func:`_owners`."""
    n = delta.shape[0]

    def is_batched(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n

    batched = {
        "args": {i: a for i, a in enumerate(args) if is_batched(a)},
        "kwargs": {k: v for k, v in kwargs.items() if is_batched(v)},
    }
    owners = _owners(params)

    def one(sample: dict[str, dict], d: torch.Tensor) -> torch.Tensor:
        def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
            call_args = tuple(sample["args"][i][None] if i in sample["args"] else a for i, a in enumerate(args))
            call_kwargs = {k: sample["kwargs"][k][None] if k in sample["kwargs"] else v for k, v in kwargs.items()}
            return _first_tensor(functional_call(layer, p, call_args, call_kwargs))[0]

        _, pullback = vjp(f, params)
        (grads,) = pullback(d)
        return torch.stack([sum(grads[k].square().sum() for k in keys) for keys in owners.values()])

    chunks = []
    for s in range(0, n, chunk):
        sample = {group: {k: v[s : s + chunk] for k, v in values.items()} for group, values in batched.items()}
        chunks.append(_vmap_or_loop(one, sample, delta[s : s + chunk]))
    return torch.cat(chunks)


def _vmap_or_loop(fn: Callable, *args: Any) -> Any:
    """``vmap(fn)(*args)`` over dim 0 of every tensor in ``args`` (tensors, or dicts of dicts or of tensors); where
    torch.func cannot batch a kernel (recurrent layers), one call per sample, the results stacked."""
    try:
        return vmap(fn)(*args)
    except RuntimeError:
        n = len(args[-1])  # the last argument is a tensor of samples

        def pick(value: Any, i: int) -> Any:
            if isinstance(value, dict):
                return {k: pick(v, i) for k, v in value.items()}
            return [pick(v, i) for v in value] if isinstance(value, list) else value[i]

        rows = [fn(*(pick(a, i) for a in args)) for i in range(n)]
        if isinstance(rows[0], dict):
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return torch.stack(rows)


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


class _NormRecorder:
    """Hooks that turn each backward pass into per-sample squared gradient norms per module (see the module doc).

    Every module is watched for calls; a module owning parameters keeps its inputs and hooks its output's gradient.
    Parameters of a module that never ran (``nn.MultiheadAttention.out_proj`` is used functionally by its parent) are
    adopted by the nearest ancestor that ran, whose norms then come from the vmap fallback over all of them.
    """

    def __init__(self, model: nn.Module, chunk: int) -> None:
        self.model = model
        self.chunk = chunk
        self.own = owned_parameters(model)
        self._holders = _parameter_holders(model)  # only these keep their inputs and hook their output
        self.calls: dict[str, int] = {}
        self.adopted: dict[str, dict[str, torch.Tensor]] = {}
        self.norms: dict[str, torch.Tensor] = {}
        self.weight: Optional[torch.Tensor] = None  # per-sample weights of the current backward (exact Fisher)
        self.last_pass = True  # the last backward drops each layer's inputs once used, as autograd frees its own
        self._inputs: dict[str, tuple[tuple, dict]] = {}
        self._hooked: set[str] = set()
        self._entries: dict[str, torch.Tensor] = {}
        self.partial: set[str] = set()  # modules whose other outputs got gradients: their first one is not all
        self.token_inputs: set[int] = set()  # ids of the model's inputs that are not differentiable (token ids, masks)
        self._enabled = True

    @contextmanager
    def attached(self) -> Iterator[_NormRecorder]:
        handles = [
            module.register_forward_hook(self._forward_hook(name), with_kwargs=True)
            for name, module in self.model.named_modules()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _forward_hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._enabled:
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            out = _first_tensor(output)
            if out is None or not out.requires_grad or name not in self._holders:
                return
            self._inputs[name] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)
            self._hooked.add(name)
            called_with = (*args, *kwargs.values())
            if any(id(a) in self.token_inputs for a in called_with) and not any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in called_with
            ):
                self._entries[name] = out  # the model's differentiable path starts here (an embedding of the ids)
            out.register_hook(lambda delta: self._backward(name, module, delta))
            for other in _tensors(output):
                if other is not out and other.requires_grad:  # a second output (attention weights, an RNN's state)
                    other.register_hook(lambda _: self.partial.add(name))

        return hook

    def adopt_silent_parameters(self) -> bool:
        """After the forward pass: hand the parameters of modules that never ran to their nearest ancestor that did.
        False if some have no such ancestor (the caller falls back to whole-model vmap)."""
        for name, params in self.own.items():
            if name in self.calls:
                continue
            parts = name.split(".")
            ancestors = [".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1)]
            ancestor = next((a for a in ancestors if a in self.calls), None)
            if ancestor is None:
                return False
            prefix = name[len(ancestor) + 1 :] if ancestor else name
            self.adopted.setdefault(ancestor, {}).update({f"{prefix}.{k}": p for k, p in params.items()})
        return True

    def _backward(self, name: str, module: nn.Module, delta: torch.Tensor) -> None:
        args, kwargs = self._inputs.pop(name) if self.last_pass else self._inputs[name]
        params = {k: p.detach() for k, p in {**self.own.get(name, {}), **self.adopted.get(name, {})}.items()}
        if not params:
            return
        rule = _closed_form(module) if name not in self.adopted else None
        if rule is not None and args and isinstance(args[0], torch.Tensor):
            self._add(name, rule(module, args[0], delta))
            return
        self._enabled = False  # the attention rule and the fallback re-run the module: its submodules must not record
        try:
            split = _attention_norms(module, args, kwargs, delta.detach()) if _plain_attention(module) else None
            if split is None:
                norms = _vjp_norms(module, params, args, kwargs, delta.detach(), self.chunk)
                split = {owner: norms[:, column] for column, owner in enumerate(_owners(params))}
        finally:
            self._enabled = True
        for owner, norms in split.items():
            self._add(f"{name}.{owner}" if name and owner else name or owner, norms)

    def _add(self, name: str, norms: torch.Tensor) -> None:
        norms = norms.detach().double()
        if self.weight is not None:
            norms = norms * self.weight
        self.norms[name] = self.norms[name] + norms if name in self.norms else norms

    def entry_outputs(self) -> list[torch.Tensor]:
        """Outputs of the innermost modules called with the model's non-differentiable input itself (an embedding of
        the token ids), the whole model left out. Their outputs are per sample; an embedding of anything else (of
        positions, shared by all samples) is not an entry: its per-sample gradients are not in its output gradient."""
        innermost = [n for n in self._entries if n and not any(o.startswith(f"{n}.") for o in self._entries)]
        return [self._entries[n] for n in innermost]

    def all_reached(self) -> bool:
        """Whether every module owning parameters that produced a differentiable output received its gradient, and
        all of it through that output (none through a second one)."""
        expected = [n for n in self._hooked if n in self.own or n in self.adopted]
        reached = all(n in self.norms or any(k.startswith(f"{n}.") for k in self.norms) for n in expected)
        return reached and not self.partial.intersection(expected)

    def shared(self) -> bool:
        """Whether a parameter belongs to several modules or a module owning parameters ran more than once: per-use
        norms would then be wrong."""
        owners: dict[int, int] = {}
        for params in self.own.values():
            for p in params.values():
                owners[id(p)] = owners.get(id(p), 0) + 1
        reused = any(self.calls.get(n, 0) > 1 for n in self.own)
        return reused or any(c > 1 for c in owners.values())


def check_output(output: torch.Tensor, num_inputs: int, likelihood: str) -> torch.Tensor:
    """The model output as (N, D): (N, C) logits with C >= 2 for ``categorical``, (N, D) or (N,) for ``gaussian``."""
    if isinstance(output, torch.Tensor) and likelihood == "gaussian" and output.ndim == 1 and len(output) == num_inputs:
        return output[:, None]
    ok = isinstance(output, torch.Tensor) and output.ndim == 2 and output.shape[0] == num_inputs
    if not ok or (likelihood == "categorical" and output.shape[1] < 2):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        expected = "(N, C) logits with C >= 2" if likelihood == "categorical" else "(N, D) or (N,) outputs"
        raise ValueError(f"fisher_trace needs the model to return {expected} for N={num_inputs} inputs, got {shape}.")
    return output


def _cotangents(
    output: torch.Tensor,
    fisher: str,
    likelihood: str,
    targets: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    noise_std: float,
) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The backward passes to run, as (v, w): v (N, D) is d log p(y_i | x_i) / d output_i for the label(s) y_i of
    this pass, w (N,) weights its per-sample norms (None: 1).

    Categorical (softmax of logits f): d log p_c / df = e_c - softmax(f); ``exact`` runs every class c weighted by p_c.
    Gaussian N(f, noise_std^2 I): d log p(y) / df = (y - f) / noise_std^2; ``true`` draws y = f + noise_std * eps, so
    v = eps / noise_std; ``exact`` runs every output dimension k with v = e_k / noise_std (tr F = sum_k ||J_k||^2 / s^2).
    """
    f = output.detach().float()
    n, d = f.shape
    eye = torch.eye(d, device=f.device)
    if likelihood == "categorical":
        probs = f.softmax(-1)
        if fisher == "exact":
            return [(eye[c] - probs, probs[:, c].double()) for c in range(d)]
        if fisher == "empirical":
            labels = targets.to(f.device).long()
        else:
            draw = probs.cpu()
            draw[~torch.isfinite(draw).all(1)] = 1.0  # non-finite outputs: any label will do, the trace is non-finite
            labels = torch.multinomial(draw, 1, generator=generator).squeeze(1).to(f.device)
        return [(eye[labels] - probs, None)]
    if fisher == "exact":
        return [(eye[k].expand(n, d) / noise_std, None) for k in range(d)]
    if fisher == "empirical":
        return [((targets.to(f.device).float().reshape(n, d) - f) / noise_std**2, None)]
    eps = torch.randn(n, d, generator=generator).to(f.device)
    return [(eps / noise_std, None)]


def _auto_sums(
    model: nn.Module,
    x: Any,
    cotangents: Callable[[torch.Tensor], list[tuple[torch.Tensor, Optional[torch.Tensor]]]],
    likelihood: str,
    chunk: int,
    forward: Optional[Forward],
) -> Optional[dict[str, torch.Tensor]]:
    """Per-module sums over the batch of per-sample squared norms (weighted and summed over the backward passes), or
    None when the hooks cannot be exact (shared parameters, a layer off the input's path): the caller uses vmap."""
    recorder = _NormRecorder(model, chunk)
    x = map_tensors(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, x)
    leaves = tensor_leaves(x)
    recorder.token_inputs = {id(t) for t in leaves if not t.requires_grad}
    with recorder.attached():
        output = check_output(run(model, x, forward), num_samples(x), likelihood).float()
        if recorder.shared() or not recorder.adopt_silent_parameters():
            return None
        # The backward only has to reach the hooked outputs: differentiate with respect to the float inputs and to the
        # outputs of the modules that embed integer inputs (no weight-gradient kernels run); with neither, with
        # respect to the parameters.
        wrt = [t for t in leaves if t.requires_grad] + recorder.entry_outputs()
        wrt = wrt or [p for p in model.parameters() if p.requires_grad]
        passes = cotangents(output)
        for index, (v, weight) in enumerate(passes):
            recorder.weight, recorder.last_pass = weight, index + 1 == len(passes)
            torch.autograd.grad((output * v).sum(), wrt, retain_graph=index + 1 < len(passes), allow_unused=True)
    if not recorder.all_reached():
        return None
    return {name: norms.sum() for name, norms in recorder.norms.items()}


def _vmap_sums(
    model: nn.Module,
    x: Any,
    cotangents: Callable[[torch.Tensor], list[tuple[torch.Tensor, Optional[torch.Tensor]]]],
    likelihood: str,
    chunk: int,
    forward: Optional[Forward],
) -> dict[str, torch.Tensor]:
    """Per-module sums of per-sample squared norms from ``torch.func`` per-sample gradients, in chunks of samples
    (every input tensor split by sample: masks too)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    owner = {n: n.rpartition(".")[0] for n in params}

    def projected_output(p: dict[str, torch.Tensor], leaves: list[torch.Tensor], vi: torch.Tensor) -> torch.Tensor:
        args, kwargs = call_arguments(with_leaves(x, [t.unsqueeze(0) for t in leaves]), forward)
        out = logits(functional_call(model, (p, buffers), args, kwargs))
        return (out.float().reshape(-1) * vi.reshape(-1)).sum()

    def per_sample_grads(p: dict[str, torch.Tensor], leaves: list, vs: torch.Tensor) -> dict[str, torch.Tensor]:
        return _vmap_or_loop(lambda li, vi: grad(projected_output)(p, li, vi), leaves, vs)

    with torch.no_grad():
        n = num_samples(x)
        output = check_output(run(model, x, forward), n, likelihood)
    leaves = tensor_leaves(x)
    sums: dict[str, torch.Tensor] = {}
    for v, weight in cotangents(output):
        for start in range(0, n, chunk):
            grads = per_sample_grads(params, [t[start : start + chunk] for t in leaves], v[start : start + chunk])
            for name, g in grads.items():
                norms = _per_sample_sq_norm(g).double()
                if weight is not None:
                    norms = norms * weight[start : start + chunk]
                key = owner[name]
                sums[key] = sums[key] + norms.sum() if key in sums else norms.sum()
    return sums


def _whole_model_pass_is_cheaper(model: nn.Module, chunk: int) -> bool:
    """Whether the model's own forward uses a parameter directly (a learned position or class token) while the
    per-sample gradients of a chunk of samples for the whole model are small (at most 2^25 numbers). Such a parameter's
    per-sample gradients need a per-sample pass over the whole model anyway; then one such pass (``method="vmap"``)
    gives every layer at once, cheaper than the hooks' pass plus it. For a larger model the hooks keep memory low."""
    if "" not in owned_parameters(model) or _closed_form(model) is not None or _plain_attention(model):
        return False
    return chunk * sum(p.numel() for p in model.parameters() if p.requires_grad) <= 2**25


def _samples_along_dim_0(model: nn.Module, sample: Any, forward: Optional[Forward]) -> bool:
    """Whether every module with parameters in its subtree is called with and returns tensors that hold the samples
    along dim 0 and nowhere else, as the closed forms and the per-module fallback assume. Seen by running 1 then 2
    copies of ``sample``: a tensor that depends on the batch must go from (1, ...) to (2, ...). A sequence-first layer
    (``nn.TransformerEncoderLayer``'s default layout) or samples folded into dim 0 with something else fail it; a
    sequence-first ``nn.MultiheadAttention`` passes, its rule reads dim 1."""
    holders = _parameter_holders(model)
    shapes: dict[int, dict[str, list]] = {1: {}, 2: {}}

    def record(size: int, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            first_arg = next((a for a in args if isinstance(a, torch.Tensor)), None)
            shapes[size].setdefault(name, []).extend(t.shape for t in (first_arg, _first_tensor(output)) if t is not None)

        return hook

    for size in (1, 2):
        handles = [m.register_forward_hook(record(size, n)) for n, m in model.named_modules() if n in holders]
        try:
            with torch.no_grad():
                copies = map_tensors(lambda t: t.repeat(size, *[1] * (t.ndim - 1)), sample)
                run(model, copies, forward)  # contiguous copies: a model may .view() them
        finally:
            for h in handles:
                h.remove()
    modules = dict(model.named_modules())
    for name, one in shapes[1].items():
        layer = modules[name]
        dim = 1 if _plain_attention(layer) and not layer.batch_first else 0  # the attention rule reads either layout
        for s1, s2 in zip(one, shapes[2].get(name, [])):
            if s1 != s2 and (s1[dim] != 1 or s2[dim] != 2 or s1[:dim] + s1[dim + 1 :] != s2[:dim] + s2[dim + 1 :]):
                return False
    return shapes[1].keys() == shapes[2].keys()


@contextmanager
def _measurement_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and autocast off for the measurement; every module's mode restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        with torch.autocast(device_type=device_type, enabled=False), torch.enable_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def check_fisher_arguments(fisher: str, likelihood: str, method: str, noise_std: float) -> None:
    """Raise a ValueError naming the first of these arguments that is not accepted."""
    check_choice("fisher", fisher, FISHERS)
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("method", method, METHODS)
    if not noise_std > 0:
        raise ValueError(f"`noise_std` must be > 0, got {noise_std!r}.")


def _model_input(x: Any, device: torch.device) -> Any:
    """Inputs on the model's device, floats in float32 (the measurement runs in fp32); integer ids as they are."""
    return map_tensors(lambda t: t.to(device).float() if t.is_floating_point() else t.to(device), x)


def fisher_trace_sums(
    model: nn.Module,
    inputs: Any,
    *,
    fisher: str = "true",
    targets: Optional[torch.Tensor] = None,
    likelihood: str = "categorical",
    noise_std: float = 1.0,
    method: str = "auto",
    forward: Optional[Forward] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    chunk_size: int = 32,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-module sums over ``inputs`` of the per-sample squared gradient norms (float64 tensors), and the number of
    samples: the quantities to add across processes before dividing. See :func:`fisher_trace`."""
    check_fisher_arguments(fisher, likelihood, method, noise_std)
    check_int("chunk_size", chunk_size)
    if batch_size is not None:
        check_int("batch_size", batch_size)
    count = num_samples(inputs)
    if fisher == "empirical" and (targets is None or len(targets) != count):
        raise ValueError("fisher='empirical' needs `targets`, one per input.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    step = batch_size or count
    hooks = method == "auto" and not _whole_model_pass_is_cheaper(model, chunk_size)
    totals: dict[str, torch.Tensor] = {}
    with _measurement_mode(model), routed(model, forward):
        if hooks and count:
            hooks = _samples_along_dim_0(model, _model_input(select(inputs, slice(0, 1)), device), forward)
        for start in range(0, count, step):
            x = _model_input(select(inputs, slice(start, start + step)), device)
            y = targets[start : start + step] if targets is not None else None

            def cotangents(output: torch.Tensor, y: Optional[torch.Tensor] = y) -> list:
                return _cotangents(output, fisher, likelihood, y, generator, noise_std)

            sums = _auto_sums(model, x, cotangents, likelihood, chunk_size, forward) if hooks else None
            if sums is None:
                sums = _vmap_sums(model, x, cotangents, likelihood, chunk_size, forward)
            for name, value in sums.items():
                totals[name] = totals[name] + value if name in totals else value
    return totals, count


def fisher_trace(
    model: nn.Module,
    inputs: Any,
    *,
    fisher: str = "true",
    targets: Optional[torch.Tensor] = None,
    likelihood: str = "categorical",
    noise_std: float = 1.0,
    per_layer: bool = True,
    method: str = "auto",
    forward: Optional[Forward] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    chunk_size: int = 32,
) -> FisherTrace:
    """Trace of the Fisher information of ``model`` on ``inputs``: total, per layer, number of samples.

    tr F = (1/N) sum_i E_y ||grad_w log p_w(y | x_i)||^2 with y from the model (``true``, one draw per input from
    ``generator``), the ``targets`` (``empirical``) or the expectation over y in closed form (``exact``).

    Args:
        model: returns (N, C) logits (``categorical``) or (N, D) / (N,) means (``gaussian``); an output with
            ``.logits`` (a Hugging Face ``ModelOutput``) or a dict with ``"logits"`` is read through.
        inputs: N examples: a tensor (``model(x)``), a tuple of tensors (``model(*inputs)``) or a dict of tensors
            (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``), every tensor with the samples along dim
            0 (all are split by sample, masks included).
        fisher: ``true``, ``empirical`` or ``exact``.
        targets: dataset labels (or regression targets), for ``empirical``.
        likelihood: ``categorical`` (softmax of logits) or ``gaussian`` (N(output, noise_std^2 I), for regression).
        noise_std: standard deviation of the Gaussian likelihood.
        per_layer: also return the split per module (module name -> its share); otherwise ``per_layer`` is empty.
        method: ``auto`` (closed forms and per-module vmap, see the module doc) or ``vmap`` (whole-model ``torch.func``
            per-sample gradients).
        forward: a function of ``inputs`` returning the model's output, called instead of the model (e.g. a
            LightningModule's ``startwell_forward``); it gets each chunk of ``inputs`` whole.
        generator: CPU generator for the ``true`` Fisher's draws.
        batch_size: inputs per forward pass (default: all at once).
        chunk_size: samples per vmap call in the fallbacks.

    Returns:
        A :class:`FisherTrace`.

    Example::

        trace = fisher_trace(model, x, fisher="exact")
        print(trace.total, trace.per_layer)
    """
    sums, count = fisher_trace_sums(
        model, inputs, fisher=fisher, targets=targets, likelihood=likelihood, noise_std=noise_std, method=method,
        forward=forward, generator=generator, batch_size=batch_size, chunk_size=chunk_size,
    )
    per = {name: value.item() / count for name, value in sums.items()}
    return FisherTrace(total=math.fsum(per.values()), per_layer=per if per_layer else {}, num_samples=count)


__all__ = [
    "FISHERS",
    "LIKELIHOODS",
    "METHODS",
    "FisherTrace",
    "check_fisher_arguments",
    "check_output",
    "fisher_trace",
    "fisher_trace_sums",
    "owned_parameters",
]
