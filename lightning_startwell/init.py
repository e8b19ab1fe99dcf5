"""Variance-preserving weight initialisation (pure PyTorch, no Lightning).

The lecture's condition (1), Var[z^l] = Var[z^1] for every layer l, with z^l = <w^l, x^l> and weights independent of
inputs, gives Var[z^l] = fan_in Var[w^l] E[(x^l)^2]. The activation fixes E[x^2]:

* odd activation (tanh, identity) near 0: E[x^2] = Var[z^{l-1}] -> Var[w] = 1/fan_in forward, 1/fan_out backward;
  Glorot & Bengio (2010) take the harmonic compromise Var[w] = 2 / (fan_in + fan_out);
* ReLU: E[x^2] = Var[z]/2 -> He et al. (2015): Var[w] = 2 / fan;
* leaky ReLU of slope alpha: E[x^2] = (1 + alpha^2)/2 Var[z] -> Var[w] = 2 / ((1 + alpha^2) fan).

A uniform law U(-a, a) has variance a^2/3, so each normal scheme has a uniform twin with a = sqrt(3) std.
All draws come from a CPU generator and are then copied to the parameter's device, so one seed gives the same weights on
every device and every DDP rank.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Optional, cast

import torch
from torch import nn

from lightning_startwell._precision import accumulate
from lightning_startwell._validation import check_choice, check_rate
from lightning_startwell.model_call import Forward, Inputs, run
from lightning_startwell.propagation import PACKED_LAYERS, moments, variance_from_moments

Scheme = Literal[
    "glorot_normal", "glorot_uniform", "he_normal", "he_uniform", "lecun_normal", "orthogonal", "fixup", "lsuv"
]
Mode = Literal["fan_in", "fan_out"]
Nonlinearity = Literal["relu", "leaky_relu", "tanh", "linear"]
SCHEMES: tuple[str, ...] = Scheme.__args__  # type: ignore[attr-defined]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]
NONLINEARITIES: tuple[str, ...] = Nonlinearity.__args__  # type: ignore[attr-defined]

WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_transposed_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections): a Linear whose weight
    is stored (in, out), y = x W + b. Recognised by its class name and that layout (``nf`` outputs), so that
    ``transformers`` need not be imported."""
    weight = getattr(layer, "weight", None)
    return (
        type(layer).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and getattr(layer, "nf", None) == weight.shape[1]
    )


def is_weight_layer(layer: nn.Module) -> bool:
    """A Linear, a (transposed) convolution, or Hugging Face's ``Conv1D``: the layers the schemes initialise."""
    return isinstance(layer, WEIGHT_LAYERS) or is_transposed_linear(layer)


@dataclass(frozen=True)
class LayerInit:
    """What :func:`init_weights` did to one layer: its fans, the std it aimed at and the std of the weights it drew.

    ``target_std`` is NaN for ``lsuv`` (whose target is an output variance of 1, reached in ``output_var``) and 0 for a
    layer that Fixup zeroes.
    """

    name: str
    fan_in: int
    fan_out: int
    target_std: float
    std: float
    output_var: float = math.nan
    module: str = ""  # the module holding the parameter, for an entry per parameter (a recurrent layer's weights)

    @property
    def module_name(self) -> str:
        return self.module or self.name


#: Gates of a recurrent layer: the row blocks of its packed weights (PyTorch's order: LSTM i, f, g, o; GRU r, z, n).
GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


@dataclass(frozen=True)
class WeightBlock:
    """One matrix a scheme draws inside a packed parameter: rows ``rows`` of the parameter ``param`` of a recurrent
    layer (a gate) or of ``nn.MultiheadAttention`` (a projection), with the fans of that matrix's own forward.
    ``recurrent`` blocks (hidden-to-hidden) are drawn orthogonal with gain 1, whatever the scheme."""

    param: str
    rows: slice
    fan_in: int
    fan_out: int
    recurrent: bool = False


