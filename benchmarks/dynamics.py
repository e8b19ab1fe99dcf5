"""Cost of one GradientDynamicsMonitor measurement against one training step of the same model, in one process.

For each model: a plain SGD training step (forward, backward, optimizer step) on a batch, and the pieces of a
measurement from the pure core: the gradient norm, the distance from w_0, and the direction measurement on K probe
batches of the same size (K forward/backward passes, the float64 sums). The operations are interleaved over rounds;
each time is the median of the repetitions in a round, and the table gives the median over rounds.

    python benchmarks/dynamics.py [--rounds 5] [--repeats 5] [--num-batches 8] [--resnet18]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_startwell.dynamics import (
    direction_statistics,
    direction_sums,
    gradient_norm,
    parameter_distance,
    probe_gradient,
)
from lightning_startwell.models import ResNet


def models(resnet18: bool) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    found = {"demo ResNet (8 blocks, width 32, 1x8x8)": (ResNet(num_blocks=8, width=32, dropout=0.1), (1, 8, 8))}
    if resnet18:
        import torchvision

        found["torchvision ResNet-18 (3x32x32)"] = (torchvision.models.resnet18(num_classes=10), (3, 32, 32))
    return found


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def operations(model: nn.Module, shape: tuple[int, ...], batch: int, k: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)
    probe = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(k)]
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def directions() -> object:
        grads = (probe_gradient(model, px, py, params, seed=i) for i, (px, py) in enumerate(probe))
        return direction_statistics(direction_sums(grads), k)

    step()  # .grad exists for the norm
    return {
        "training step": step,
        "gradient norm": lambda: gradient_norm(p.grad for p in params).item(),
        "distance from w_0": lambda: parameter_distance(params, initial).item(),
        "directions (K probe batches)": directions,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resnet18", action="store_true", help="also torchvision's ResNet-18 (slow on CPU)")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}"
    )
    print(
        f"batch {args.batch_size}, K = {args.num_batches} probe batches of the same size; median over {args.rounds}"
        f" rounds of the median of {args.repeats} repetitions"
    )
    for name, (model, shape) in models(args.resnet18).items():
        ops = operations(copy.deepcopy(model), shape, args.batch_size, args.num_batches)
        results: dict[str, list[float]] = {op: [] for op in ops}
        for _ in range(args.rounds):
            for op, fn in ops.items():
                results[op].append(timed(fn, args.repeats))
        size = sum(p.numel() for p in model.parameters())
        step = statistics.median(results["training step"])
        print(
            f"\n### {name}: {size:,} parameters; w_0 copy {4 * size / 2**20:.1f} MiB, direction sums"
            f" {16 * size / 2**20:.1f} MiB\n"
        )
        print("| operation | ms (median of rounds) | spread over rounds (ms) | x a training step |")
        print("|---|---|---|---|")
        for op, values in results.items():
            median = statistics.median(values)
            print(f"| {op} | {1e3 * median:.2f} | {1e3 * (max(values) - min(values)):.2f} | {median / step:.2f} |")


if __name__ == "__main__":
    main()
