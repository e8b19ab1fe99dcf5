"""Exact per-sample Fisher trace, side by side on the same model, inputs and labels (empirical Fisher):

* one training step (forward, backward, SGD step) as the unit of cost;
* a naive per-sample loop (one backward per example);
* torch.func ``vmap(grad)`` over the whole batch (per-sample gradients materialised);
* BackPACK's ``BatchL2Grad`` (where it runs);
* Opacus: ``GradSampleModule`` (per-sample gradients) and ``GradSampleModuleFastGradientClipping`` with ghost clipping
  (per-sample gradient norms only), where it runs;
* ours, ``fisher_trace(method="auto")``.

Models: a small conv net (the demo ConvNet on 8x8 digits), the demo ResNet (8x8), torchvision's ResNet-18 at CIFAR size
(3x32x32), a small Transformer text classifier on token ids (attention, embedding and a position parameter: the
per-module fallback's ground), and a GPT-style causal language model (batch 16 x 64 tokens, vocabulary 1000): one
categorical likelihood per token, the sample's log-likelihood the sum over its tokens. Each (model, method) runs in its
own process so that its peak memory (peak RSS above the model and inputs, on CPU; peak CUDA allocation on a GPU) is its
own; in a process, time is the median of ``--repeats`` runs after one
warm-up. The methods of a model run one after another in each of ``--rounds`` rounds (so that a slow spell of a shared
machine hits them all) and the table shows the median over rounds, with the spread (max - min) of the rounds.
Agreement is the relative difference of the total trace from the naive loop's.

    python benchmarks/fisher.py [--device cpu|cuda] [--repeats 3] [--rounds 3]

Needs torchvision; BackPACK and Opacus (``pip install -e ".[bench]"``) are optional.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

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


class CausalLM(nn.Module):
    """Token ids (N, T) -> next-token logits (N, T, V): embedding plus fixed sinusoidal positions, pre-norm blocks of
    causal self-attention (Linear projections, ``scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm and
    an untied head. Built from modules both Opacus and our closed forms cover (Embedding, Linear, LayerNorm)."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, tokens: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCABULARY, width)
        position = torch.arange(tokens)[:, None] / 10000 ** (torch.arange(0, width, 2) / width)
        self.register_buffer("positions", torch.cat([position.sin(), position.cos()], 1))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "norm1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
                "norm2": nn.LayerNorm(width), "up": nn.Linear(width, 4 * width), "down": nn.Linear(4 * width, width),
            })
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCABULARY)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        h = self.embed(ids) + self.positions[:t]
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
            h = h + block["proj"](context)
            h = h + block["down"](F.gelu(block["up"](block["norm2"](h))))
        return self.head(self.norm(h))


MODELS = {
    "small conv net (ConvNet 32-64, 1x8x8)": (lambda: ConvNet(input_shape=(1, 8, 8), channels=[32, 64]), (1, 8, 8), 10),
    "demo ResNet (8 blocks, width 32, 1x8x8)": (
        lambda: ResNet(input_shape=(1, 8, 8), num_blocks=8, width=32),
        (1, 8, 8),
        10,
    ),
    "torchvision ResNet-18 (3x32x32)": (None, (3, 32, 32), 10),
    "Transformer text classifier (2 layers, width 64, 32 tokens)": (TextClassifier, (32,), 4),
    "causal LM (GPT-style, 2 layers, width 128, vocabulary 1000, 64 tokens)": (CausalLM, (64,), VOCABULARY),
}
TOKEN_MODELS = (TextClassifier, CausalLM)


def build(name: str) -> nn.Module:
    factory, _, classes = MODELS[name]
    if factory is None:
        import torchvision

        return torchvision.models.resnet18(num_classes=classes)
    return factory()