def weight_blocks(layer: nn.Module) -> list[WeightBlock]:
    """The matrices of a recurrent layer (``nn.RNN``/``LSTM``/``GRU``: per layer, direction and gate, the input weights
    ``weight_ih`` with fans (input size, hidden size), the recurrent weights ``weight_hh`` (hidden, hidden) and an
    LSTM's projection ``weight_hr`` (hidden, proj)) or of ``nn.MultiheadAttention``'s input projections (per projection:
    the packed ``in_proj_weight`` (3E, E) holds three (E, E) matrices; separate ``q/k/v_proj_weight`` (E, kdim or
    vdim)). Its ``out_proj`` is a Linear, initialised as one."""
    if isinstance(layer, nn.MultiheadAttention):
        if layer.in_proj_weight is not None:
            e = layer.embed_dim
            return [WeightBlock("in_proj_weight", slice(i * e, (i + 1) * e), e, e) for i in range(3)]
        return [
            WeightBlock(name, slice(None), getattr(layer, name).shape[1], layer.embed_dim)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ]
    gates = next(g for kind, g in GATES.items() if isinstance(layer, kind))
    hidden = cast(int, layer.hidden_size)
    blocks = []
    for name in cast(list[str], layer._flat_weights_names):
        weight = getattr(layer, name)
        if not name.startswith("weight_"):
            continue
        if name.startswith("weight_hr"):
            blocks.append(WeightBlock(name, slice(None), weight.shape[1], weight.shape[0]))
            continue
        recurrent = name.startswith("weight_hh")
        blocks += [
            WeightBlock(name, slice(g * hidden, (g + 1) * hidden), weight.shape[1], hidden, recurrent)
            for g in range(gates)
        ]
    return blocks


def fans(layer: nn.Module) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a Linear or (transposed) convolution: connections into and out of one unit.

    Convolution: fan_in = in_channels / groups x kernel elements, fan_out = out_channels / groups x kernel elements (the
    stride is ignored, as in ``torch.nn.init``). For a transposed convolution the weight is stored ``(in, out / groups,
    *k)``; its fans are those of the layer's own forward pass, not of the stored layout that ``torch.nn.init`` reads.
    Hugging Face's ``Conv1D`` stores (in, out): fan_in = weight.shape[0], fan_out = weight.shape[1].
    """
    weight = _weight(layer)
    if isinstance(layer, nn.Linear):
        return weight.shape[1], weight.shape[0]
    if is_transposed_linear(layer):
        return weight.shape[0], weight.shape[1]
    kernel = math.prod(weight.shape[2:])
    groups = cast(int, layer.groups)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return weight.shape[0] // groups * kernel, weight.shape[1] * kernel
    return weight.shape[1] * kernel, weight.shape[0] // groups * kernel


def gain(nonlinearity: str, negative_slope: float = 0.0) -> float:
    """Standard-deviation gain of an activation (the factor on the weights' std, as ``torch.nn.init.calculate_gain``):
    sqrt(2 / (1 + alpha^2)) for (leaky) ReLU, 5/3 for tanh, 1 for linear."""
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + negative_slope**2))
    if nonlinearity == "tanh":
        return 5.0 / 3.0
    return 1.0


def target_std(
    scheme: str,
    fan_in: int,
    fan_out: int,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
) -> float:
    """Standard deviation of the weights that ``scheme`` aims at for a layer with these fans.

    * ``glorot_*``: sqrt(2 / (fan_in + fan_out));
    * ``he_*``: sqrt(2 / ((1 + alpha^2) fan)), fan = fan_in or fan_out by ``mode``, alpha = ``negative_slope`` for
      ``leaky_relu`` and 0 for ``relu``;
    * ``lecun_normal``: sqrt(1 / fan_in);
    * ``orthogonal``: gain / sqrt(max(fan_in, fan_out)) (a semi-orthogonal matrix has unit rows or unit columns), with
      the fans of the weight as the matrix that is made orthogonal: for a convolution, out_channels rows (not
      out_channels x kernel) by in_channels / groups x kernel columns (see :func:`matrix_fans`).
    """
    if scheme.startswith("glorot"):
        return math.sqrt(2.0 / (fan_in + fan_out))
    if scheme.startswith("he") or scheme == "fixup":
        fan = fan_in if mode == "fan_in" else fan_out
        slope = negative_slope if nonlinearity == "leaky_relu" else 0.0
        return math.sqrt(2.0 / ((1.0 + slope**2) * fan))
    if scheme == "lecun_normal":
        return math.sqrt(1.0 / fan_in)
    if scheme == "orthogonal":
        return gain(nonlinearity, negative_slope) / math.sqrt(max(fan_in, fan_out))
    raise ValueError(f"`scheme` must be one of {SCHEMES}, got {scheme!r}.")


def _draw(shape: torch.Size, scheme: str, std: float, generator: torch.Generator) -> torch.Tensor:
    """Weights of ``shape`` with standard deviation ``std``: normal, uniform U(-sqrt(3) std, sqrt(3) std) or
    orthogonal."""
    if scheme.endswith("uniform"):
        bound = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    if scheme in ("orthogonal", "lsuv"):
        flat = torch.empty(shape[0], math.prod(shape[1:]))
        nn.init.orthogonal_(flat, generator=generator)
        return flat.reshape(shape) * (std * math.sqrt(max(flat.shape)))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def matrix_fans(layer: nn.Module) -> tuple[int, int]:
    """``(columns, rows)`` of a layer's weight as the matrix an orthogonal draw makes semi-orthogonal (one row per
    output unit, as ``torch.nn.init.orthogonal_`` flattens it): equal to :func:`fans` for a Linear, not for a
    convolution."""
    weight = _stored_layout(layer, _weight(layer))
    return math.prod(weight.shape[1:]), weight.shape[0]


def _weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight``, typed (``nn.Module`` attributes read as tensor or module)."""
    return cast(torch.Tensor, layer.weight)


