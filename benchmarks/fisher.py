"""Exact per-sample Fisher trace, side by side on the same model, inputs and labels (empirical Fisher):

* one training step (forward, backward, SGD step) as the unit of cost;
* a naive per-sample loop (one backward per example);
* torch.func ``vmap(grad)`` over the whole batch (per-sample gradients materialised);
* BackPACK's ``BatchL2Grad`` (where it runs);
* ours, ``fisher_trace(method="auto")``.

Models: a small conv net (the demo ConvNet on 8x8 digits), the demo ResNet (8x8), torchvision's ResNet-18 at CIFAR size
(3x32x32), and a small Transformer text classifier on token ids (attention, embedding and a position parameter: the
per-module fallback's ground). Each (model, method) runs in its own process so that its peak memory (peak RSS above the model and inputs,
on CPU; peak CUDA allocation on a GPU) is its own; in a process, time is the median of ``--repeats`` runs after one
warm-up. The methods of a model run one after another in each of ``--rounds`` rounds (so that a slow spell of a shared
machine hits them all) and the table shows the median over rounds, with the spread (max - min) of the rounds.
Agreement is the relative difference of the total trace from the naive loop's.

    python benchmarks/fisher.py [--device cpu|cuda] [--repeats 3] [--rounds 3]

Needs torchvision; BackPACK (``pip install backpack-for-pytorch``) is optional.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_startwell.fisher import fisher_trace
from lightning_startwell.models import ConvNet, ResNet

VOCABULARY = 1000


class TextClassifier(nn.Module):
    """Token ids -> embedding + a learned position parameter -> 2 Transformer encoder layers -> mean -> 4 classes: the
    parts our closed forms do not cover (attention, embedding, a parameter used directly by the model)."""

    def __init__(self, width: int = 64, tokens: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(1))


MODELS = {
    "small conv net (ConvNet 32-64, 1x8x8)": (lambda: ConvNet(input_shape=(1, 8, 8), channels=[32, 64]), (1, 8, 8), 10),
    "demo ResNet (8 blocks, width 32, 1x8x8)": (lambda: ResNet(input_shape=(1, 8, 8), num_blocks=8, width=32), (1, 8, 8), 10),
    "torchvision ResNet-18 (3x32x32)": (None, (3, 32, 32), 10),
    "Transformer text classifier (2 layers, width 64, 32 tokens)": (TextClassifier, (32,), 4),
}


def build(name: str) -> nn.Module:
    factory, _, classes = MODELS[name]
    if factory is None:
        import torchvision

        return torchvision.models.resnet18(num_classes=classes)
    return factory()


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.eval()
    return float("nan")


def naive(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(len(x)):
        log_p = model(x[i : i + 1]).log_softmax(-1)[0, y[i]]
        total += sum(g.square().sum().item() for g in torch.autograd.grad(log_p, params))
    return total / len(x)


def func_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def log_prob(p, xi, yi):
        return functional_call(model, (p, buffers), (xi[None],)).log_softmax(-1)[0].gather(0, yi[None]).squeeze(0)

    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.flatten(1).square().sum(1) for g in grads.values()).mean().item()


def backpack_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(model(x), y)
    with backpack(BatchL2Grad()):
        loss.backward()
    total = sum(p.batch_l2.sum().item() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return total / len(x)


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return fisher_trace(model, x, fisher="empirical", targets=y).total


def ours_large_cpu_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Ours with the accelerator's chunk budget (2^25 numbers) on CPU too: what the 1 MiB CPU chunks save."""
    import lightning_startwell.fisher as fisher_module

    fisher_module._chunk_samples = lambda per_sample, like: max(1, 2**25 // per_sample)
    return ours(model, x, y)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], float]] = {
    "training step": training_step,
    "naive per-sample loop": naive,
    "torch.func vmap(grad)": func_vmap,
    "BackPACK BatchL2Grad": backpack_l2,
    "lightning_startwell (auto)": ours,
}
CPU_ONLY = {"lightning_startwell, CPU chunks of 2^25 numbers": ours_large_cpu_chunks}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(model_name: str, method: str, batch: int, device: str, repeats: int, queue: Any) -> None:
    """In a fresh process: peak memory of the first run, then the median time of ``repeats`` runs."""
    try:
        torch.manual_seed(0)
        model = build(model_name).to(device).eval()
        _, shape, classes = MODELS[model_name]
        if isinstance(model, TextClassifier):
            x = torch.randint(0, VOCABULARY, (batch, *shape), device=device)
        else:
            x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes()
        run = {**METHODS, **CPU_ONLY}[method]
        value = run(model, x, y)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(model, x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        queue.put({"value": value, "seconds": statistics.median(times), "peak_bytes": max(peak, 0)})
    except Exception as error:  # noqa: BLE001 (a method that fails is reported, not fatal)
        queue.put({"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"})


def measure(model_name: str, method: str, batch: int, device: str, repeats: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=run_one, args=(model_name, method, batch, device, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="", help="only the models whose name contains this text")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU; 128 (8x8) / 64 (ResNet-18) on CPU")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}")
    methods = {**METHODS, **(CPU_ONLY if args.device == "cpu" else {})}
    for model_name in (m for m in MODELS if args.models in m):
        batch = args.batch or (256 if args.device == "cuda" else (128 if "8x8" in model_name else 64))
        print(f"\n### {model_name}, batch {batch}\n")
        print("| method | time (ms) | spread over rounds (ms) | x training step | peak memory (MiB) | trace | rel. diff. from naive |")
        print("|---|---|---|---|---|---|---|")
        rounds = [{m: measure(model_name, m, batch, args.device, args.repeats) for m in methods} for _ in range(args.rounds)]
        results = {m: summarize([r[m] for r in rounds]) for m in methods}
        step = results["training step"].get("seconds")
        reference = results["naive per-sample loop"].get("value")
        for method, r in results.items():
            if "error" in r:
                print(f"| {method} | fails: {r['error']} | | | | | |")
                continue
            ratio = r["seconds"] / step if step else float("nan")
            trace = "" if method == "training step" else f"{r['value']:.6g}"
            diff = "" if method == "training step" or not reference else f"{abs(r['value'] - reference) / reference:.1e}"
            print(
                f"| {method} | {1e3 * r['seconds']:.1f} | {1e3 * r['spread']:.1f} | {ratio:.2f} |"
                f" {r['peak_bytes'] / 2**20:.0f} | {trace} | {diff} |"
            )
        print("\n" + json.dumps(rounds), flush=True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median time and peak memory over rounds, and the spread of the times; a failure in any round is reported."""
    failed = next((r for r in runs if "error" in r), None)
    if failed:
        return failed
    seconds = [r["seconds"] for r in runs]
    return {
        "value": runs[0]["value"],
        "seconds": statistics.median(seconds),
        "spread": max(seconds) - min(seconds),
        "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
    }


if __name__ == "__main__":
    main()
