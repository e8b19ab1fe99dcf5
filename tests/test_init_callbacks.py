"""InitScheme and SignalPropagationMonitor under a real Trainer: fit, resume, second fit, DDP, YAML, bad arguments."""

from __future__ import annotations

import math
import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import ddp_spawn_flake, gaussian_loader, make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_startwell.callbacks import InitScheme, SignalPropagationMonitor
from lightning_startwell.init import init_weights
from lightning_startwell.models import MLP


class Snapshot(Callback):
    """Keeps the parameters as they are when training starts (after every on_fit_start)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_fit_initialises_by_the_formula_of_each_argument_and_logs_the_report(tmp_path):
    # fan_out and a leaky slope, on 64 -> 512 -> 256 -> 10 layers: std sqrt(2 / ((1 + 0.5^2) fan_out)) per layer.
    model, snapshot = MLP(depth=2, width=512), Snapshot()
    with torch.no_grad():
        model.net[4] = torch.nn.Linear(512, 256)
        model.net[7] = torch.nn.Linear(256, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = InitScheme(
        "he_uniform", mode="fan_out", nonlinearity="leaky_relu", negative_slope=0.5, keep_bias=True,
        exclude=["net.7"], seed=3,
    )
    make_trainer(tmp_path, [init, snapshot]).fit(model, gaussian_loader())
    for name, fan_out in (("net.1", 512), ("net.4", 256)):
        expected = math.sqrt(2 / (1.25 * fan_out))
        weight = snapshot.params[f"{name}.weight"].double()
        assert weight.std().item() == pytest.approx(expected, rel=0.03), name
        assert weight.abs().max().item() <= math.sqrt(3) * expected + 1e-7
        assert torch.equal(snapshot.params[f"{name}.bias"], before[f"{name}.bias"])  # keep_bias
    assert torch.equal(snapshot.params["net.7.weight"], before["net.7.weight"])  # excluded
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert scalars["startwell/init/target_std/net.1"][0] == (0, pytest.approx(math.sqrt(2 / (1.25 * 512))))
    assert "startwell/init/std/net.7" not in scalars
    # The forward ratio of the second layer, recomputed from the first batch and the weights training started from.
    x = next(iter(gaussian_loader()))[0].flatten(1).double()
    w = {n: p.double() for n, p in snapshot.params.items()}
    z1 = x @ w["net.1.weight"].T + w["net.1.bias"]
    z2 = z1.clamp_min(0) @ w["net.4.weight"].T + w["net.4.bias"]
    assert scalars["startwell/init/forward_ratio/net.4"][0][1] == pytest.approx(
        z2.var().item() / z1.var().item(), rel=1e-4
    )


def test_include_initialises_only_the_layers_it_names(tmp_path):
    model, snapshot = MLP(depth=2, width=32), Snapshot()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainer(tmp_path, [InitScheme("he_normal", include=["net.4"], seed=0), snapshot], max_steps=1).fit(
        model, gaussian_loader()
    )
    changed = {n for n, p in snapshot.params.items() if not torch.equal(p, before[n])}
    assert changed == {"net.4.weight", "net.4.bias"}


def test_same_seed_gives_the_same_start_and_another_seed_another(tmp_path):
    starts = []
    for i, seed in enumerate((7, 7, 8)):
        snapshot = Snapshot()
        make_trainer(tmp_path / str(i), [InitScheme("orthogonal", seed=seed), snapshot], max_steps=1).fit(
            MLP(), gaussian_loader()
        )
        starts.append(snapshot.params["net.1.weight"])
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_zero_init_residual_and_fixup_through_the_callback(tmp_path):
    from lightning_startwell.models import ResNet

    resnet, snapshot = ResNet(num_blocks=2, width=8), Snapshot()
    make_trainer(tmp_path / "zero", [InitScheme(zero_init_residual=True, seed=0), snapshot], max_steps=1).fit(
        resnet, gaussian_loader()
    )
    assert all(torch.count_nonzero(snapshot.params[f"blocks.{i}.branch.5.weight"]) == 0 for i in range(2))
    assert torch.all(snapshot.params["blocks.0.branch.1.weight"] == 1)
    fixup, snapshot = ResNet(num_blocks=4, width=16, norm="none"), Snapshot()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "fixup", [InitScheme("fixup", seed=0), snapshot], max_steps=1).fit(
            fixup, gaussian_loader()
        )
    assert not [w for w in record if "without normalisation" in str(w.message)]
    first = torch.cat([snapshot.params[f"blocks.{i}.branch.1.weight"].flatten() for i in range(4)]).double()
    assert first.std().item() == pytest.approx(math.sqrt(2 / (16 * 9)) / 2, rel=0.05)  # He x 4^(-1/2)
    assert all(torch.count_nonzero(snapshot.params[f"blocks.{i}.branch.6.weight"]) == 0 for i in range(4))
    assert torch.count_nonzero(snapshot.params["head.3.weight"]) == 0


def test_fixup_on_a_normalised_resnet_warns_once(tmp_path):
    from lightning_startwell.models import ResNet

    with pytest.warns(UserWarning, match="fixup.*without normalisation") as record:
        make_trainer(tmp_path, [InitScheme("fixup", seed=0)], max_steps=1).fit(ResNet(num_blocks=2), gaussian_loader())
    assert sum("without normalisation" in str(w.message) for w in record) == 1


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
    """A 50-layer ReLU MLP on Gaussian 256-d inputs, learning rate 0: the monitor sees the initial network. Returns the
    logged scalars, Var[z^l] per layer and Var[dL/dz^1] / Var[dL/dz^last], both recomputed by a float64 loop."""
    model = MLP(input_shape=(1, 16, 16), depth=49, width=256, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    monitor = SignalPropagationMonitor(every_n_steps=1)
    make_trainer(tmp_path, [InitScheme(scheme, seed=0), monitor], max_steps=2).fit(
        model, gaussian_loader(num=512, shape=(1, 16, 16), batch_size=256)
    )
    scalars = read_scalars(tmp_path / "lightning_logs")
    x, y = next(iter(gaussian_loader(num=512, shape=(1, 16, 16), batch_size=256)))
    x = x.flatten(1).double().requires_grad_()
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    outputs = []
    for layer in linears:
        x = x @ layer.weight.detach().double().T + layer.bias.detach().double()
        x.retain_grad()
        outputs.append(x)
        x = x.clamp_min(0)
    torch.nn.functional.cross_entropy(outputs[-1], y).backward()
    variances = [z.var().item() for z in outputs]
    return scalars, variances, outputs[0].grad.var().item() / outputs[-1].grad.var().item()


def test_monitor_logs_the_collapse_of_glorot_and_the_flat_signal_of_he(tmp_path):
    he_scalars, he_var, he_backward = _deep_mlp_ratio(tmp_path / "he", "he_normal")
    glorot_scalars, glorot_var, glorot_backward = _deep_mlp_ratio(tmp_path / "glorot", "glorot_normal")
    for scalars, variances in ((he_scalars, he_var), (glorot_scalars, glorot_var)):
        assert [s for s, _ in scalars["startwell/signal/forward_ratio"]] == [0, 1]
        assert scalars["startwell/signal/forward_ratio"][0][1] == pytest.approx(variances[-1] / variances[0], rel=1e-3)
        assert scalars["startwell/signal/forward/net.1"][0][1] == pytest.approx(variances[0], rel=1e-3)
    assert 0.1 < he_scalars["startwell/signal/forward_ratio"][0][1] < 10
    assert glorot_scalars["startwell/signal/forward_ratio"][0][1] < 1e-6
    assert glorot_scalars["startwell/signal/backward_ratio"][0][1] < 1e-6  # gradients vanish towards the input too
    # Backward, the same float64 loop gives Var[dL/dz^1] / Var[dL/dz^last]. He (fan_in) keeps the variance through the
    # 256x256 layers; the one drop is the classifier, whose 10 outputs feed 256 units: ~ 10/256 = 0.04 there.
    for scalars, ratio in ((he_scalars, he_backward), (glorot_scalars, glorot_backward)):
        assert scalars["startwell/signal/backward_ratio"][0][1] == pytest.approx(ratio, rel=1e-3)
    assert 0.02 < he_scalars["startwell/signal/backward_ratio"][0][1] < 0.08


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


def test_monitor_with_gradient_accumulation_measures_the_first_micro_batch_of_a_step(tmp_path):
    x, y = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(128) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)  # 8 different batches
    model = MLP(depth=2, width=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # the weights stay the same
    make_trainer(tmp_path, [SignalPropagationMonitor(every_n_steps=2)], max_steps=4, accumulate_grad_batches=2).fit(
        model, loader
    )
    scalars = read_scalars(tmp_path / "lightning_logs")
    assert [s for s, _ in scalars["startwell/signal/forward/net.1"]] == [0, 2]  # once per measured step
    for step, batch in ((0, 0), (2, 4)):  # optimizer step 2 starts with micro-batch 4
        inputs = x[16 * batch : 16 * (batch + 1)].flatten(1).double().requires_grad_()
        z1 = inputs @ model.net[1].weight.double().T + model.net[1].bias.double()
        z2 = z1.clamp_min(0) @ model.net[4].weight.double().T + model.net[4].bias.double()
        z1.retain_grad(), z2.retain_grad()
        logits = z2.clamp_min(0) @ model.net[7].weight.double().T + model.net[7].bias.double()
        # The loss of that micro-batch, as the training step returns it (before Lightning divides it by 2 to
        # accumulate): the logged variances do not depend on the accumulation.
        torch.nn.functional.cross_entropy(logits, y[16 * batch : 16 * (batch + 1)]).backward()
        logged = {tag: dict(scalars[f"startwell/signal/{tag}"])[step] for tag in ("forward/net.4", "backward/net.1")}
        assert logged["forward/net.4"] == pytest.approx(z2.var().item(), rel=1e-4)
        assert logged["backward/net.1"] == pytest.approx(z1.grad.var().item(), rel=1e-4)


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
    [
        ("orthogonal", 11, _AssertSameAcrossRanks),
        ("orthogonal", None, _AssertSeedSharedAcrossRanks),
        ("lsuv", None, _AssertSeedSharedAcrossRanks),
    ],
)
@ddp_spawn_flake
def test_two_process_ddp_gives_identical_weights_and_monitor_runs(tmp_path, scheme, seed, check):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[
            _RankDependentRandomness(),
            InitScheme(scheme, seed=seed),
            check(),
            SignalPropagationMonitor(every_n_steps=1),
        ],
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