def _stored_layout(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Orthogonality is meant between output units: a transposed convolution and Hugging Face's ``Conv1D`` store them
    in dim 1, so swap for them (a view: writing it writes the weight)."""
    swapped = isinstance(layer, nn.modules.conv._ConvTransposeNd) or is_transposed_linear(layer)
    return weight.transpose(0, 1) if swapped else weight


@dataclass(frozen=True)
class ResidualBranch:
    """A residual branch: its name, its weight layers in forward order (the last one closes the branch), its last
    normalisation layer, and ``output``, the module whose output is the branch's output (what stochastic depth
    drops)."""

    name: str
    layers: tuple[str, ...]
    last_norm: Optional[str]
    output: str


def find_residual_branches(model: nn.Module, names: Optional[Sequence[str]] = None) -> list[ResidualBranch]:
    """Residual branches of ``model``: modules named by ``names`` (glob patterns), else found by structure.

    Found automatically: a child named ``branch`` (the demo :class:`~lightning_startwell.models.ResNet`), and
    torchvision's ``BasicBlock`` / ``Bottleneck`` (``conv1``, ``conv2`` [, ``conv3``] with their ``bn*``; the
    ``downsample`` shortcut is not part of the branch).
    """
    modules = dict(model.named_modules())
    branches = []
    if names:
        roots = [n for n in modules if n and any(fnmatch.fnmatchcase(n, p) for p in names)]
        for root in roots:
            branches.append(_branch_of(modules, root, prefix=root + "."))
        return [b for b in branches if b.layers]
    for name, module in modules.items():
        if isinstance(getattr(module, "branch", None), nn.Module):
            branches.append(_branch_of(modules, f"{name}.branch" if name else "branch", prefix=None))
        elif all(isinstance(getattr(module, f"conv{i}", None), nn.Module) for i in (1, 2)) and hasattr(
            module, "downsample"
        ):
            depth = 3 if isinstance(getattr(module, "conv3", None), nn.Module) else 2
            prefix = f"{name}." if name else ""
            layers = tuple(f"{prefix}conv{i}" for i in range(1, depth + 1))
            last_norm = f"{prefix}bn{depth}" if f"{prefix}bn{depth}" in modules else None
            # torchvision adds the shortcut right after the last norm layer: its output is the branch output.
            branches.append(ResidualBranch(name, layers, last_norm, last_norm or layers[-1]))
    return [b for b in branches if b.layers]


def _branch_of(modules: dict[str, nn.Module], root: str, prefix: Optional[str]) -> ResidualBranch:
    prefix = prefix if prefix is not None else root + "."
    inside = [(n, m) for n, m in modules.items() if n.startswith(prefix)]
    layers = tuple(n for n, m in inside if is_weight_layer(m))
    norms = [n for n, m in inside if isinstance(m, NORM_LAYERS)]
    return ResidualBranch(root, layers, norms[-1] if norms else None, root)


def weight_layers(
    model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> dict[str, nn.Module]:
    """Linear and convolution layers of ``model`` by name, filtered by glob patterns on the module name; a layer that
    shares a parameter with an excluded module (a weight tied to an excluded embedding) is excluded too."""
    _check_include([n for n, m in model.named_modules() if is_weight_layer(m)], include, "Linear or convolution layer")
    return _select(model, is_weight_layer, include, exclude)


def packed_layers(
    model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> dict[str, nn.Module]:
    """Recurrent layers (``nn.RNN``/``LSTM``/``GRU``) and ``nn.MultiheadAttention`` of ``model`` by name (layers whose
    parameters pack several matrices, see :func:`weight_blocks`), filtered as :func:`weight_layers` filters."""
    return _select(model, lambda m: isinstance(m, PACKED_LAYERS), include, exclude)


def watched_layers(
    model: nn.Module, include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None
) -> dict[str, nn.Module]:
    """The layers whose output signal is watched: :func:`weight_layers` and :func:`packed_layers` (recurrent and
    attention layers), in module order; each ``include`` pattern must match one of them."""
    _check_include([n for n, m in model.named_modules() if _initialisable(m)], include, _INITIALISABLE)
    return _select(model, _initialisable, include, exclude)


def _initialisable(layer: nn.Module) -> bool:
    return is_weight_layer(layer) or isinstance(layer, PACKED_LAYERS)


_INITIALISABLE = "Linear, convolution, recurrent or multi-head attention layer"


def _check_include(names: Sequence[str], include: Optional[Sequence[str]], what: str) -> None:
    for pattern in include or ():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"`include` pattern {pattern!r} matches no {what}; they are: {sorted(names)}.")


def _select(
    model: nn.Module,
    kind: Callable[[nn.Module], bool],
    include: Optional[Sequence[str]],
    exclude: Optional[Sequence[str]],
) -> dict[str, nn.Module]:
    layers = {n: m for n, m in model.named_modules() if kind(m)}
    if include:
        layers = {n: m for n, m in layers.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    if exclude:
        layers = {n: m for n, m in layers.items() if not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
        tied = tied_to_excluded(model, exclude)
        layers = {n: m for n, m in layers.items() if n not in tied}
    return layers


def _excluded_parameters(model: nn.Module, exclude: Optional[Sequence[str]]) -> dict[int, str]:
    """``id`` of every parameter owned directly by a module that ``exclude`` names (under any of its names) -> that
    module's name."""
    protected: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            for parameter in module.parameters(recurse=False):
                protected.setdefault(id(parameter), name)
    return protected


