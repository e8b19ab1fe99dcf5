"""The hooks that record each layer's input and output gradient during the model's own forward and backward, and
turn them into per-sample norms by the closed forms (or the per-module fallback).

Nothing is guessed from shapes. A layer's norms come from its hooks only when all of this is verified; otherwise its
parameters go to the exact path (per-sample gradients of the whole model, restricted to them, in
:func:`~lightning_startwell.fisher.fallbacks._vmap_sums`):

* the tensors the rule reads hold the samples, by :mod:`~lightning_startwell.fisher.provenance` (a closed form: the
  input and output along dim 0; the attention rule: query, key, value and output along the layout's dimension; the
  per-module vmap: every tensor it is called with per-sample along dim 0 or shared, none hidden in another object, the
  output per-sample along dim 0);
* the layer ran exactly once, and none of its parameters is owned by another module (a sum of per-use norms is not
  the norm of the sum);
* its output is a tensor (or a tuple or list starting with one) that received gradient in the backward passes, and no
  other tensor it returned did (attention weights used downstream, a recurrent layer's final state);
* it is not the model itself (the root is called with the batch, whatever container that is).

Parameters the output does not depend on (a layer that did not run, an unused head) get no gradient: they are left
out of the per-layer split (their share is 0)."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, cast

import torch
from torch import nn

from lightning_startwell._precision import accumulate, upcast
from lightning_startwell.fisher import fallbacks
from lightning_startwell.fisher.closed_forms import _attention_norms, _closed_form, _plain_attention
from lightning_startwell.fisher.fallbacks import _vjp_norms
from lightning_startwell.fisher.likelihoods import check_output
from lightning_startwell.fisher.ownership import _first_tensor, _owners, _parameter_holders, owned_parameters
from lightning_startwell.fisher.provenance import SHARED, Provenance, sample_tag
from lightning_startwell.model_call import Forward, map_tensors, num_samples, run, tensor_leaves

CLOSED, ATTENTION, VJP = "closed form", "attention rule", "per-module vmap"


def _call_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """``tensor_leaves((args, kwargs))``, without its container walk for the common call of a layer (tensors only)."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        return list(args)
    return tensor_leaves((args, kwargs))


