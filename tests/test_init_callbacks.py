"""InitScheme and SignalPropagationMonitor under a real Trainer: fit, resume, second fit, DDP, YAML, bad arguments."""

from __future__ import annotations

import math
import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from conftest import ddp_spawn_flake, gaussian_loader, make_trainer, read_scalars
from lightning_startwell.callbacks import InitScheme, SignalPropagationMonitor
from lightning_startwell.init import init_weights
from lightning_startwell.models import MLP


class Snapshot(Callback):
    """Keeps the parameters as they are when training starts (after every on_fit_start)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_fit_initialises_with_the_seeded_scheme_and_logs_the_report(tmp_path):
    model, snapshot = MLP(depth=2, width=32), Snapshot()
    trainer = make_trainer(tmp_path, [InitScheme("he_uniform", seed=3), snapshot])
    trainer.fit(model, gaussian_loader())
    expected = MLP(depth=2, width=32)
    init_weights(expected, "he_uniform", generator=torch.Generator().manual_seed(3))
    for name, p in expected.named_parameters():
        assert torch.equal(snapshot.params[name], p), name
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/init/target_std/net.1"][0] == (0, pytest.approx(math.sqrt(2 / 64)))
    assert scalars["startwell/init/std/net.1"][0][1] == pytest.approx(snapshot.params["net.1.weight"].double().std().item(), rel=1e-5)
    assert scalars["startwell/init/forward_ratio/net.1"][0][1] == pytest.approx(1.0)
    assert "startwell/init/forward_ratio/net.7" in scalars


def test_resume_keeps_the_checkpoint_weights_bit_for_bit(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, [InitScheme(seed=0), checkpoint], max_epochs=2).fit(MLP(), gaussian_loader())
    mid_epoch = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"  # 4 batches an epoch: step 6 is inside epoch 1
    assert mid_epoch.exists(), list((tmp_path / "ckpt").iterdir())
    saved = torch.load(mid_epoch, weights_only=False)["state_dict"]
    snapshot = Snapshot()
    make_trainer(tmp_path, [InitScheme(seed=99), snapshot], max_epochs=3).fit(
        MLP(), gaussian_loader(), ckpt_path=mid_epoch
    )
    for name, p in snapshot.params.items():
        assert torch.equal(p, saved[name]), name


def test_not_applied_again_on_a_second_fit_nor_in_validate(tmp_path):
    model, init, snapshot = MLP(), InitScheme(seed=1), Snapshot()
    trainer = make_trainer(tmp_path, [init, snapshot], max_epochs=1, limit_val_batches=2)
    trainer.fit(model, gaussian_loader(), gaussian_loader())
    after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.validate(model, gaussian_loader())
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, gaussian_loader(), gaussian_loader())
    for name, p in snapshot.params.items():
        assert torch.equal(p, after_first[name]), name


def test_lsuv_in_a_fit_uses_a_training_batch_and_leaves_the_data_order_alone(tmp_path):
    model, snapshot = MLP(depth=3, width=64), Snapshot()
    trainer = make_trainer(tmp_path, [InitScheme("lsuv", seed=0, lsuv_tol=0.05), snapshot])
    trainer.fit(model, gaussian_loader(batch_size=32))
    reference = MLP(depth=3, width=64)
    for name, p in snapshot.params.items():
        reference.get_parameter(name).data.copy_(p)
    x = next(iter(gaussian_loader(batch_size=32)))[0]
    z = x.flatten(1)
    for layer in [m for m in reference.net if isinstance(m, torch.nn.Linear)]:
        z = layer(z)
        assert abs(z.var().item() - 1) < 0.05
        z = torch.relu(z)


def test_sharded_strategies_are_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = types.SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    with pytest.raises(ValueError, match="strategy"):
        InitScheme().setup(trainer, MLP(), "fit")


@pytest.mark.parametrize(
    ("cls", "kwargs", "named"),
    [
        (InitScheme, {"scheme": "xavier"}, "scheme"),
        (InitScheme, {"negative_slope": 2.0}, "negative_slope"),
        (InitScheme, {"lsuv_tol": 0.0}, "lsuv_tol"),
        (SignalPropagationMonitor, {"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_callback_arguments(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(**kwargs)


def test_include_pattern_matching_nothing_fails_at_setup(tmp_path):
    trainer = make_trainer(tmp_path, [SignalPropagationMonitor(include=["encoder.*"])])
    with pytest.raises(ValueError, match="include"):
        trainer.fit(MLP(), gaussian_loader())


def _deep_mlp_ratio(tmp_path, scheme):
    """A 50-layer ReLU MLP on Gaussian 256-d inputs, learning rate 0: the monitor sees the initial network."""
    model = MLP(input_shape=(1, 16, 16), depth=49, width=256, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    monitor = SignalPropagationMonitor(every_n_steps=1)
    make_trainer(tmp_path, [InitScheme(scheme, seed=0), monitor], max_steps=2).fit(
        model, gaussian_loader(num=512, shape=(1, 16, 16), batch_size=256)
    )
    scalars = read_scalars(tmp_path / "lightning_logs")
    x = next(iter(gaussian_loader(num=512, shape=(1, 16, 16), batch_size=256)))[0].flatten(1).double()
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    variances = []
    with torch.no_grad():
        for layer in linears:
            x = x @ layer.weight.double().T + layer.bias.double()
            variances.append(x.var().item())
            x = x.clamp_min(0)
    return scalars, variances


def test_monitor_logs_the_collapse_of_glorot_and_the_flat_signal_of_he(tmp_path):
    he_scalars, he_var = _deep_mlp_ratio(tmp_path / "he", "he_normal")
    glorot_scalars, glorot_var = _deep_mlp_ratio(tmp_path / "glorot", "glorot_normal")
    for scalars, variances in ((he_scalars, he_var), (glorot_scalars, glorot_var)):
        assert [s for s, _ in scalars["startwell/signal/forward_ratio"]] == [0, 1]
        assert scalars["startwell/signal/forward_ratio"][0][1] == pytest.approx(variances[-1] / variances[0], rel=1e-3)
        assert scalars["startwell/signal/forward/net.1"][0][1] == pytest.approx(variances[0], rel=1e-3)
    assert 0.1 < he_scalars["startwell/signal/forward_ratio"][0][1] < 10
    assert glorot_scalars["startwell/signal/forward_ratio"][0][1] < 1e-6
    assert glorot_scalars["startwell/signal/backward_ratio"][0][1] < 1e-6  # gradients vanish towards the input too
    # Backward, He (fan_in) keeps the variance through the 256x256 layers; the one drop is the classifier, whose
    # 10 outputs feed 256 units: Var shrinks by fan_out/fan_in = 10/256 ~ 0.04 there, not by a factor per layer.
    assert 0.04 / 8 < he_scalars["startwell/signal/backward_ratio"][0][1] < 0.04 * 8


def _same_batch_loader():
    """Four identical batches an epoch: a plain DataLoader restarts its epoch on a mid-epoch resume, so only data
    that does not depend on the position keeps the two runs comparable."""
    x, y = next(iter(gaussian_loader()))
    data = torch.utils.data.TensorDataset(x.repeat(4, 1, 1, 1), y.repeat(4))
    return torch.utils.data.DataLoader(data, batch_size=len(x), shuffle=False)


def _signal_run(root, max_steps, ckpt_path=None, callbacks=()):
    monitor = SignalPropagationMonitor(every_n_steps=2)
    trainer = make_trainer(root, [InitScheme(seed=0), monitor, *callbacks], max_steps=max_steps, max_epochs=-1)
    trainer.fit(MLP(), _same_batch_loader(), ckpt_path=ckpt_path)
    return read_scalars(root / "lightning_logs")


def test_monitor_cadence_and_mid_epoch_resume_give_the_uninterrupted_trajectory(tmp_path):
    full = _signal_run(tmp_path / "full", max_steps=7)
    assert [s for s, _ in full["startwell/signal/forward_ratio"]] == [0, 2, 4, 6]
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _signal_run(tmp_path / "first", max_steps=3, callbacks=[checkpoint])
    resumed = _signal_run(tmp_path / "second", max_steps=7, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert [s for s, _ in resumed["startwell/signal/forward_ratio"]] == [4, 6]
    for tag in ("startwell/signal/forward_ratio", "startwell/signal/backward/net.1"):
        assert dict(resumed[tag]) == pytest.approx({s: v for s, v in full[tag] if s >= 4}, rel=1e-5)


class _AssertSameAcrossRanks(Callback):
    def on_train_start(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree after InitScheme"
        expected = MLP(depth=2, width=32)
        init_weights(expected, "orthogonal", nonlinearity="relu", generator=torch.Generator().manual_seed(11))
        assert torch.equal(flat, torch.cat([p.detach().flatten() for p in expected.parameters()]))


class _AssertSeedSharedAcrossRanks(Callback):
    def on_train_start(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "ranks disagree with a broadcast seed"


class _RankDependentRandomness(Callback):
    """Gives each rank its own global random stream, so each draws a different first batch from a shuffling loader."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "seed", "check"),
    [("orthogonal", 11, _AssertSameAcrossRanks), ("orthogonal", None, _AssertSeedSharedAcrossRanks),
     ("lsuv", None, _AssertSeedSharedAcrossRanks)],
)
@ddp_spawn_flake
def test_two_process_ddp_gives_identical_weights_and_monitor_runs(tmp_path, scheme, seed, check):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        callbacks=[_RankDependentRandomness(), InitScheme(scheme, seed=seed), check(),
                   SignalPropagationMonitor(every_n_steps=1)],
    )
    loader = torch.utils.data.DataLoader(gaussian_loader().dataset, batch_size=16, shuffle=True)
    trainer.fit(MLP(depth=2, width=32), loader)
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert [s for s, _ in scalars["startwell/signal/forward_ratio"]] == [0, 1, 2]


def test_monitor_histograms_are_written_when_asked(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_trainer(tmp_path, [SignalPropagationMonitor(every_n_steps=2, log_histograms=True)], max_steps=3).fit(
        MLP(depth=1, width=8), gaussian_loader()
    )
    (event_file,) = (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()["histograms"]
    assert {"startwell/signal/forward_hist/net.1", "startwell/signal/backward_hist/net.4"} <= set(tags)
    assert [e.step for e in acc.Histograms("startwell/signal/forward_hist/net.1")] == [0, 2]
    first = acc.Histograms("startwell/signal/forward_hist/net.1")[0].histogram_value
    assert first.num == 16 * 8  # one batch of 16 samples, 8 units


def test_resume_from_a_run_without_init_scheme_keeps_its_weights(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path, [checkpoint], max_epochs=1).fit(MLP(), gaussian_loader())
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    init, snapshot = InitScheme(seed=5), Snapshot()
    make_trainer(tmp_path, [init, snapshot], max_epochs=2).fit(MLP(), gaussian_loader(), ckpt_path=path)
    assert not init.applied
    for name, p in snapshot.params.items():
        assert torch.equal(p, saved[name]), name