def tied_to_excluded(model: nn.Module, exclude: Optional[Sequence[str]]) -> dict[str, str]:
    """Modules that ``exclude`` does not name but that hold a parameter of one it names (GPT-2's ``lm_head``, whose
    weight is ``transformer.wte``'s), mapped to that excluded module's name: initialising them would change it."""
    protected = _excluded_parameters(model, exclude)
    tied = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in exclude or ()):
            continue
        owners = [protected[id(p)] for p in module.parameters(recurse=False) if id(p) in protected]
        if owners:
            tied[name] = owners[0]
    return tied


def check_init_arguments(
    scheme: str, mode: str, nonlinearity: str, negative_slope: float, forget_gate_bias: float = 0.0
) -> None:
    """Raise a ValueError naming the first argument that is not accepted."""
    check_choice("scheme", scheme, SCHEMES)
    check_choice("mode", mode, MODES)
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    check_rate("negative_slope", negative_slope)
    if scheme.startswith("he") and nonlinearity not in ("relu", "leaky_relu"):
        raise ValueError(f"`nonlinearity` must be 'relu' or 'leaky_relu' for scheme {scheme!r}, got {nonlinearity!r}.")
    finite = isinstance(forget_gate_bias, (int, float)) and math.isfinite(forget_gate_bias)
    if isinstance(forget_gate_bias, bool) or not finite:
        raise ValueError(f"`forget_gate_bias` must be a finite number, got {forget_gate_bias!r}.")