def log_likelihoods(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_i | x_i) per sample: (N, C) logits and (N,) labels, or (N, T, C) and (N, T), summed over positions."""
    picked = output.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    return picked.flatten(1).sum(1) if picked.ndim > 1 else picked


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.zero_grad()
    output = model(x)
    F.cross_entropy(output.flatten(0, -2), y.flatten()).backward()
    optimizer.step()
    model.eval()
    return float("nan")


def naive(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(len(x)):
        log_p = log_likelihoods(model(x[i : i + 1]), y[i : i + 1])[0]
        total += sum(g.square().sum().item() for g in torch.autograd.grad(log_p, params))
    return total / len(x)


def func_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def log_prob(p, xi, yi):
        return log_likelihoods(functional_call(model, (p, buffers), (xi[None],)), yi[None])[0]

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


_OPACUS_WRAPPED: dict[tuple[int, bool], nn.Module] = {}


def _opacus_wrapped(model: nn.Module, ghost: bool) -> nn.Module:
    """The model wrapped once per process (a second wrap would hook it twice); Opacus's hooks record in train mode
    only, and ``loss_reduction="sum"`` keeps its per-sample gradients unscaled."""
    if (id(model), ghost) not in _OPACUS_WRAPPED:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        if ghost:
            wrapped = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True
            )
        else:
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        _OPACUS_WRAPPED[id(model), ghost] = wrapped
    return _OPACUS_WRAPPED[id(model), ghost].train()


def opacus_per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    wrapped = _opacus_wrapped(model, ghost=False)
    (-log_likelihoods(wrapped(x), y).sum()).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.grad_sample.flatten(1).square().sum(1) for p in params).mean().item()
    wrapped.zero_grad(set_to_none=True)
    return total


def opacus_ghost_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    wrapped = _opacus_wrapped(model, ghost=True)
    (-log_likelihoods(wrapped(x), y).sum()).backward()
    total = wrapped.get_norm_sample().square().mean().item()
    wrapped.zero_grad(set_to_none=True)
    return total


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return fisher_trace(model, x, fisher="empirical", targets=y).total


def ours_large_cpu_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Ours with the accelerator's chunk budget (2^25 numbers) on CPU too: what the 1 MiB CPU chunks save."""
    import lightning_startwell.fisher.closed_forms as fisher_module

    fisher_module._chunk_samples = lambda per_sample, like: max(1, 2**25 // per_sample)
    return ours(model, x, y)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], float]] = {
    "training step": training_step,
    "naive per-sample loop": naive,
    "torch.func vmap(grad)": func_vmap,
    "BackPACK BatchL2Grad": backpack_l2,
    "Opacus GradSampleModule (per-sample gradients)": opacus_per_sample_gradients,
    "Opacus ghost clipping (per-sample norms)": opacus_ghost_norms,
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
        if isinstance(model, TOKEN_MODELS):
            x = torch.randint(0, VOCABULARY, (batch, *shape), device=device)
        else:
            x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, classes, (batch, *shape) if isinstance(model, CausalLM) else (batch,), device=device)
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
    parser.add_argument(
        "--batch", type=int, default=None, help="default: 256 on a GPU; 128 (8x8) / 64 (ResNet-18) on CPU"
    )
    args = parser.parse_args()
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {device_name}; torch {torch.__version__}")
    methods = {**METHODS, **(CPU_ONLY if args.device == "cpu" else {})}
    for model_name in (m for m in MODELS if args.models in m):
        batch = args.batch or default_batch(model_name, args.device)
        print(f"\n### {model_name}, batch {batch}\n")
        print(
            "| method | time (ms) | spread over rounds (ms) | x training step | peak memory (MiB) | trace"
            " | rel. diff. from naive |"
        )
        print("|---|---|---|---|---|---|---|")
        rounds = [
            {m: measure(model_name, m, batch, args.device, args.repeats) for m in methods} for _ in range(args.rounds)
        ]
        results = {m: summarize([r[m] for r in rounds]) for m in methods}
        step = results["training step"].get("seconds")
        reference = results["naive per-sample loop"].get("value")
        for method, r in results.items():
            if "error" in r:
                print(f"| {method} | fails: {r['error']} | | | | | |")
                continue
            ratio = r["seconds"] / step if step else float("nan")
            trace = "" if method == "training step" else f"{r['value']:.6g}"
            diff = (
                "" if method == "training step" or not reference else f"{abs(r['value'] - reference) / reference:.1e}"
            )
            print(
                f"| {method} | {1e3 * r['seconds']:.1f} | {1e3 * r['spread']:.1f} | {ratio:.2f} |"
                f" {r['peak_bytes'] / 2**20:.0f} | {trace} | {diff} |"
            )
        print("\n" + json.dumps(rounds), flush=True)


def default_batch(model_name: str, device: str) -> int:
    """16 sequences for the causal LM; else 256 on a GPU, 128 (8x8 inputs) or 64 (larger ones) on CPU."""
    if "causal LM" in model_name:
        return 16
    return 256 if device == "cuda" else 128 if "8x8" in model_name else 64


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
