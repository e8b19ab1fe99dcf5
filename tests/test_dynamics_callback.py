"""GradientDynamicsMonitor under a real Trainer: values against a hand-run SGD loop, training untouched, mid-epoch
resume, DDP equal to one process, LightningCLI YAML, bad arguments, fast_dev_run, third-party models."""

from __future__ import annotations

import copy
import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import ddp_spawn_flake, make_trainer, read_scalars
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_fisher_callback import StopAt
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import GradientDynamicsMonitor
from lightning_startwell.cli import main
from lightning_startwell.models import MLP, Classifier, ResNet

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(96, 1, 8, 8, generator=G), torch.randint(0, 10, (96,), generator=G)
TAGS = ("grad_norm", "distance", "direction_variance", "direction_error")


def loader(shuffle=False, batch_size=16):
    return DataLoader(TensorDataset(X, Y), batch_size=batch_size, shuffle=shuffle)


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)


def logged(root):
    scalars = read_scalars(root / "lightning_logs")
    return {tag: dict(scalars[f"startwell/dynamics/{tag}"]) for tag in TAGS if f"startwell/dynamics/{tag}" in scalars}


def flat_grad(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def cosine_distance(a, b):
    return (1 - float(a @ b / (a.norm() * b.norm()))) / 2


def test_logged_values_equal_a_hand_run_sgd_loop(tmp_path):
    model = MLP(depth=2, width=16, optimizer=plain_sgd)
    net = copy.deepcopy(model)
    monitor = GradientDynamicsMonitor(num_batches=3, batch_size=10, every_n_steps=2)
    make_trainer(tmp_path, [monitor], max_steps=5).fit(model, loader())
    values = logged(tmp_path)
    assert all(sorted(values[tag]) == [0, 2, 4] for tag in TAGS)

    chosen = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:30]
    probe = list(zip(X[chosen].split(10), Y[chosen].split(10), strict=True))
    initial = [p.detach().clone() for p in net.parameters()]
    for step, (x, y) in enumerate(itertools.islice(loader(), 5)):
        if step % 2 == 0:
            grads = [flat_grad(net, px, py) for px, py in probe]
            whole = flat_grad(net, X[chosen], Y[chosen])  # the whole probe set in one pass
            pairs = [cosine_distance(a, b) for a, b in itertools.combinations(grads, 2)]
            distance = math.sqrt(
                sum(
                    float((p.detach() - w0).double().pow(2).sum())
                    for p, w0 in zip(net.parameters(), initial, strict=True)
                )
            )
            assert values["distance"][step] == pytest.approx(distance, rel=1e-5, abs=1e-7)
            assert values["direction_variance"][step] == pytest.approx(sum(pairs) / 3, rel=1e-5)
            assert values["direction_error"][step] == pytest.approx(
                sum(cosine_distance(g, whole) for g in grads) / 3, rel=1e-4
            )
        gradient = flat_grad(net, x, y)
        if step % 2 == 0:
            assert values["grad_norm"][step] == pytest.approx(float(gradient.norm()), rel=1e-5)
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.1 * p.grad
    assert values["distance"][4] > values["distance"][2] > 0