@torch.no_grad()
def init_weights(
    module: nn.Module,
    scheme: str = "he_normal",
    *,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    negative_slope: float = 0.0,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    keep_bias: bool = False,
    zero_init_residual: bool = False,
    residual_branches: Optional[Sequence[str]] = None,
    lsuv_inputs: Optional[Inputs] = None,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    generator: Optional[torch.Generator] = None,
    forward: Optional[Forward] = None,
    lsuv_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    forget_gate_bias: float = 0.0,
) -> list[LayerInit]:
    """Initialise the Linear and convolution layers of ``module`` in place and report, per layer, what was done.

    Biases become 0 (unless ``keep_bias``); normalisation layers get weight 1 and bias 0. Every argument is checked
    before any weight changes, and if anything fails after that (an LSUV forward pass), the weights are restored.

    Args:
        module: the model.
        scheme: ``glorot_normal``, ``glorot_uniform``, ``he_normal``, ``he_uniform``, ``lecun_normal``, ``orthogonal``,
            ``fixup`` (Zhang et al. 2019: He-init branch layers scaled by L^(-1/(2m-2)) for L branches of m layers, the
            last layer of each branch and the classifier zeroed) or ``lsuv`` (Mishkin & Matas 2016: orthogonal, then
            each layer rescaled until its output variance on ``lsuv_inputs`` is 1 within ``lsuv_tol``).
        mode: ``fan_in`` (preserve the forward variance) or ``fan_out`` (the backward one), for He schemes and Fixup.
        nonlinearity: activation after the layers: ``relu``, ``leaky_relu``, ``tanh`` or ``linear``. He schemes use
            (leaky) ReLU; ``orthogonal`` multiplies by its gain.
        negative_slope: slope alpha of the leaky ReLU, in [0, 1).
        include: glob patterns of layer names to initialise (default: all); each must match a layer.
        exclude: glob patterns of module names to leave alone (normalisation layers too); a layer holding a parameter
            of an excluded module (a weight tied to it) is left alone as well.
        keep_bias: leave biases as they are instead of zeroing them.
        zero_init_residual: set the weight of the last normalisation layer of every residual branch to 0, so each block
            starts as the identity (Goyal et al. 2017).
        residual_branches: glob patterns naming residual-branch modules for ``fixup`` / ``zero_init_residual``; default:
            found automatically (see :func:`find_residual_branches`).
        lsuv_inputs: a batch of inputs for ``lsuv``: a tensor, a tuple (positional arguments) or a dict (keyword
            arguments) of tensors (see :mod:`lightning_startwell.model_call`).
        lsuv_tol: tolerance on |Var - 1| for ``lsuv``.
        lsuv_max_iters: rescalings per layer at most, for ``lsuv``.
        generator: CPU generator of the draws (a fixed seed gives identical weights anywhere).
        forward: for ``lsuv``, a function of ``lsuv_inputs`` returning the model's output, called instead of the
            model (a LightningModule's ``startwell_forward``).
        lsuv_reduce: for ``lsuv`` under several processes, a function summing a tensor over them (see
            :func:`lsuv_rescale`), so every process tests the variance of all their inputs and stops with the others.
        forget_gate_bias: the forget-gate bias of every ``nn.LSTM`` (its ``bias_ih`` rows of the f gate; ``bias_hh``
            stays 0, so the gate's total bias is this value): 1.0 is the common choice (Jozefowicz et al. 2015).

    Recurrent layers (``nn.RNN``/``LSTM``/``GRU``) and ``nn.MultiheadAttention`` pack several matrices in one
    parameter: each is drawn with its own fans (:func:`weight_blocks`): the scheme on every input matrix (per gate, per
    projection), the recurrent hidden-to-hidden matrices orthogonal with gain 1 (common practice: Saxe et al. 2014;
    Keras's ``recurrent_initializer``); ``lsuv`` gives them its orthogonal pre-init without the rescaling, ``fixup``
    He.

    Returns:
        One :class:`LayerInit` per initialised layer, and one per weight parameter of a recurrent or attention layer.

    Example::

        report = init_weights(model, "he_normal", nonlinearity="leaky_relu", negative_slope=0.2)
        for layer in report:
            print(layer.name, layer.target_std, layer.std)
    """
    check_init_arguments(scheme, mode, nonlinearity, negative_slope, forget_gate_bias)
    _check_include([n for n, m in module.named_modules() if _initialisable(m)], include, _INITIALISABLE)
    layers = _select(module, is_weight_layer, include, exclude)
    packed = packed_layers(module, include, exclude)
    if not layers and not packed:
        raise ValueError(
            f"`module` has no Linear, convolution, recurrent or attention layer that scheme {scheme!r} can initialise"
            f" (after `include`={include!r}, `exclude`={exclude!r}; left alone as tied to an excluded module:"
            f" {tied_to_excluded(module, exclude) or 'none'})."
        )
    branches = []
    if scheme == "fixup" or zero_init_residual:
        branches = find_residual_branches(module, residual_branches)
        if not branches:
            what = "`residual_branches` patterns match" if residual_branches else "automatic search finds"
            raise ValueError(
                f"scheme {scheme!r} / `zero_init_residual` needs residual branches, but the {what} none; name the"
                " branch modules in `residual_branches` (glob patterns)."
            )
        if scheme == "fixup" and min(len(b.layers) for b in branches) < 2:
            raise ValueError("`fixup` needs residual branches of at least 2 weight layers (the exponent is -1/(2m-2)).")
        if scheme == "fixup":
            _warn_fixup_with_norms(branches)
    if scheme == "lsuv" and lsuv_inputs is None:
        raise ValueError("scheme 'lsuv' needs `lsuv_inputs`, a batch of training inputs.")
    if generator is None:  # seeded from the global stream, so `seed_everything` makes it reproducible
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
    stds = _target_stds(module, layers, branches, scheme, mode, nonlinearity, negative_slope)
    norms = _norms_to_reset(module, exclude)
    # Everything is checked; should anything still fail (an LSUV forward pass), every tensor is put back as it was.
    modules_touched = [*layers.values(), *packed.values(), *norms.values()]
    touched = {id(p): p for m in modules_touched for p in m.parameters(recurse=False)}
    saved = {key: p.detach().to("cpu", copy=True) for key, p in touched.items()}
    try:
        for name, layer in layers.items():
            weight = _stored_layout(layer, _weight(layer))
            weight.copy_(_draw(weight.shape, scheme, stds[name], generator).to(weight))
            bias = cast(Optional[torch.Tensor], layer.bias)
            if bias is not None and not keep_bias:
                bias.zero_()
        packed_report = [
            report
            for name, layer in packed.items()
            for report in _init_packed(
                name, layer, scheme, mode, nonlinearity, negative_slope, keep_bias, forget_gate_bias, generator
            )
        ]
        _reset_norms(norms, branches if zero_init_residual else [])
        output_vars = {}
        if scheme == "lsuv":
            assert lsuv_inputs is not None  # refused above
            output_vars = lsuv_rescale(module, layers, lsuv_inputs, lsuv_tol, lsuv_max_iters, forward, lsuv_reduce)
    except BaseException:
        for key, p in touched.items():
            p.copy_(saved[key])
        raise
    return [
        LayerInit(
            name,
            *fans(layer),
            target_std=math.nan if scheme == "lsuv" else stds[name],
            std=accumulate(_weight(layer).detach()).std().item(),
            output_var=output_vars.get(name, math.nan),
        )
        for name, layer in layers.items()
    ] + packed_report


