"""Pictures of what the callbacks measure and schedule (matplotlib, no Lightning): the per-layer Fisher trace as a
heatmap, the signal-propagation profile against depth, and the rate schedules of a run.

Each function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas — no pyplot, so no window, no change of
the user's backend and no figure left open — and returns the picture as an ``(H, W, 3)`` uint8 array (what
``SummaryWriter.add_image(..., dataformats="HWC")`` takes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, TypeVar, Union

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from lightning_startwell.schedules import expected_depth

DPI = 100
WIDTH = 9.0  # inches
# More layers than this and only every k-th name is written, so the labels stay readable.
MAX_LABELS = 48
# Earlier signal profiles drawn behind the latest one at most (evenly thinned, the first always kept).
MAX_EARLIER_PROFILES = 24

#: One signal-propagation measurement: (optimizer step, Var[z^l] by layer, Var[dL/dz^l] by layer), in forward order.
SignalMeasurement = tuple[int, Mapping[str, float], Mapping[str, float]]
#: Anything measured at a step: a tuple whose first item is the step (a signal measurement, a Fisher column...).
Step = TypeVar("Step", bound=tuple[Any, ...])
#: A deficit window in optimizer steps, [start, end), and its name.
Window = tuple[int, int, str]


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels as an ``(H, W, 3)`` uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def normalise_by_row_max(values: Union[Sequence[Sequence[float]], np.ndarray]) -> np.ndarray:
    """Each row divided by its own largest finite value (a row whose largest value is not > 0 becomes 0; non-finite
    entries stay NaN)."""
    array = np.asarray(values, dtype=float)
    finite = np.where(np.isfinite(array), array, -np.inf)
    peak = finite.max(axis=1, keepdims=True) if array.size else np.zeros((len(array), 1))
    scaled = np.divide(array, peak, out=np.zeros_like(array), where=peak > 0)
    return np.where(np.isfinite(array), scaled, np.nan)


def relative_to(values: Sequence[float], reference: float) -> np.ndarray:
    """``values / reference``, NaN where that is not a positive finite number (nothing to draw on a log scale)."""
    ratio = np.asarray(values, dtype=float) / reference if reference > 0 else np.full(len(values), np.nan)
    return np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan)


def cell_edges(centres: Sequence[float]) -> np.ndarray:
    """Edges of cells centred on increasing ``centres``: midpoints between neighbours, the outer cells as wide as their
    neighbour (a single cell is 1 wide)."""
    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    middle = (c[1:] + c[:-1]) / 2
    return np.concatenate([[2 * c[0] - middle[0]], middle, [2 * c[-1] - middle[-1]]])


def _label_every(count: int) -> int:
    return max(1, math.ceil(count / MAX_LABELS))


def fisher_heatmap(steps: Sequence[int], layers: Sequence[str], values: Sequence[Sequence[float]]) -> np.ndarray:
    """The per-layer Fisher trace over training: layers (rows, in the given order, top to bottom) against measurement
    steps (columns), each layer divided by its own maximum over the measurements drawn, so every layer's rise and fall
    shows whatever its scale; the total trace (sum over layers) above, on the same step axis.

    Args:
        steps: optimizer steps of the measurements, increasing.
        layers: layer names (module names; ``""``, parameters of the model itself, is written ``(model)``).
        values: ``values[i][j]``, the trace carried by layer ``i`` at measurement ``j``.
    """
    array = np.asarray(values, dtype=float).reshape(len(layers), len(steps))
    height = min(max(3.0 + 0.16 * len(layers), 5.0), 16.0)
    figure = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=[1.2, max(2.0, height - 2.2)], width_ratios=[1, 0.025])
    top = figure.add_subplot(grid[0, 0])
    heat = figure.add_subplot(grid[1, 0], sharex=top)
    total = np.sum(array, axis=0)
    top.plot(steps, total, marker="o", markersize=3, color="black")
    top.set_ylabel("Fisher trace")
    top.set_title("Fisher trace: total, and per layer divided by the layer's own maximum")
    top.tick_params(labelbottom=False)
    mesh = heat.pcolormesh(
        cell_edges(steps), np.arange(len(layers) + 1), normalise_by_row_max(array), cmap="magma", vmin=0.0, vmax=1.0
    )
    every = _label_every(len(layers))
    heat.set_yticks(np.arange(0, len(layers), every) + 0.5, [n or "(model)" for n in layers][::every], fontsize=7)
    heat.invert_yaxis()  # the first layer at the top
    heat.set_xlabel("optimizer step")
    heat.set_ylabel("layer (forward order)")
    figure.colorbar(mesh, cax=figure.add_subplot(grid[1, 1]), label="fraction of the layer's maximum")
    return render(figure)


def spread_over_steps(measurements: Sequence[Step], count: int) -> list[Step]:
    """All ``measurements`` (tuples whose first item is the step) if there are at most ``count``, else those nearest to
    ``count`` evenly spaced steps from the first measurement's to the last's (both kept)."""
    if len(measurements) <= count:
        return list(measurements)
    steps = np.array([m[0] for m in measurements], dtype=float)
    targets = np.linspace(steps[0], steps[-1], count)
    chosen = np.unique(np.abs(steps[None, :] - targets[:, None]).argmin(axis=1))
    return [measurements[i] for i in chosen]


def signal_profile(measurements: Sequence[SignalMeasurement]) -> np.ndarray:
    """Signal propagation against depth, on a log scale: Var[z^l] / Var[z^1] (forward, relative to the first layer)
    and Var[dL/dz^l] / Var[dL/dz^L] (backward, relative to the last layer, where the error enters), with the flat line
    at 1 that a variance-preserving initialisation gives. The latest measurement is drawn in black over the earlier
    ones (grey, older fainter; at most 24 of them, evenly spread). The layers are the latest measurement's, in its
    order; without backward variances (a forward pass only) there is one panel.

    Args:
        measurements: ``(step, forward variances, backward variances)`` in the order they were taken.
    """
    latest = measurements[-1]
    layers = list(latest[1])
    # (direction, index of its variances in a measurement, layer the profile is relative to)
    directions: list[tuple[str, Literal[1, 2], int]] = [("forward", 1, 0)]
    if any(m[2] for m in measurements):
        directions.append(("backward", 2, -1))
    figure = Figure(figsize=(WIDTH if len(directions) == 2 else WIDTH * 0.6, 4.5), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, len(directions), squeeze=False)[0]
    depth = np.arange(1, len(layers) + 1)
    earlier = spread_over_steps(measurements[:-1], MAX_EARLIER_PROFILES)
    for ax, (direction, index, reference) in zip(axes, directions, strict=True):
        for age, measurement in enumerate(earlier):
            variances = [measurement[index].get(n, math.nan) for n in layers]
            alpha = 0.15 + 0.55 * (age + 1) / len(earlier)
            label = f"earlier: steps {earlier[0][0]}–{earlier[-1][0]}" if age == len(earlier) - 1 else None
            ax.plot(depth, relative_to(variances, variances[reference]), color="grey", alpha=alpha, label=label)
        variances = [latest[index].get(n, math.nan) for n in layers]
        ax.plot(depth, relative_to(variances, variances[reference]), "o-", color="black", label=f"step {latest[0]}")
        ax.axhline(1.0, color="tab:green", linestyle="--", label="variance preserved")
        ax.set_yscale("log")
        # Plain tick labels ("0.001"): the default 10^k labels go through matplotlib's TeX parser, most of the cost.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        every = _label_every(len(layers))
        ax.set_xticks(depth[::every], layers[::every], rotation=90, fontsize=7)
        ax.set_xlabel("layer (forward order)")
        which = "Var[z^l] / Var[z^1]" if direction == "forward" else "Var[dL/dz^l] / Var[dL/dz^L]"
        ax.set_ylabel(which)
        ax.set_title(f"{direction} signal")
        ax.legend(fontsize=7)
    return render(figure)


def schedule_overview(
    steps: Sequence[int],
    dropout: Optional[Sequence[float]] = None,
    block_rates: Optional[Sequence[Sequence[float]]] = None,
    windows: Sequence[Window] = (),
    now: Optional[int] = None,
) -> np.ndarray:
    """The planned schedules of a run against optimizer steps: the dropout rate, the drop rate of every residual block
    (block 1 lightest) with the expected depth sum_l (1 - rate_l) on the right axis, and the deficit windows shaded on
    every panel; a vertical line at ``now`` (the step the picture is taken at).

    Args:
        steps: the optimizer steps the rates are given at, increasing (each rate holds until the next step listed).
        dropout: the dropout rate at each step.
        block_rates: ``block_rates[j][l]``, the drop rate of block ``l`` at step ``j``.
        windows: deficit windows ``(start, end, name)`` in optimizer steps, ``end`` exclusive.
        now: the current optimizer step, marked with a line.
    """
    given = {"dropout": dropout, "depth": block_rates}
    panels = [name for name, values in given.items() if values is not None] or ["deficit"]
    figure = Figure(figsize=(WIDTH, 1.0 + 2.2 * len(panels)), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        legend_axes = [ax]
        if panel == "dropout":
            ax.plot(steps, dropout, drawstyle="steps-post", color="tab:blue", label="dropout rate")
            ax.set_ylabel("dropout rate")
        elif panel == "depth":
            legend_axes.append(_draw_block_rates(ax, steps, np.asarray(block_rates, dtype=float)))
        else:
            ax.set_yticks([])
        for start, end, name in windows:
            ax.axvspan(start, end, color="tab:red", alpha=0.15, label=f"deficit: {name}")
        if now is not None:
            ax.axvline(now, color="black", linestyle=":", label=f"step {now}")
        handles = [h for a in legend_axes for h in a.get_legend_handles_labels()[0]]
        # Outside the panel (right of the twin axis's labels, if any), where it hides no line.
        anchor = (1.1 if len(legend_axes) > 1 else 1.01, 1.0)
        legend_axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=anchor)
    axes[0].set_title("planned schedules")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].set_xlim(steps[0], max(steps[-1], now or 0, *(end for _, end, _ in windows)))
    return render(figure)


def _draw_block_rates(ax: Axes, steps: Sequence[int], rates: np.ndarray) -> Axes:
    """Per-block drop rates (a light-to-dark ramp from the first block to the last) and, on a twin axis that is
    returned, the expected depth."""
    blocks = rates.shape[1]
    colours = [(0.1, 0.3 + 0.6 * (1 - b / max(blocks - 1, 1)), 0.1) for b in range(blocks)]
    for block in range(blocks):
        label = f"block {block + 1}" if block in (0, blocks - 1) else None
        ax.plot(steps, rates[:, block], drawstyle="steps-post", color=colours[block], label=label)
    ax.set_ylabel("drop rate per block")
    depth_axis = ax.twinx()
    depth = [expected_depth(list(row)) for row in rates]
    depth_axis.plot(steps, depth, drawstyle="steps-post", linestyle="--", color="tab:purple", label="expected depth")
    depth_axis.set_ylabel("expected depth", color="tab:purple")
    depth_axis.set_ylim(0, blocks + 0.5)
    return depth_axis


__all__ = [
    "fisher_heatmap",
    "normalise_by_row_max",
    "relative_to",
    "render",
    "schedule_overview",
    "signal_profile",
    "spread_over_steps",
]
