"""FisherTraceMonitor under a real Trainer: cadence, value against the naive loop, DDP equals one process, warnings."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import ddp_spawn_flake, make_trainer, read_scalars
from test_fisher import naive_fisher
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import DeficitInjector, FisherTraceMonitor
from lightning_startwell.deficits import blur
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import MLP, ConvNet

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(96, 1, 8, 8, generator=G), torch.randint(0, 10, (96,), generator=G)


def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)


def _probe(num_samples, seed=0):
    chosen = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return X[chosen], Y[chosen]


def test_logged_trace_at_initialisation_equals_the_naive_loop_on_the_probe(tmp_path):
    model = ConvNet(channels=[4, 8])
    initial = copy.deepcopy(model)
    monitor = FisherTraceMonitor(num_samples=40, batch_size=16, every_n_steps=2, fisher="empirical")
    make_trainer(tmp_path, [monitor], max_steps=5).fit(model, loader())
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert [s for s, _ in scalars["startwell/fisher/trace"]] == [0, 2, 4]
    x, y = _probe(40)
    reference = naive_fisher(initial, x, "empirical", y)
    assert scalars["startwell/fisher/trace"][0][1] == pytest.approx(sum(reference.values()), rel=1e-5)
    for name, value in reference.items():
        assert scalars[f"startwell/fisher/layer/{name}"][0][1] == pytest.approx(value, rel=1e-4, abs=1e-9)
    per_layer_sum = sum(v[0][1] for k, v in scalars.items() if k.startswith("startwell/fisher/layer/"))
    assert per_layer_sum == pytest.approx(scalars["startwell/fisher/trace"][0][1], rel=1e-5)


class Regression(MLP):
    """Three real outputs fitted by mean squared error: a Gaussian likelihood."""

    def __init__(self):
        super().__init__(depth=1, width=16, num_classes=3)

    def training_step(self, batch, batch_idx):
        x, target = batch
        return torch.nn.functional.mse_loss(self(x), target)


def test_gaussian_likelihood_through_the_monitor_equals_a_float64_loop(tmp_path):
    targets = torch.randn(len(X), 3, generator=torch.Generator().manual_seed(1))
    model = Regression()
    initial = copy.deepcopy(model).double()
    monitor = FisherTraceMonitor(num_samples=40, batch_size=16, every_n_steps=5, fisher="empirical",
                                 likelihood="gaussian", noise_std=0.5)
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, DataLoader(TensorDataset(X, targets), batch_size=16))
    chosen = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:40]
    expected = {}
    for i in chosen:
        # log N(t | f(x), 0.5^2 I) = -||t - f(x)||^2 / (2 x 0.25) + const
        log_p = -(targets[i].double() - initial(X[i : i + 1].double())[0]).square().sum() / (2 * 0.25)
        for (name, _), g in zip(
            initial.named_parameters(), torch.autograd.grad(log_p, list(initial.parameters())), strict=True
        ):
            layer = name.rpartition(".")[0]
            expected[layer] = expected.get(layer, 0.0) + g.square().sum().item() / 40
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/fisher/trace"][0] == (0, pytest.approx(sum(expected.values()), rel=1e-5))
    for layer, value in expected.items():
        assert scalars[f"startwell/fisher/layer/{layer}"][0][1] == pytest.approx(value, rel=1e-4)


def test_vmap_method_through_the_monitor_equals_the_naive_loop(tmp_path):
    model = MLP(depth=2, width=16)
    initial = copy.deepcopy(model)
    monitor = FisherTraceMonitor(num_samples=40, batch_size=16, every_n_steps=5, fisher="empirical", method="vmap")
    make_trainer(tmp_path, [monitor], max_steps=1).fit(model, loader())
    x, y = _probe(40)
    reference = naive_fisher(initial, x, "empirical", y)
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/fisher/trace"][0][1] == pytest.approx(sum(reference.values()), rel=1e-5)
    for name, value in reference.items():
        assert scalars[f"startwell/fisher/layer/{name}"][0][1] == pytest.approx(value, rel=1e-4, abs=1e-9)


def test_training_probe_goes_through_the_active_deficit_and_the_clean_probe_does_not(tmp_path):
    model = ConvNet(channels=[4, 8], optimizer=frozen_sgd)  # learning rate 0: the same weights at every measurement
    initial = copy.deepcopy(model)
    x, y = _probe(40)
    blurred = naive_fisher(initial, blur(x, 2), "empirical", y)
    clean = naive_fisher(initial, x, "empirical", y)
    assert sum(blurred.values()) != pytest.approx(sum(clean.values()), rel=0.05)  # the deficit changes the trace

    def run(root, probe):
        monitor = FisherTraceMonitor(num_samples=40, batch_size=16, every_n_epochs=1, fisher="empirical", probe=probe)
        injector = DeficitInjector("blur", start_epoch=0, end_epoch=1, size=2)
        make_trainer(root, [injector, monitor], max_epochs=2).fit(copy.deepcopy(model).eval(), loader())
        return [v for _, v in read_scalars(root / "lightning_logs")["startwell/fisher/trace"]]

    # Measured at the initialisation and after epochs 0 (blurred) and 1 (clean); eval-mode BatchNorm, frozen weights.
    training = run(tmp_path / "training", "training")
    assert training == pytest.approx([sum(blurred.values())] * 2 + [sum(clean.values())], rel=1e-4)
    assert run(tmp_path / "clean", "clean") == pytest.approx([sum(clean.values())] * 3, rel=1e-4)


def test_training_probe_without_a_deficit_warns(tmp_path):
    with pytest.warns(UserWarning, match="no DeficitInjector"):
        make_trainer(tmp_path, [FisherTraceMonitor(num_samples=8, every_n_steps=1, probe="training")], max_steps=1).fit(
            MLP(), loader()
        )


def test_epoch_cadence_and_custom_scalar_layout(tmp_path):
    monitor = FisherTraceMonitor(num_samples=16, every_n_epochs=2, log_per_layer=True)
    make_trainer(tmp_path, [monitor], max_epochs=4).fit(MLP(), loader())
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert [s for s, _ in scalars["startwell/fisher/trace"]] == [0, 12, 24]  # 6 steps an epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    assert acc.summary_metadata  # written
    raw = event_file.read_bytes()
    assert b"Fisher trace per layer" in raw and b"startwell/fisher/layer/.*" in raw


def test_measurement_does_not_change_training(tmp_path):
    def run(root, callbacks):
        pl.seed_everything(0)
        model = MLP(depth=1, width=8, dropout=0.2)
        make_trainer(root, callbacks, max_steps=6).fit(model, loader())
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = run(tmp_path / "plain", [])
    watched = run(tmp_path / "watched", [FisherTraceMonitor(num_samples=32, every_n_steps=1, fisher="true")])
    assert torch.equal(plain, watched)


def test_non_finite_trace_is_logged_and_warned_and_training_goes_on(tmp_path):
    model = MLP()
    with torch.no_grad():
        model.net[1].weight[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="Fisher trace"):
        make_trainer(tmp_path, [FisherTraceMonitor(num_samples=8, every_n_steps=1)], max_steps=2).fit(model, loader())


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"every_n_steps": 5, "every_n_epochs": 1}, "every_n_steps"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_epochs": 1, "num_samples": 0}, "num_samples"),
        ({"every_n_epochs": 1, "fisher": "observed"}, "fisher"),
        ({"every_n_epochs": 1, "method": "backpack"}, "method"),
        ({"every_n_epochs": 1, "probe": "deficit"}, "probe"),
    ],
)
def test_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        FisherTraceMonitor(**kwargs)


def test_batch_without_the_named_key_is_refused(tmp_path):
    monitor = FisherTraceMonitor(every_n_epochs=1, input_key="image")
    with pytest.raises(ValueError, match="input_key"):
        make_trainer(tmp_path, [monitor], max_steps=1).fit(MLP(), loader())


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_logs_the_single_process_trace(tmp_path):
    model = MLP(depth=2, width=16, optimizer=frozen_sgd)  # no BatchNorm: nothing changes the model between steps
    expected = fisher_trace(copy.deepcopy(model), *_probe(48)[:1], fisher="empirical", targets=_probe(48)[1])
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[FisherTraceMonitor(num_samples=48, batch_size=10, every_n_steps=1, fisher="empirical")],
    )
    trainer.fit(model, loader())
    logged = read_scalars(tmp_path / "lightning_logs")["startwell/fisher/trace"]
    assert [s for s, _ in logged] == [0, 1, 2]
    for _, value in logged:  # learning rate 0: the same model at every measurement
        assert value == pytest.approx(expected.total, rel=1e-5)


class StopAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_mid_epoch_resume_continues_the_uninterrupted_curve(tmp_path, fisher):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = X[:16], Y[:16]
    same_batches = DataLoader(TensorDataset(x.repeat(8, 1, 1, 1), y.repeat(8)), batch_size=16)  # 8 identical batches

    def run(root, ckpt_path=None, extra=()):
        pl.seed_everything(0)
        monitor = FisherTraceMonitor(num_samples=32, every_n_steps=2, fisher=fisher)
        make_trainer(root, [monitor, *extra], max_steps=9, max_epochs=-1).fit(MLP(), same_batches, ckpt_path=ckpt_path)
        return read_scalars(root / "lightning_logs")["startwell/fisher/trace"]

    full = run(tmp_path / "full")
    assert [s for s, _ in full] == [0, 2, 4, 6, 8]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "first", extra=[checkpoint, StopAt(5)])
    resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    assert [s for s, _ in resumed] == [6, 8]
    assert dict(resumed) == pytest.approx({s: v for s, v in full if s >= 6}, rel=1e-6)
