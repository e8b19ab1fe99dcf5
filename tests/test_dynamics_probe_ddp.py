"""GradientDynamicsMonitor's probe under DDP: every rank runs the same number of forward and backward passes (a
SyncBatchNorm forward and backward are collectives: differing counts deadlock), with probe batches that do not split
evenly over the ranks and a training set of another size on each rank. SyncBatchNorm does not run on the CPU: a layer
that all-reduces in every forward pass stands for it."""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from conftest import ddp_spawn_flake
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell.callbacks import GradientDynamicsMonitor
from lightning_startwell.models import ConvNet


class CollectiveIdentity(nn.Module):
    """Identity whose forward is an all-reduce, as SyncBatchNorm's (in training mode) is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(x.detach().sum().reshape(1))
        return x


class RankSized(ConvNet):
    """Rank 0 holds 96 training items (12 probe batches of 8), rank 1 holds 24 (3), on another scale."""

    def __init__(self, collective: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collective = CollectiveIdentity() if collective else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.collective(x))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.global_rank)
        num = 96 if self.global_rank == 0 else 24
        x = torch.randn(num, 1, 8, 8, generator=g) * (1 + 4 * self.global_rank)
        return DataLoader(TensorDataset(x, torch.randint(0, 10, (num,), generator=g)), batch_size=8)


class CountPasses(Callback):
    """Forward passes of the model on each rank over the fit (training steps included: equal on every rank)."""

    def setup(self, trainer, pl_module, stage):
        self.calls = 0
        self.handle = pl_module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        counts = trainer.strategy.all_gather(torch.tensor(self.calls))
        # K = 3 (the smaller rank's), split 2 + 1: without the filler pass the ranks ran [8, 6] forward passes
        assert counts[0] == counts[1], f"ranks ran {counts.tolist()} forward passes"


@pytest.mark.slow
@ddp_spawn_flake
@pytest.mark.parametrize("collective", [False, True])
def test_probe_runs_the_same_passes_on_every_rank(tmp_path, collective):
    monitor = GradientDynamicsMonitor(num_batches=4, batch_size=8, every_n_steps=1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # a mismatch of collectives fails after 60 s instead of hanging
        strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
        callbacks=[monitor, CountPasses()],
    )
    trainer.fit(RankSized(collective, channels=[4]))
