"""The drawing functions on their own: the numbers they draw (normalisation, ratios, cell edges) against hand-computed
values, the pictures' sizes, and no pyplot state or backend change."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

from lightning_startwell.figures import (
    cell_edges,
    fisher_heatmap,
    normalise_by_row_max,
    relative_to,
    schedule_overview,
    signal_profile,
    spread_over_steps,
)

NAN = math.nan


def test_each_layer_is_divided_by_its_own_maximum():
    values = [[1.0, 2.0, 4.0], [3e-6, 0.0, 1.5e-6], [0.0, 0.0, 0.0], [NAN, 2.0, 1.0], [math.inf, 5.0, 2.5]]
    expected = [[0.25, 0.5, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [NAN, 1.0, 0.5], [NAN, 1.0, 0.5]]
    np.testing.assert_allclose(normalise_by_row_max(values), expected, equal_nan=True)


def test_ratios_to_a_reference_leave_out_what_a_log_scale_cannot_draw():
    np.testing.assert_allclose(relative_to([2.0, 4.0, 0.0, -1.0, NAN], 2.0), [1.0, 2.0, NAN, NAN, NAN], equal_nan=True)
    assert np.isnan(relative_to([1.0, 2.0], 0.0)).all()
    assert np.isnan(relative_to([1.0, 2.0], NAN)).all()


def test_heatmap_cells_are_centred_on_the_measurement_steps():
    np.testing.assert_allclose(cell_edges([0, 10, 20]), [-5, 5, 15, 25])
    np.testing.assert_allclose(cell_edges([0, 1, 5]), [-0.5, 0.5, 3, 7])
    np.testing.assert_allclose(cell_edges([7]), [6.5, 7.5])


def test_a_history_is_thinned_to_the_measurements_nearest_evenly_spaced_steps():
    def measured_at(steps):
        return [(step, {}, {}) for step in steps]

    def steps_of(measurements):
        return [m[0] for m in measurements]

    assert steps_of(spread_over_steps(measured_at(range(4)), 4)) == [0, 1, 2, 3]
    assert steps_of(spread_over_steps(measured_at(range(10)), 4)) == [0, 3, 6, 9]
    assert steps_of(spread_over_steps(measured_at([0, 1, 2, 3, 50, 100]), 3)) == [0, 50, 100]


def _is_picture(image: np.ndarray, min_size: tuple[int, int] = (300, 400)) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min_size[0] <= image.shape[0] <= 1600 and min_size[1] <= image.shape[1] <= 1000
    assert image.std() > 0  # something is drawn


def test_fisher_heatmap_grows_with_the_layers_within_bounds():
    steps = [0, 5, 10]
    small = fisher_heatmap(steps, ["a", "b"], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    names = [f"encoder.layers.{i}.self_attn.out_proj" for i in range(200)]
    large = fisher_heatmap(steps, names, np.random.default_rng(0).random((200, 3)))
    _is_picture(small)
    _is_picture(large)
    assert small.shape[0] < large.shape[0] <= 1600


def test_fisher_heatmap_of_one_measurement_with_a_non_finite_layer():
    _is_picture(fisher_heatmap([0], ["", "fc"], [[NAN], [1.0]]))


def test_signal_profile_with_history_and_forward_only():
    layers = [f"net.{i}" for i in range(6)]
    measurements = [
        (step, {n: 0.5**i for i, n in enumerate(layers)}, {n: 2.0**i for i, n in enumerate(layers)})
        for step in range(0, 600, 20)  # more than the earlier profiles drawn
    ]
    both = signal_profile(measurements)
    forward_only = signal_profile([(0, measurements[0][1], {})])
    _is_picture(both)
    _is_picture(forward_only)
    assert forward_only.shape[1] < both.shape[1]  # one panel instead of two


def test_signal_profile_survives_vanished_signals():
    _is_picture(signal_profile([(0, {"a": 1.0, "b": 0.0, "c": NAN}, {"a": 0.0, "b": 0.0, "c": 0.0})]))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dropout=[0.1] * 50 + [0.0] * 50),
        dict(block_rates=[[0.05, 0.1]] * 100, windows=[(0, 30, "blur")]),
        dict(windows=[(0, 30, "blur"), (60, 80, "noise")], now=100),
    ],
)
def test_schedule_overview_draws_what_it_is_given(kwargs):
    _is_picture(schedule_overview(list(range(100)), **kwargs), min_size=(300, 600))


def test_drawing_opens_no_pyplot_figure_and_keeps_the_backend():
    import matplotlib.pyplot as plt

    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    fisher_heatmap([0], ["a"], [[1.0]])
    signal_profile([(0, {"a": 1.0}, {})])
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == open_figures