def _init_packed(
    name: str,
    layer: nn.Module,
    scheme: str,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
    keep_bias: bool,
    forget_gate_bias: float,
    generator: torch.Generator,
) -> list[LayerInit]:
    """Draw every :func:`weight_blocks` matrix of a recurrent or attention layer: the scheme on each input block with
    its own fans (``lsuv`` takes its orthogonal pre-init, ``fixup`` He), recurrent blocks orthogonal with gain 1; biases
    0 (an LSTM's forget-gate rows of ``bias_ih`` at ``forget_gate_bias``). One report entry per weight parameter."""
    block_scheme = {"lsuv": "orthogonal", "fixup": "he_normal"}.get(scheme, scheme)
    reports: dict[str, LayerInit] = {}
    for block in weight_blocks(layer):
        weight = getattr(layer, block.param)[block.rows]
        if block.recurrent:
            std = 1.0 / math.sqrt(max(block.fan_in, block.fan_out))
            weight.copy_(_draw(weight.shape, "orthogonal", std, generator).to(weight))
        else:
            std = target_std(block_scheme, block.fan_in, block.fan_out, mode, nonlinearity, negative_slope)
            weight.copy_(_draw(weight.shape, block_scheme, std, generator).to(weight))
        reports.setdefault(block.param, LayerInit(f"{name}.{block.param}", block.fan_in, block.fan_out, std, 0.0,
                                                  module=name))
    if not keep_bias:
        for param_name, bias in layer.named_parameters(recurse=False):
            if "bias" in param_name:
                bias.zero_()
    if isinstance(layer, nn.LSTM) and layer.bias:
        hidden = layer.hidden_size
        for param_name, bias in layer.named_parameters(recurse=False):
            if param_name.startswith("bias_ih"):
                bias[hidden : 2 * hidden].fill_(forget_gate_bias)  # gate order i, f, g, o
    return [
        dataclasses.replace(r, std=accumulate(getattr(layer, r.name.rsplit(".", 1)[1]).detach()).std().item())
        for r in reports.values()
    ]


