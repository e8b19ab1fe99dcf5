"""torch.compile on CPU with a counting backend: DropoutSchedule's defaults compile a bounded number of times; every
callback on a model whose training step was compiled before it attached logs the numbers of the eager run and compiles
no more graphs than the model without it (hooks honoured, measurements outside the compiled graph); the helpers of
``lightning_startwell._compile``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader, make_trainer, read_scalars
from test_schedule_callbacks import _count_compiles
from torch import nn

from lightning_startwell import (
    MLP,
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell._compile import eager, forget_compiled_code, is_compiled
from lightning_startwell.callbacks.dropout_schedule import COMPILED_RATE_LEVELS
from lightning_startwell.model_call import routed


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


# --- The callbacks on a compiled model: the eager run's numbers, and no more compiled graphs than without them. ---
#
# A ResNet (with dropout) is fit one step compiled, so that the training step's code exists before any callback is
# attached (a warm-up, or a first fit: Lightning compiles ``training_step`` at its first call), then fit 6 steps with
# the callback. The counting backend runs Dynamo's captured graphs as they are (so random draws come in the same order
# as in eager mode) and counts them.

STEPS = 6


def _counting_backend():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return counting, graphs


def _fit_after_a_compiled_step(root, callbacks, compiled):
    """The scalars the second fit logged and the graphs compiled over both fits."""
    counting, graphs = _counting_backend()
    torch._dynamo.reset()
    pl.seed_everything(0)
    model = ResNet(num_blocks=2, width=4, dropout=0.1)
    make_trainer(root / "warm", [], max_steps=1).fit(torch.compile(model, backend=counting) if compiled else model,
                                                     gaussian_loader())
    pl.seed_everything(1)
    make_trainer(root / "run", callbacks, max_steps=STEPS).fit(model, gaussian_loader())
    torch._dynamo.reset()
    return read_scalars(root / "run"), len(graphs)


def _every_callback():
    return {
        "stochastic_depth": (lambda: StochasticDepthSchedule(drop_rate=0.5), "startwell/depth/"),
        "signal": (lambda: SignalPropagationMonitor(every_n_steps=2), "startwell/signal/backward/"),
        "fisher": (
            lambda: FisherTraceMonitor(num_samples=16, batch_size=8, every_n_steps=2),
            "startwell/fisher/layer/",
        ),
        "lsuv": (lambda: InitScheme("lsuv"), "startwell/init/forward_ratio/"),
        "dynamics": (lambda: GradientDynamicsMonitor(every_n_steps=2, num_batches=2), "startwell/dynamics/"),
        "deficit": (lambda: DeficitInjector("noise", start_epoch=0, end_epoch=1, noise_std=0.5), "startwell/deficit/"),
        "dropout": (lambda: DropoutSchedule(p=0.3, mode="early", cutoff_steps=4, rate_levels=3), "startwell/dropout/"),
    }


@pytest.fixture(scope="module")
def compiled_baseline(tmp_path_factory):
    """Graphs compiled by the two fits without any callback."""
    return _fit_after_a_compiled_step(tmp_path_factory.mktemp("baseline"), [], compiled=True)[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_every_callback()))
def test_a_callback_on_a_compiled_model_logs_the_eager_numbers(tmp_path, compiled_baseline, name):
    make, prefix = _every_callback()[name]
    eager_scalars, _ = _fit_after_a_compiled_step(tmp_path / "eager", [make()], compiled=False)
    scalars, graphs = _fit_after_a_compiled_step(tmp_path / "compiled", [make()], compiled=True)
    assert any(tag.startswith(prefix) for tag in scalars), sorted(scalars)
    assert sorted(scalars) == sorted(eager_scalars)
    for tag, points in eager_scalars.items():
        if tag.startswith("startwell/") or tag == "train/loss_step":
            assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
            assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-5, nan_ok=True), tag
    # Measurements run eagerly and compile nothing; stochastic depth drops the compiled code when its hooks come and go
    # (the training step compiles once more); each of the dropout schedule's 3 rate levels may compile once.
    allowed = {"stochastic_depth": 2 * compiled_baseline, "dropout": compiled_baseline + 3}
    assert graphs <= allowed.get(name, compiled_baseline), (graphs, compiled_baseline)


def test_is_compiled_sees_each_way_of_compiling():
    assert not is_compiled(nn.Sequential(nn.Linear(2, 2)))
    assert is_compiled(nn.Sequential(torch.compile(nn.Linear(2, 2), backend="eager")))  # a compiled submodule
    in_place = nn.Sequential(nn.Linear(2, 2))
    in_place[0].compile(backend="eager")
    assert is_compiled(in_place)
    lightning = MLP(depth=1, width=4)
    lightning._compiler_ctx = {"compiler": "dynamo"}  # Trainer.fit(torch.compile(module))
    assert is_compiled(lightning)


@pytest.fixture
def compiled_linear():
    """A Linear layer, its compiled form called once (one graph), an input, and the list of graphs compiled."""
    counting, graphs = _counting_backend()
    torch._dynamo.reset()
    layer = nn.Linear(3, 3)
    compiled = torch.compile(layer, backend=counting)
    x = torch.randn(2, 3)
    compiled(x)
    yield layer, compiled, x, graphs
    torch._dynamo.reset()


def test_eager_runs_the_hooks_compiled_code_skips_and_compiles_nothing(compiled_linear):
    layer, compiled, x, graphs = compiled_linear
    seen = []
    layer.register_forward_hook(lambda *args: seen.append(1))
    compiled(x)
    assert seen == []  # Dynamo does not guard on hooks: the reason for eager() and forget_compiled_code()
    with eager():
        compiled(x)
        compiled(torch.randn(5, 3, 1).squeeze(-1))  # a new shape, which compiled code would recompile for
    assert seen == [1, 1] and len(graphs) == 1


def test_forget_compiled_code_drops_a_compiled_models_code_only(compiled_linear):
    _, compiled, x, graphs = compiled_linear
    forget_compiled_code(nn.Linear(3, 3))  # not compiled: the other compiled code stays
    compiled(x)
    assert len(graphs) == 1
    forget_compiled_code(nn.Sequential(compiled))
    compiled(x)
    assert len(graphs) == 2


def test_routed_puts_back_the_instance_forward_it_shadows():
    layer = nn.Linear(2, 2)
    own = lambda x: torch.zeros(1)  # noqa: E731 - what Lightning puts there for a compiled module
    layer.forward = own
    with routed(layer, lambda x: x + 1):
        assert torch.equal(layer(torch.ones(1, 2)), torch.full((1, 2), 2.0))
    assert vars(layer)["forward"] is own
    plain = nn.Linear(2, 2)
    with routed(plain, lambda x: x):
        pass
    assert "forward" not in vars(plain)