class RecordGradNorms(Callback):
    """The float64 norm of every gradient the optimizer receives, by step."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        squares = sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters() if p.grad is not None)
        self.norms[trainer.global_step] = math.sqrt(squares)


def test_epoch_cadence_logs_the_mean_gradient_norm_of_the_epoch(tmp_path):
    recorder = RecordGradNorms()
    monitor = GradientDynamicsMonitor(num_batches=2, every_n_epochs=1)
    make_trainer(tmp_path, [monitor, recorder], max_epochs=2).fit(MLP(optimizer=plain_sgd), loader(shuffle=True))
    values = logged(tmp_path)
    assert sorted(values["distance"]) == [0, 6, 12] and values["distance"][0] == 0.0
    assert sorted(values["grad_norm"]) == [6, 12]  # no gradient before the first step
    for end in (6, 12):
        expected = sum(recorder.norms[s] for s in range(end - 6, end)) / 6
        assert values["grad_norm"][end] == pytest.approx(expected, rel=1e-5)


def test_training_is_the_same_with_and_without_the_monitor(tmp_path):
    """Dropout and BatchNorm in the model: the monitor's forward passes in training mode would move the running
    statistics, draw from the global random streams and (with .backward) add to .grad, if it did any of these."""

    def run(root, callbacks):
        pl.seed_everything(0)
        model = ResNet(num_blocks=2, width=8, dropout=0.3)
        trainer = make_trainer(root, callbacks, max_steps=7, max_epochs=2, deterministic=True)
        trainer.fit(model, loader(shuffle=True))
        return model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()

    plain = run(tmp_path / "plain", [])
    monitored = run(tmp_path / "monitored", [GradientDynamicsMonitor(num_batches=3, every_n_steps=1)])
    assert set(plain[0]) == set(monitored[0])
    for name, value in plain[0].items():  # weights, BatchNorm running statistics and their counters
        assert torch.equal(value, monitored[0][name]), name
    for index, state in plain[1]["state"].items():  # momentum buffers
        assert torch.equal(state["momentum_buffer"], monitored[1]["state"][index]["momentum_buffer"])
    assert torch.equal(plain[2], monitored[2])  # the global random stream is where training left it
    values = logged(tmp_path / "monitored")
    assert sorted(values["direction_variance"]) == list(range(7))
    assert all(0 < v < 1 for v in values["direction_variance"].values())  # random labels: near 0.5


@pytest.mark.parametrize("cadence", [{"every_n_steps": 2}, {"every_n_epochs": 1}])
def test_mid_epoch_resume_continues_the_uninterrupted_curves(tmp_path, cadence):
    same_batches = DataLoader(TensorDataset(X[:16].repeat(8, 1, 1, 1), Y[:16].repeat(8)), batch_size=16)  # 8 alike

    def run(root, ckpt_path=None, extra=()):
        pl.seed_everything(0)
        monitor = GradientDynamicsMonitor(num_batches=2, **cadence)
        trainer = make_trainer(root, [monitor, *extra], max_steps=16, max_epochs=-1)
        trainer.fit(MLP(optimizer=plain_sgd), same_batches, ckpt_path=ckpt_path)
        return logged(root)

    full = run(tmp_path / "full")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    run(tmp_path / "first", extra=[checkpoint, StopAt(5)])
    resumed = run(tmp_path / "second", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt")
    later = [s for s in full["distance"] if s > 5]
    assert later and all(sorted(resumed[tag]) == later for tag in ("distance", "direction_variance"))
    for tag in TAGS:  # distance from the checkpoint's w_0; with epochs, the norms of steps 0-4 kept in the mean
        assert resumed[tag] == pytest.approx({s: v for s, v in full[tag].items() if s > 5}, rel=1e-6)


def test_resume_from_a_checkpoint_without_the_monitor_warns_and_measures_from_there(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    make_trainer(tmp_path / "first", [checkpoint], max_epochs=1).fit(MLP(), loader())
    monitor = GradientDynamicsMonitor(num_batches=2, every_n_steps=6)
    with pytest.warns(UserWarning, match="no initial weights"):
        make_trainer(tmp_path, [monitor], max_epochs=2).fit(
            MLP(), loader(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
        )
    assert logged(tmp_path)["distance"] == {6: 0.0}


@pytest.mark.slow
@ddp_spawn_flake
def test_two_process_ddp_logs_the_single_process_directions(tmp_path):
    # Dropout active in the probe: the masks of probe batch k must not depend on which rank measures it. Five
    # batches split 3 + 2. Learning rate 0: the same model at every measurement.
    def run(root, **kwargs):
        pl.seed_everything(0)
        trainer = pl.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_steps=2,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            **kwargs,
            callbacks=[GradientDynamicsMonitor(num_batches=5, batch_size=8, every_n_steps=1)],
        )
        trainer.fit(MLP(depth=2, width=16, dropout=0.5, optimizer=frozen_sgd), loader())
        return logged(root)

    single = run(tmp_path / "single", devices=1)
    ddp = run(tmp_path / "ddp", devices=2, strategy="ddp_spawn")
    for tag in ("direction_variance", "direction_error"):
        assert sorted(ddp[tag]) == [0, 1]
        assert ddp[tag] == pytest.approx(single[tag], rel=1e-9)
    assert ddp["distance"] == {0: 0.0, 1: 0.0}
    assert sorted(ddp["grad_norm"]) == [0, 1]


CONFIG = """
trainer:
  max_steps: 4
  log_every_n_steps: 1
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_startwell.GradientDynamicsMonitor
      init_args: {every_n_steps: 2, num_batches: 4, batch_size: 32, seed: 3}
