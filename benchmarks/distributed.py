"""Data-parallel curvature products over torch.distributed (gloo, CPU): products per second, 1 vs 2 processes.

The problem is real data: scikit-learn's digits (1797 images of 8×8 pixels, standardized), a tanh MLP
64-512-512-10 (300k parameters, float32) and the mean cross-entropy, in batches of 128 (the last one
uneven). Each product iterates the data (``keep_graph=False``, the default for a list of batches: one
forward and two backward passes per batch).

Two gloo processes on loopback are started once; within them the variants run round-robin, each timed in
its turn while the other rank waits in a barrier:

- ``1 process, 1 thread``: rank 0 alone, all batches, ``torch.set_num_threads(1)``;
- ``1 process, 2 threads``: rank 0 alone, all batches, two intra-op threads (the same two cores);
- ``2 processes × 1 thread``: each rank holds half of the batches and the operator all-reduces
  (``process_group=``); the product equals the one-process product (checked, printed).

Reported: median products per second, the speed-up over one process, the all-reduce per product (its size
in numbers and bytes, and the median time of a bare all-reduce of that size), for Hessian and GGN products,
for a single vector (``matvec``) and a block of 8 (``matmat``, as in Hutch++/XTrace).

Run:  python benchmarks/distributed.py        # --repeats 5 --products 3 --pause 3 (about 5 minutes)
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import datetime  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _harness import environment_header  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import curvature  # noqa: E402

BATCH = 128
OPERATORS = {"Hessian": curvature.HessianOperator, "GGN": curvature.GGNOperator}


def problem() -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The digits MLP and its data in batches of 128."""
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    y = torch.as_tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    return model, nn.CrossEntropyLoss(), [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(y), BATCH)]


def per_product(op: Any, V: torch.Tensor, products: int) -> float:
    """Seconds per product column over ``products`` calls of ``op @ V``."""
    start = time.perf_counter()
    for _ in range(products):
        op @ V
    return (time.perf_counter() - start) / (products * (V.shape[1] if V.ndim == 2 else 1))


def alone_variant(rank: int, times: dict, key: tuple, alone: Any, V: torch.Tensor, products: int,
                  threads: int) -> None:
    """Rank 0 times the one-process operator with ``threads`` threads while the other rank waits."""
    if rank == 0:
        torch.set_num_threads(threads)
        times.setdefault(key, []).append(per_product(alone, V, products))
        torch.set_num_threads(1)
    dist.barrier()


def run(rank: int, world: int, path: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one core per rank (a second intra-op thread would compete with the other rank)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    model, loss_fn, batches = problem()
    half = (len(batches) + 1) // 2
    shard = batches[:half] if rank == 0 else batches[half:]
    times: dict[tuple[str, int, str], list[float]] = {}
    reduce_times: dict[int, list[float]] = {}
    checks = {}
    for name, cls in OPERATORS.items():
        alone = cls(model, loss_fn, batches) if rank == 0 else None
        shared = cls(model, loss_fn, shard, process_group="auto")
        P = shared.shape[0]
        for k in (1, 8):
            V = torch.randn(P, k, generator=torch.Generator().manual_seed(k))
            V = V[:, 0] if k == 1 else V
            expected = alone @ V if rank == 0 else None
            got = shared @ V
            if rank == 0:
                checks[(name, k)] = float((got - expected).norm() / expected.norm())
            for _ in range(args.repeats):  # round-robin over the variants
                # Two threads come last in a round, followed by a pause: with a long GOMP_SPINCOUNT the second
                # OpenMP thread keeps spinning for a while afterwards, which would take the other rank's core
                # from the next two-process variant (measured without the pause: 2 processes looked no faster
                # than 1 for single products).
                alone_variant(rank, times, (name, k, "1 process, 1 thread"), alone, V, args.products, 1)
                times.setdefault((name, k, "2 processes × 1 thread"), []).append(
                    per_product(shared, V, args.products))
                buffer = torch.zeros(P * k + 2 + 17 * world)
                start = time.perf_counter()
                for _ in range(args.products):
                    dist.all_reduce(buffer)
                reduce_times.setdefault(k, []).append((time.perf_counter() - start) / args.products)
                dist.barrier()
                alone_variant(rank, times, (name, k, "1 process, 2 threads"), alone, V, args.products, 2)
                time.sleep(args.pause)
    if rank == 0:
        report(P, world, times, reduce_times, checks)
    dist.destroy_process_group()


def report(P: int, world: int, times: dict, reduce_times: dict, checks: dict) -> None:
    print(f"P = {P:,} parameters (float32), digits 1797 samples in batches of {BATCH}")
    print("\n| operator | k | variant | products/s | vs 1 process, 1 thread | vs 1 process, 2 threads |")
    print("|---|---|---|---|---|---|")
    for (name, k, variant), values in times.items():
        rate = 1 / statistics.median(values)
        one = 1 / statistics.median(times[(name, k, "1 process, 1 thread")])
        two = 1 / statistics.median(times[(name, k, "1 process, 2 threads")])
        print(f"| {name} | {k} | {variant} | {rate:.1f} | {rate / one:.2f}× | {rate / two:.2f}× |")
    print("\n| k | numbers all-reduced per product call | bytes | bare all-reduce (ms, median) |")
    print("|---|---|---|---|")
    for k, values in reduce_times.items():
        numbers = P * k + 2 + 17 * world
        print(f"| {k} | {numbers:,} (P·k + 2 + 17·{world}) | {4 * numbers:,} | {1e3 * statistics.median(values):.2f} |")
    print("\nmax relative difference, 2 processes vs 1:", f"{max(checks.values()):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--products", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds after the two-thread variant")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what each rank runs with (this process only waits): the header shows it
    environment_header("2 processes, gloo on loopback")
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(run, args=(2, os.path.join(directory, "rendezvous"), args), nprocs=2,
                           start_method="spawn")


if __name__ == "__main__":
    main()