def _warn_fixup_with_norms(branches: list[ResidualBranch]) -> None:
    """Fixup is for networks without normalisation: a norm layer after a branch's convolutions makes their weights
    scale-invariant and undoes the L^(-1/(2m-2)) rescaling within a few steps."""
    normed = [b.name for b in branches if b.last_norm]
    if normed:
        warnings.warn(
            f"scheme 'fixup' is an initialisation for residual networks without normalisation (Zhang et al. 2019), but"
            f" {len(normed)} of {len(branches)} residual branches hold a normalisation layer (first: {normed[0]!r}),"
            " which undoes Fixup's rescaling within a few steps. Use a normalisation-free network (the demo"
            " `ResNet(norm='none')`), or 'he_normal' with `zero_init_residual=True` for a normalised one.",
            UserWarning,
            stacklevel=3,
        )


def _target_stds(
    module: nn.Module,
    layers: dict[str, nn.Module],
    branches: list[ResidualBranch],
    scheme: str,
    mode: str,
    nonlinearity: str,
    negative_slope: float,
) -> dict[str, float]:
    if scheme == "lsuv":
        return {n: 1.0 / math.sqrt(max(matrix_fans(m))) for n, m in layers.items()}
    layer_fans = matrix_fans if scheme == "orthogonal" else fans
    stds = {n: target_std(scheme, *layer_fans(m), mode, nonlinearity, negative_slope) for n, m in layers.items()}
    if scheme == "fixup":
        num_branches = len(branches)
        for branch in branches:
            scale = num_branches ** (-1.0 / (2 * len(branch.layers) - 2))
            for name in branch.layers[:-1]:
                if name in stds:
                    stds[name] *= scale
            if branch.layers[-1] in stds:
                stds[branch.layers[-1]] = 0.0
        in_branch = {n for b in branches for n in b.layers}
        classifier = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in in_branch]
        if classifier and classifier[-1] in stds:
            stds[classifier[-1]] = 0.0
    return stds


def _norms_to_reset(module: nn.Module, exclude: Optional[Sequence[str]]) -> dict[str, nn.Module]:
    """Normalisation layers with affine parameters, by name, except those ``exclude`` names or tied to them."""
    left_alone = tied_to_excluded(module, exclude)
    return {
        name: norm
        for name, norm in module.named_modules()
        if isinstance(norm, NORM_LAYERS)
        and getattr(norm, "weight", None) is not None
        and name not in left_alone
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude or ())
    }


