"""LSUV under DDP: every rank tests the variance of all ranks' batches, so all stop after the same number of forward
passes (a SyncBatchNorm forward is a collective: differing counts deadlock) and the result has unit variance on the
global batch, not on rank 0's alone."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import ddp_spawn_flake
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_startwell import MLP, InitScheme
from lightning_startwell.callbacks._common import first_train_batch
from lightning_startwell.init import calibration_mode, lsuv_rescale
from lightning_startwell.propagation import moments

TOL = 0.05


class RankScaled(MLP):
    """Each rank's data on its own scale (rank 1's inputs 10x rank 0's): LSUV on one rank's batch alone would give
    unit variance there and about 50 on the global batch."""

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 8, 8, generator=g) * (1 + 9 * self.global_rank)
        return DataLoader(TensorDataset(x, torch.randint(0, 10, (64,), generator=g)), batch_size=16)


class CheckGlobalVariance(Callback):
    """After InitScheme (later in the list): the forward passes of every rank, and the first layer's variance on the
    batch LSUV used on every rank."""

    def setup(self, trainer, pl_module, stage):
        self.calls = 0
        self.handle = pl_module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_fit_start(self, trainer, pl_module):
        self.handle.remove()
        counts = trainer.strategy.all_gather(torch.tensor(self.calls))
        assert counts[0] == counts[1] > 0, f"ranks ran {counts.tolist()} forward passes"
        x = trainer.strategy.all_gather(first_train_batch(trainer)[0])  # the batch LSUV used, of every rank
        assert x[1].std() > 5 * x[0].std()
        with calibration_mode(pl_module), torch.no_grad():
            out = pl_module.net[1](pl_module.net[0](x.flatten(0, 1)))  # MLP: Flatten, then the first Linear
        assert abs(out.var().item() - 1.0) < TOL, out.var().item()  # unit variance on the global batch


@pytest.mark.slow
@ddp_spawn_flake
def test_lsuv_under_ddp_tests_the_global_variance_on_every_rank(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        callbacks=[InitScheme("lsuv", seed=0, lsuv_tol=TOL, log_forward_ratio=False), CheckGlobalVariance()],
    )
    trainer.fit(RankScaled(depth=3, width=32, activation="tanh"))


def test_lsuv_with_a_reduction_uses_the_summed_moments():
    """One process standing for two: ``reduce`` adds the moments of another rank's outputs, as an all-reduce would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, other = torch.randn(32, 8), 3 * torch.randn(32, 8)

    def add_other_rank(m: torch.Tensor) -> torch.Tensor:
        return m + moments(model[0](other))

    final = lsuv_rescale(model, {"0": model[0]}, x, tol=0.01, reduce=add_other_rank)
    with torch.no_grad():
        both = model[0](torch.cat([x, other]))
    assert final["0"] == pytest.approx(both.var().item(), rel=1e-6)
    assert abs(both.var().item() - 1.0) < 0.01