def _reachable_parameters(output: torch.Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters) that ``output`` depends on, from its autograd graph."""
    found: set[int] = set()
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


class _NormRecorder:
    """Hooks that turn each backward pass into per-sample squared gradient norms per module (see the module doc).

    Every module is watched for calls; a module owning parameters keeps its inputs and hooks its output's gradient.
    Parameters of a module that never ran (``nn.MultiheadAttention.out_proj`` is used functionally by its parent) are
    adopted by the nearest ancestor that ran, whose norms then come from its attention rule or the per-module vmap.
    """

    def __init__(self, model: nn.Module, chunk: int, provenance: Provenance, num_samples: int) -> None:
        self.model = model
        self.chunk = chunk
        self.provenance = provenance
        self.num_samples = num_samples
        self.own = owned_parameters(model)
        self._holders = _parameter_holders(model)  # only these keep their inputs and hook their output
        self.calls: dict[str, int] = {}
        self.adopted: dict[str, dict[str, torch.Tensor]] = {}
        self.counted: dict[str, dict[str, torch.Tensor]] = {}  # the parameters each module's norms are about
        self.norms: dict[str, torch.Tensor] = {}
        self.weight: Optional[torch.Tensor] = None  # per-sample weights of the current backward (exact Fisher)
        self.last_pass = True  # the last backward drops each layer's inputs once used, as autograd frees its own
        self._inputs: dict[str, tuple[tuple, dict]] = {}
        self._hooked: set[str] = set()
        self._entries: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, weakref.ref] = {}  # the output hooked per module, to tell a routed outer call
        self.allowed: dict[str, set[str]] = {}  # the rules the tensors of the module's call were verified for
        self.split: dict[str, list[bool]] = {}  # per-module vmap: which tensors of the call to split by sample
        self.path: dict[str, str] = {}  # the rule each module's norms come from
        self.exact: set[str] = set()  # modules whose parameters go to the exact path
        self.produced: dict[str, set[str]] = {}  # the keys of ``norms`` each module's hook wrote
        self.partial: set[str] = set()  # modules whose other outputs got gradients: their first one is not all
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
            if out is None or not out.requires_grad or name not in self._holders or self.calls[name] > 1:
                return
            leaves = _call_leaves(args, kwargs)
            self.allowed[name] = self._verified_rules(name, module, args, kwargs, leaves, out)
            plain = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
            self._inputs[name] = (
                (tuple(a.detach() for a in args), {}) if plain else map_tensors(lambda t: t.detach(), (args, kwargs))
            )
            self._hooked.add(name)
            self._outputs[name] = weakref.ref(out)
            if not any(t.requires_grad for t in leaves):
                self._entries[name] = out  # the model's differentiable path starts here (an embedding of the ids)
            out.register_hook(lambda delta: self._backward(name, module, delta))
            for other in [output] if isinstance(output, torch.Tensor) else tensor_leaves(output):
                if other is not out and other.requires_grad:  # a second output (attention weights, an RNN's state)
                    other.register_hook(lambda _: self.partial.add(name))

        return hook

    def _verified_rules(
        self, name: str, module: nn.Module, args: tuple, kwargs: dict, leaves: list, out: torch.Tensor
    ) -> set[str]:
        """The rules whose reading of this call's tensors the provenance of the samples bears out."""
        record = self.provenance.record(name, 0)
        if record is None:
            return set()
        tags, out_tags = record.measured(leaves, out, self.num_samples)
        along_0 = sample_tag(0)
        rules = set()
        if along_0 in out_tags and args and leaves and leaves[0] is args[0] and along_0 in tags[0]:
            rules.add(CLOSED)
        if _plain_attention(module):
            along = sample_tag(0 if module.batch_first else 1)
            try:
                call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            except TypeError:
                call = {}
            qkv = [call.get(k) for k in ("query", "key", "value")]
            if along in out_tags and all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in qkv):
                index = [next(i for i, leaf in enumerate(leaves) if leaf is t) for t in qkv]
                if all(along in tags[i] for i in index):
                    rules.add(ATTENTION)
        if along_0 in out_tags and not record.opaque and all(SHARED in t or along_0 in t for t in tags):
            rules.add(VJP)
            self.split[name] = [along_0 in t for t in tags]
        return rules

    def decide(self, output: torch.Tensor) -> None:
        """After the forward pass: which parameters count (those the output depends on), who owns them (the parameters
        of modules that never ran go to their nearest ancestor that did), and each module's rule or the exact path."""
        reachable = _reachable_parameters(output)
        owners: dict[int, int] = {}
        for params in self.own.values():
            for p in params.values():
                owners[id(p)] = owners.get(id(p), 0) + 1
        for name, params in self.own.items():
            used = {k: p for k, p in params.items() if id(p) in reachable}
            if not used:
                continue
            if name in self.calls:
                self.counted.setdefault(name, {}).update(used)
                continue
            parts = name.split(".")
            ancestors = (".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1))
            ancestor = next((a for a in ancestors if a in self.calls), "")
            prefix = name[len(ancestor) + 1 :] if ancestor else name
            self.adopted.setdefault(ancestor, {}).update({f"{prefix}.{k}": p for k, p in used.items()})
            self.counted.setdefault(ancestor, {}).update({f"{prefix}.{k}": p for k, p in used.items()})
        modules = dict(self.model.named_modules())
        for name, params in self.counted.items():
            rule = None
            alone = all(owners.get(id(p), 1) == 1 for p in params.values())
            if name and self.calls.get(name) == 1 and name in self._hooked and alone:
                module, allowed = modules[name], self.allowed.get(name, set())
                if name not in self.adopted and _closed_form(module) is not None and CLOSED in allowed:
                    rule = CLOSED
                elif _plain_attention(module) and ATTENTION in allowed:
                    rule = ATTENTION
                elif VJP in allowed:
                    rule = VJP
            if rule is None:
                self.exact.add(name)
            else:
                self.path[name] = rule

    def _backward(self, name: str, module: nn.Module, delta: torch.Tensor) -> None:
        if name not in self.path:  # the exact path, or nothing to count
            if self.last_pass:
                self._inputs.pop(name, None)
            return
        args, kwargs = self._inputs.pop(name) if self.last_pass else self._inputs[name]
        params = {k: p.detach() for k, p in self.counted[name].items()}
        rule = self.path[name]
        if rule == CLOSED:
            # half-precision sums of squares lose terms: upcast
            closed_form = _closed_form(module)
            assert closed_form is not None  # CLOSED only where there is one
            self._add(name, name, closed_form(module, upcast(args[0]), upcast(delta)))
            return
        self._enabled = False  # the attention rule and the fallback re-run the module: its submodules must not record
        try:
            attention = cast(nn.MultiheadAttention, module)  # ATTENTION only for one
            split = _attention_norms(attention, args, kwargs, delta.detach()) if rule == ATTENTION else None
            if split is None:
                norms = _vjp_norms(module, params, args, kwargs, delta.detach(), self.chunk, self.split[name])
                split = {owner: norms[:, column] for column, owner in enumerate(_owners(params))}
        finally:
            self._enabled = True
        for owner, norms in split.items():
            self._add(name, f"{name}.{owner}" if name and owner else name or owner, norms)

    def _add(self, module: str, name: str, norms: torch.Tensor) -> None:
        norms = accumulate(norms.detach())
        if self.weight is not None:
            norms = norms * self.weight
        self.norms[name] = self.norms[name] + norms if name in self.norms else norms
        self.produced.setdefault(module, set()).add(name)

    def finish(self) -> None:
        """After the backward passes: a module whose hook never ran (a layer off the path of the differentiated
        inputs) or whose other outputs got gradient goes to the exact path, its hook's norms dropped."""
        for name in list(self.path):
            if name in self.partial or name not in self.produced:
                del self.path[name]
                self.exact.add(name)
                for key in self.produced.pop(name, set()):
                    self.norms.pop(key, None)

    def exact_parameters(self) -> set[int]:
        return {id(p) for name in self.exact for p in self.counted[name].values()}

    def entry_outputs(self) -> list[torch.Tensor]:
        """Outputs of the innermost modules called with no tensor that requires gradient (an embedding of the token
        ids, of positions), the whole model left out: the model's differentiable path starts there."""
        innermost = [n for n in self._entries if n and not any(o.startswith(f"{n}.") for o in self._entries)]
        return [self._entries[n] for n in innermost]


def _auto_sums(
    model: nn.Module,
    x: Any,
    cotangents: Callable[[torch.Tensor], Any],
    likelihood: str,
    chunk: int,
    forward: Optional[Forward],
    provenance: Optional[Provenance] = None,
    chunk_size: Optional[int] = None,
) -> Optional[dict[str, torch.Tensor]]:
    """Per-module sums over the batch of per-sample squared norms (weighted and summed over the backward passes): the
    hooks where they are verified, the exact path restricted to the other modules' parameters (see the module doc).
    None when the whole model had better take the exact path (nothing verified, or some modules unverified while the
    whole model's per-sample gradients are small): the caller uses vmap."""
    if provenance is None or not provenance.output_per_sample:
        return None
    n = num_samples(x)
    recorder = _NormRecorder(model, chunk, provenance, n)
    inputs = x
    x = map_tensors(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, x)
    leaves = tensor_leaves(x)
    with recorder.attached():
        output = check_output(run(model, x, forward), n, likelihood).float()
        recorder.decide(output)
        if not recorder.path or (recorder.exact and fallbacks._whole_model_is_small(model, chunk)):
            return None
        # The backward only has to reach the hooked outputs: differentiate with respect to the float inputs and to the
        # outputs of the modules where the differentiable path starts (no weight-gradient kernels run); with neither,
        # with respect to the parameters.
        wrt = [t for t in leaves if t.requires_grad] + recorder.entry_outputs()
        wrt = wrt or [p for p in model.parameters() if p.requires_grad]
        passes = cotangents(output)
        for index, (v, weight) in enumerate(passes):
            recorder.weight, recorder.last_pass = weight, index + 1 == len(passes)
            torch.autograd.grad((output * v).sum(), wrt, retain_graph=index + 1 < len(passes), allow_unused=True)
    recorder.finish()
    sums = {name: norms.sum() for name, norms in recorder.norms.items()}
    exact = recorder.exact_parameters()
    if exact:
        step = fallbacks.whole_model_chunk(model, chunk_size, only=exact)
        rest = fallbacks._vmap_sums(model, inputs, cotangents, likelihood, step, forward, only=exact, passes=passes)
        for name, value in rest.items():
            sums[name] = sums[name] + value if name in sums else value
    return sums
