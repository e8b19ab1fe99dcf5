"""On one CUDA device (skipped without one; `benchmarks/gpu_check.sh` runs them): every callback under ``bf16-mixed``
and ``16-mixed`` (a real GradScaler), and the sharded strategies on one device — FSDP (Lightning's FSDP1 wrapping),
ModelParallel (FSDP2 ``fully_shard``) and DeepSpeed where installed — where each callback refuses at fit start or works
as docs/accelerators.md ("Sharded strategies") says."""

from __future__ import annotations

import importlib.util
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import gaussian_loader, read_scalars
from lightning.pytorch.callbacks import Callback
from test_precision import every_callback

from lightning_startwell import (
    DeficitInjector,
    DropoutSchedule,
    FisherTraceMonitor,
    GradientDynamicsMonitor,
    InitScheme,
    ResNet,
    SignalPropagationMonitor,
    StochasticDepthSchedule,
)
from lightning_startwell.deficits import blur

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_trainer(root, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=root, accelerator="cuda", devices=1, max_epochs=1, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def positive_finite(scalars, prefix) -> list[float]:
    values = [v for tag, points in scalars.items() if tag.startswith(prefix) for _, v in points]
    assert values and all(math.isfinite(v) and v > 0 for v in values), (prefix, values)
    return values


# --- mixed precision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_every_callback_trains_under_mixed_precision(tmp_path, precision):
    torch.manual_seed(0)
    trainer = cuda_trainer(tmp_path, every_callback(), precision=precision, max_steps=4)
    trainer.fit(ResNet(num_blocks=2, width=8, dropout=0.1), gaussian_loader())
    scalars = read_scalars(tmp_path)
    for prefix in ("startwell/init/forward_ratio/", "startwell/signal/forward/", "startwell/signal/backward/",
                   "startwell/fisher/trace", "startwell/dynamics/direction_variance"):
        positive_finite(scalars, prefix)
    assert len(scalars["startwell/fisher/trace"]) == 3


def test_backward_variances_under_16_mixed_are_unscaled(tmp_path):
    """The GradScaler multiplies the loss by 2^16: the logged backward variances at step 0 (same weights, same batch)
    must match a float32 run's to fp16 accuracy, not be 2^32 times larger."""

    def run(root, precision):
        pl.seed_everything(0)
        trainer = cuda_trainer(root, [SignalPropagationMonitor(every_n_steps=1)], precision=precision, max_steps=1)
        trainer.fit(ResNet(num_blocks=2, width=8), gaussian_loader())
        return {t: dict(p)[0] for t, p in read_scalars(root).items() if t.startswith("startwell/signal/backward/")}

    full, mixed = run(tmp_path / "32", "32-true"), run(tmp_path / "16", "16-mixed")
    assert full.keys() == mixed.keys() and full
    for tag, value in full.items():
        assert mixed[tag] == pytest.approx(value, rel=0.05), tag


# --- sharded strategies on one device -------------------------------------------------------------------------------


class FullyShardedResNet(ResNet):
    """The demo ResNet sharded with FSDP2's ``fully_shard`` in ``configure_model``, as ModelParallelStrategy wants."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.stem, *self.blocks, self.head):
            fully_shard(module, mesh=mesh)


class RecordBatch(Callback):
    """Placed before DeficitInjector: the inputs as they come."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.raw = batch[0].clone()


class CheckScheduled(Callback):
    """Placed after DropoutSchedule and DeficitInjector: every dropout module reachable in the (wrapped) model holds
    the scheduled rate, and the inputs are blurred."""

    def __init__(self, schedule: DropoutSchedule, before: RecordBatch) -> None:
        self.schedule, self.before, self.checked = schedule, before, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        rates = [m.p for m in pl_module.modules() if isinstance(m, torch.nn.Dropout)]
        assert rates and all(r == pytest.approx(self.schedule.rate_at(trainer.global_step)) for r in rates), rates
        torch.testing.assert_close(batch[0], blur(self.before.raw, 4))
        self.checked += 1


def supported_fit(tmp_path, strategy, model) -> None:
    schedule = DropoutSchedule(p=0.3, mode="early", shape="linear", cutoff_steps=3)
    before = RecordBatch()
    check = CheckScheduled(schedule, before)
    callbacks = [before, DeficitInjector("blur", start_epoch=0, end_epoch=1, size=4), schedule, check]
    cuda_trainer(tmp_path, callbacks, strategy=strategy, max_steps=4).fit(model, gaussian_loader())
    assert check.checked == 4
    assert all(m.p == pytest.approx(0.1) for m in model.modules() if isinstance(m, torch.nn.Dropout))  # restored


REFUSED = {  # under FSDP and ModelParallel
    "InitScheme": lambda: InitScheme("he_normal", seed=0),
    "FisherTraceMonitor": lambda: FisherTraceMonitor(num_samples=16, every_n_steps=2),
    "GradientDynamicsMonitor": lambda: GradientDynamicsMonitor(every_n_steps=2),
    "SignalPropagationMonitor": lambda: SignalPropagationMonitor(every_n_steps=2),
    "StochasticDepthSchedule": lambda: StochasticDepthSchedule(drop_rate=0.2),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel"])
def test_sharded_one_device_refused(tmp_path, name, strategy):
    model = ResNet(num_blocks=2, width=8, dropout=0.1) if strategy == "fsdp" else FullyShardedResNet(num_blocks=2)
    expected = "FSDPStrategy" if strategy == "fsdp" else "ModelParallelStrategy"
    with pytest.raises(ValueError, match=f"{name}.* does not support `strategy`={expected}"):
        cuda_trainer(tmp_path, [REFUSED[name]()], strategy=strategy, max_steps=2).fit(model, gaussian_loader())


def test_fsdp_one_device_dropout_schedule_and_deficit(tmp_path):
    supported_fit(tmp_path, "fsdp", ResNet(num_blocks=2, width=8, dropout=0.1))


def test_fsdp_one_device_refuses_exclude(tmp_path):
    schedule = DropoutSchedule(p=0.3, exclude=["blocks.0.branch.3"])
    with pytest.raises(ValueError, match="does not support `strategy`=FSDPStrategy"):
        cuda_trainer(tmp_path, [schedule], strategy="fsdp", max_steps=2).fit(ResNet(dropout=0.1), gaussian_loader())


def test_model_parallel_one_device_dropout_schedule_and_deficit(tmp_path):
    supported_fit(tmp_path, "model_parallel", FullyShardedResNet(num_blocks=2, width=8, dropout=0.1))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_deepspeed_one_device(tmp_path):
    for name, make in REFUSED.items():
        if name == "StochasticDepthSchedule":
            continue  # supported under DeepSpeed
        with pytest.raises(ValueError, match="does not support `strategy`=DeepSpeedStrategy"):
            cuda_trainer(tmp_path, [make()], strategy="deepspeed_stage_3", max_steps=2).fit(
                ResNet(num_blocks=2, width=8), gaussian_loader()
            )
    depth = StochasticDepthSchedule(drop_rate=0.2)
    cuda_trainer(tmp_path / "depth", [depth], strategy="deepspeed_stage_3", precision="bf16-mixed", max_steps=3).fit(
        ResNet(num_blocks=2, width=8), gaussian_loader()
    )
    assert read_scalars(tmp_path / "depth")["startwell/depth/drop_rate"]
    supported_fit(tmp_path / "supported", "deepspeed_stage_3", ResNet(num_blocks=2, width=8, dropout=0.1))