model:
  class_path: lightning_startwell.MLP
  init_args: {depth: 1, width: 32, dropout: 0.1}
data:
  class_path: lightning_startwell.DigitsDataModule
"""


def test_lightning_cli_yaml(tmp_path):
    config = tmp_path / "dynamics.yaml"
    config.write_text(CONFIG)
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path)])
    values = logged(tmp_path)
    assert all(sorted(values[tag]) == [0, 2] for tag in TAGS)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_batches": 1}, "num_batches"),
        ({"batch_size": 0}, "batch_size"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"every_n_steps": 2, "every_n_epochs": 1}, "every_n_epochs"),
        ({"loss": "nll"}, "loss"),
        ({"input_key": []}, "input_key"),
        ({"measure_directions": "yes"}, "measure_directions"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        GradientDynamicsMonitor(**kwargs)


def test_a_target_key_not_in_the_batch_fails_before_training_naming_it(tmp_path):
    model = MLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="target_key"):
        make_trainer(tmp_path, [GradientDynamicsMonitor(target_key=2)], max_steps=2).fit(model, loader())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # not a step taken


def test_a_probe_larger_than_the_data_warns_and_uses_what_there_is(tmp_path):
    monitor = GradientDynamicsMonitor(num_batches=8, batch_size=40, every_n_steps=1)
    with pytest.warns(UserWarning, match="2 probe batches of 40"):
        make_trainer(tmp_path, [monitor], max_steps=1).fit(MLP(), loader())
    assert sorted(logged(tmp_path)["direction_variance"]) == [0]


def test_without_directions_only_norm_and_distance_are_logged(tmp_path):
    monitor = GradientDynamicsMonitor(every_n_steps=1, measure_directions=False)
    make_trainer(tmp_path, [monitor], max_steps=2).fit(MLP(), loader())
    assert sorted(logged(tmp_path)) == ["distance", "grad_norm"]


def test_fast_dev_run_runs_without_warnings(tmp_path, recwarn):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        fast_dev_run=True,
        enable_progress_bar=False,
        callbacks=[GradientDynamicsMonitor(num_batches=20, batch_size=16)],
    )
    trainer.fit(MLP(), loader())
    assert not [w for w in recwarn if "GradientDynamicsMonitor" in str(w.message)]


class Wrapped(Classifier):
    def __init__(self, net, input_shape):
        super().__init__(input_shape=input_shape, num_classes=10)
        self.net = net


def test_third_party_models(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        num_classes=10,
        depth=2,
        drop_rate=0.1,
        in_chans=1,
    )
    from torchvision.models.resnet import BasicBlock
    from torchvision.models.resnet import ResNet as TorchvisionResNet

    resnet = TorchvisionResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # BatchNorm, in-place ReLU, out += identity
    data = {"vit": (vit, (1, 16, 16)), "resnet": (resnet, (3, 16, 16))}
    for name, (net, shape) in data.items():
        x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
        model = Wrapped(net, shape)
        monitor = GradientDynamicsMonitor(num_batches=3, batch_size=8, every_n_steps=1)
        make_trainer(tmp_path / name, [monitor], max_steps=2).fit(model, DataLoader(TensorDataset(x, Y[:64]), 16))
        values = logged(tmp_path / name)
        assert all(sorted(values[tag]) == [0, 1] for tag in TAGS), name
        assert 0 < values["direction_variance"][0] < 1 and values["distance"][1] > 0, (name, values)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_half_precision_runs_measure_finite_values(tmp_path, precision):
    monitor = GradientDynamicsMonitor(num_batches=3, every_n_steps=1)
    make_trainer(tmp_path, [monitor], max_steps=2, precision=precision).fit(MLP(optimizer=plain_sgd), loader())
    values = logged(tmp_path)
    assert all(sorted(values[tag]) == [0, 1] and all(map(math.isfinite, values[tag].values())) for tag in TAGS)
    assert 0 < values["direction_variance"][1] < 1


def test_says_once_what_it_attached_to(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [GradientDynamicsMonitor(num_batches=3, every_n_steps=1)], max_steps=1).fit(
            MLP(depth=1), loader()
        )
    lines = [r.getMessage() for r in caplog.records if "GradientDynamicsMonitor attached" in r.getMessage()]
    assert len(lines) == 1
    assert "4 (net.1.weight, net.1.bias, net.4.weight, net.4.bias)" in lines[0] and "3 batches of 16" in lines[0]