def _reset_norms(norms: dict[str, nn.Module], branches: list[ResidualBranch]) -> None:
    """Normalisation layers to weight 1, bias 0 (a norm built with ``bias=False`` has none); the last one of each
    listed branch to weight 0."""
    zeroed = {b.last_norm for b in branches if b.last_norm}
    for name, norm in norms.items():
        _weight(norm).fill_(0.0 if name in zeroed else 1.0)
        bias = getattr(norm, "bias", None)
        if bias is not None:
            bias.zero_()


@contextmanager
def calibration_mode(module: nn.Module) -> Iterator[None]:
    """Train mode with dropout off; every module's mode and every buffer (BatchNorm statistics) restored after."""
    modes = {m: m.training for m in module.modules()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        for n, b in module.named_buffers():
            b.copy_(buffers[n])


def lsuv_rescale(
    module: nn.Module,
    layers: dict[str, nn.Module],
    inputs: Inputs,
    tol: float = 0.1,
    max_iters: int = 10,
    forward: Optional[Forward] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, float]:
    """Layer-sequential unit variance: in forward order, divide each layer's weight by the std of its output on
    ``inputs`` until |Var - 1| < ``tol`` (at most ``max_iters`` times). Returns the final output variance per layer.

    Runs in train mode with dropout off (BatchNorm normalises with batch statistics, as in training) and restores every
    module's mode and buffers afterwards. ``reduce``, under several processes, sums a tensor over them (an all-reduce):
    the variance tested is then that of every process's outputs, the same on all, so all stop after the same number of
    forward passes (with SyncBatchNorm each forward is a collective: differing counts would deadlock).
    """

    def variance(name: str) -> float:
        if reduce is None:
            return forward_variances(module, inputs, {name: layers[name]}, forward)[name]
        return variance_from_moments(reduce(output_moments(module, inputs, layers[name], forward))).item()

    with calibration_mode(module), torch.no_grad():
        order = forward_variances(module, inputs, layers, forward)  # keys in the order the layers run
        final: dict[str, float] = {}
        for name in order:
            var = variance(name)
            for _ in range(max_iters):
                if abs(var - 1.0) < tol or var == 0.0:
                    break
                _weight(layers[name]).div_(math.sqrt(var))
                var = variance(name)
            final[name] = var
    return final


def output_moments(
    module: nn.Module, inputs: Inputs, layer: nn.Module, forward: Optional[Forward] = None
) -> torch.Tensor:
    """``[count, sum, sum of squares]`` of ``layer``'s output (its first call) on ``inputs``, on its device: the
    quantities to add across processes before the variance is taken."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _l, _i, out: None if seen else seen.append(moments(out)))
    try:
        with torch.no_grad():
            run(module, inputs, forward)
    finally:
        handle.remove()
    return seen[0]


def forward_variances(
    module: nn.Module, inputs: Inputs, layers: dict[str, nn.Module], forward: Optional[Forward] = None
) -> dict[str, float]:
    """Var[z^l] of each layer's output on ``inputs`` (a tensor, tuple or dict of tensors; ``forward`` called instead of
    the module when given, see :mod:`lightning_startwell.model_call`), in forward order, without gradients and without
    mode change."""
    seen: dict[str, float] = {}
    names = {m: n for n, m in layers.items()}

    def record(layer: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        seen.setdefault(names[layer], accumulate(out.detach()).var().item())

    handles = [m.register_forward_hook(record) for m in layers.values()]
    try:
        with torch.no_grad():
            run(module, inputs, forward)
    finally:
        for h in handles:
            h.remove()
    return seen


__all__ = [
    "LayerInit",
    "calibration_mode",
    "check_init_arguments",
    "ResidualBranch",
    "fans",
    "find_residual_branches",
    "forward_variances",
    "gain",
    "init_weights",
    "is_weight_layer",
    "packed_layers",
    "watched_layers",
    "weight_blocks",
    "lsuv_rescale",
    "matrix_fans",
    "target_std",
    "tied_to_excluded",
    "weight_layers",
]
