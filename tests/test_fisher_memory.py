"""Memory of the vmap fallbacks: out of memory is raised (never taken for "vmap cannot batch this"), whole-model chunks
are sized from the parameter count and the device's memory, and FisherTraceMonitor passes its ``chunk_size`` on."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer
from test_fisher import naive_fisher
from torch import nn

import lightning_startwell.fisher.fallbacks as fallbacks
from lightning_startwell.callbacks import FisherTraceMonitor
from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import MLP


class Scaled(nn.Module):
    """A layer with no closed form: its norms come from the per-module vmap fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), Scaled(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", ["auto", "vmap"])  # the per-module and the whole-model fallback
def test_out_of_memory_is_raised_not_taken_for_an_unsupported_kernel(monkeypatch, method):
    def out_of_memory(fn):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

        return run

    monkeypatch.setattr(fallbacks, "vmap", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fisher_trace(model(), torch.randn(5, 6), fisher="exact", method=method)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_kernel_vmap_cannot_batch_still_falls_back_to_a_loop(monkeypatch, method):
    def unsupported(fn):
        def run(*args):
            raise RuntimeError("Batching rule not implemented for aten::something")

        return run

    monkeypatch.setattr(fallbacks, "vmap", unsupported)
    net, x = model(), torch.randn(5, 6)
    reference = naive_fisher(net, x, "exact")
    assert fisher_trace(net, x, fisher="exact", method=method).per_layer == pytest.approx(reference, rel=1e-5)


def gpt2_sized() -> nn.Module:
    """124,439,808 parameters, as GPT-2 small (tied embedding counted once), on the meta device: no memory used."""
    layers = [nn.Embedding(50257, 768, device="meta"), nn.Embedding(1024, 768, device="meta")]
    for _ in range(12):
        layers += [
            nn.Linear(768, 3 * 768, device="meta"), nn.Linear(768, 768, device="meta"),
            nn.Linear(768, 4 * 768, device="meta"), nn.Linear(4 * 768, 768, device="meta"),
            nn.LayerNorm(768, device="meta"), nn.LayerNorm(768, device="meta"),
        ]
    return nn.Sequential(*layers, nn.LayerNorm(768, device="meta"))


def test_whole_model_chunks_are_sized_from_the_parameter_count(monkeypatch):
    big = gpt2_sized()
    assert sum(p.numel() for p in big.parameters()) == 124_439_808
    per_sample = 124_439_808 * 4  # float32 gradients: 0.5 GB per sample, 16 GB for the old fixed 32
    assert fallbacks.whole_model_chunk(big, None) == max(1, 2**28 // per_sample) == 1
    monkeypatch.setattr(fallbacks, "_memory_budget", lambda device: 10 * per_sample + 1)  # e.g. 20 GB free on a GPU
    assert fallbacks.whole_model_chunk(big, None) == 10
    monkeypatch.setattr(fallbacks, "_memory_budget", lambda device: 10**15)
    assert fallbacks.whole_model_chunk(big, None) == 32  # never more than the default chunk
    assert fallbacks.whole_model_chunk(big, 7) == 7  # a given chunk size is used as it is
    small = nn.Linear(10, 10)  # 110 float32 parameters: 440 bytes per sample
    monkeypatch.setattr(fallbacks, "_memory_budget", lambda device: 5 * 440 + 439)
    assert fallbacks.whole_model_chunk(small, None) == 5


def test_memory_budget_is_a_quarter_of_the_free_cuda_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 141 * 2**30))
    assert fallbacks._memory_budget(torch.device("cuda", 0)) == 20 * 2**30
    assert fallbacks._memory_budget(torch.device("cpu")) == 2**28


def test_whole_model_vmap_runs_in_the_sized_chunks_and_stays_exact(monkeypatch):
    net, x = model(), torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    per_sample = sum(p.numel() for p in net.parameters()) * 4
    monkeypatch.setattr(fallbacks, "_memory_budget", lambda device: 3 * per_sample)
    sizes = []
    vmap = fallbacks.vmap

    def counting(fn):
        batched = vmap(fn)

        def run(*args):
            sizes.append(len(args[-1]))
            return batched(*args)

        return run

    monkeypatch.setattr(fallbacks, "vmap", counting)
    ours = fisher_trace(net, x, fisher="exact", method="vmap")
    assert sizes == [3, 3, 2] * 3  # three classes, one pass each
    assert ours.per_layer == pytest.approx(naive_fisher(net, x, "exact"), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_monitor_refuses_a_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        FisherTraceMonitor(chunk_size=chunk_size)


def test_monitor_passes_its_chunk_size_to_the_measurement(tmp_path, monkeypatch):
    import lightning_startwell.callbacks.fisher_monitor as monitor_module

    seen = []
    measure = monitor_module.fisher_trace_sums
    spy = lambda *a, **k: seen.append(k["chunk_size"]) or measure(*a, **k)  # noqa: E731
    monkeypatch.setattr(monitor_module, "fisher_trace_sums", spy)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    make_trainer(tmp_path, [FisherTraceMonitor(num_samples=8, chunk_size=3, method="vmap")], max_steps=1).fit(
        MLP(width=8, depth=2), loader
    )
    assert seen == [3, 3]  # at the initialisation and at the end of the epoch
