"""torch.compile on CPU with a counting backend: what is verified of issue 15's compile findings (bounded
compilations of DropoutSchedule's defaults). Forward hooks attached after a graph exists, and measurements outside the
compiled graph, are not addressed yet (docs/accelerators.md)."""

from __future__ import annotations

import pytest

from lightning_startwell import MLP, DropoutSchedule
from lightning_startwell.callbacks.dropout_schedule import COMPILED_RATE_LEVELS
from test_schedule_callbacks import _count_compiles


def test_dropout_schedule_defaults_compile_a_bounded_number_of_times():
    mlp = MLP(depth=2, width=16, dropout=0.1)
    mlp._compiler_ctx = {"compiler": "dynamo"}  # what Lightning sets on a module passed as torch.compile(module)
    dropout = DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=40)  # exact rates by default
    with pytest.warns(UserWarning, match="rounded to 5 levels"):
        compilations = _count_compiles(mlp, dropout, 60, (1, 8, 8))
    assert compilations <= COMPILED_RATE_LEVELS  # a new rate at every one of the first 40 steps without the rounding
    assert {round(dropout.rate_at(s) / 0.025, 9) for s in range(60)} <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_an_eager_model_keeps_exact_rates():
    mlp = MLP(depth=2, width=16, dropout=0.1)
    dropout = DropoutSchedule(p=0.1, mode="early", shape="linear", cutoff_steps=40)
    _count_compiles(mlp, dropout, 1, (1, 8, 8))
    assert len({dropout.rate_at(s) for s in range(40)}) == 40
