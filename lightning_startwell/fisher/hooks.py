"""The hooks that record each layer's input and output gradient during the model's own forward and backward, and
turn them into per-sample norms by the closed forms (or the per-module fallback)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from lightning_startwell._precision import accumulate, upcast
from lightning_startwell.fisher.closed_forms import _attention_norms, _closed_form, _plain_attention
from lightning_startwell.fisher.fallbacks import _vjp_norms
from lightning_startwell.fisher.likelihoods import check_output
from lightning_startwell.fisher.ownership import _first_tensor, _owners, _parameter_holders, _tensors, owned_parameters
from lightning_startwell.model_call import Forward, map_tensors, num_samples, run, tensor_leaves


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
        self._outputs: dict[str, weakref.ref] = {}  # the output hooked per module, to tell a routed outer call
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
            out = _first_tensor(output)
            if out is not None and name in self._outputs and self._outputs[name]() is out:
                # A routed forward (``startwell_forward`` calling ``self(x)``): the outer call of the model returns the
                # inner call's output. One call, already recorded with the inner call's inputs.
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            if out is None or not out.requires_grad or name not in self._holders:
                return
            self._inputs[name] = (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)
            self._hooked.add(name)
            self._outputs[name] = weakref.ref(out)
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
            self._add(name, rule(module, upcast(args[0]), upcast(delta)))  # half-precision sums of squares lose terms
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
        norms = accumulate(norms.detach())
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
