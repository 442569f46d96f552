"""Large model (issue 8): time and peak memory of curvature products on a 21M-parameter GPT, against one gradient.

The model is built locally from a config (benchmarks/_transformer.py: 6 pre-LN blocks, d_model 512, 8 heads,
vocab 4096, tied embeddings; random weights, nothing downloaded), float32, one batch of random tokens with
next-token targets, ``CrossEntropyLoss()`` over all ``B * T`` positions. Rows:

* gradient: forward + ``torch.autograd.grad`` over all parameters: the unit of the ratios;
* plain autograd: forward, gradient with ``create_graph=True``, second ``grad`` (what a one-shot product does
  without the library);
* H @ v / G @ v, one-shot: building ``HessianOperator`` / ``GGNOperator`` and its first product (forward,
  gradient with its graph or the ``J^T u`` graph, backward through it);
* the same with ``keep_graph=False`` (the default for a loader): the product's last backward pass frees the
  graph as it goes, as plain autograd does;
* H @ v / G @ v, kept graph: one more product through the graph the first product kept;
* the same for ``params=`` the last block (and the final LayerNorm), and for the last two blocks: the
  backward passes stop there;
* λ_max of the last-block Hessian by ``curvature.eigenvalues`` (tol 1e-2): one run, with its products.

Time: medians over ``--repeats`` round-robin repetitions in one process, after one warm-up round; the order
of the rows is shuffled per round (see :func:`time_rows`). Peak memory: every row in a fresh subprocess of this
script, which runs the row once on a tiny model (so that one-time setup is not counted), builds model, data and
the vectors v, takes the resident set size (RSS) as the baseline, resets the kernel's high-water mark
(``/proc/self/clear_refs``) and reports the peak RSS (``VmHWM``) above the baseline. Kept-graph rows reset the
mark after their first product, so their peak includes the kept graph. Without ``clear_refs`` the monotone
``ru_maxrss`` is used. On CUDA: ``torch.cuda.max_memory_allocated`` above ``memory_allocated``, and
synchronized timings.

    python benchmarks/large_model.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/large_model.py --quick         # a tiny config: a smoke test in seconds
    python benchmarks/large_model.py --device cuda --batch 32 --seq 256
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "100000000")  # before torch (libgomp) is loaded; see _harness.py

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from _harness import Row, environment_header, print_load, round_robin, spread_note, synchronize  # noqa: E402
from _transformer import GPTConfig, NextTokenLM, block_names, gpt_20m, num_params, token_batch  # noqa: E402

import curvature  # noqa: E402

MB = 2**20
GRAD = "gradient (forward + backward)"
DOUBLE_BACKWARD = "plain autograd: double-backward HVP, fresh"


def quick_config() -> GPTConfig:
    return GPTConfig(vocab_size=256, context=32, n_layer=2, n_head=2, d_model=32)


@dataclass
class Setup:
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    data: tuple
    device: torch.device
    vectors: dict  # restriction (None: all parameters) -> the vector v of the products, made with the data

    def sync(self) -> None:
        synchronize(self.device)


def build(args: argparse.Namespace, warmup: bool = False) -> Setup:
    """The model and one batch; ``warmup``: a tiny one (quick config, 2 x 8 tokens) on the same device."""
    cfg = quick_config() if args.quick or warmup else gpt_20m()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = NextTokenLM(cfg).to(device=device, dtype=dtype)
    batch, seq = (2, 8) if warmup else (args.batch, args.seq)
    data = token_batch(cfg, batch, seq, torch.Generator().manual_seed(1), device)
    named = dict(model.named_parameters())
    vectors = {}
    for key, names in [(None, [n for n, p in named.items() if p.requires_grad]), *restrictions(model).items()]:
        size = sum(named[n].numel() for n in names)
        vectors[key] = torch.randn(size, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    return Setup(model, torch.nn.CrossEntropyLoss(), data, device, vectors)


def restrictions(model: torch.nn.Module) -> dict[str, list[str]]:
    return {"last block": block_names(model, [-1]), "last 2 blocks": block_names(model, [-2, -1])}


# -- entries of the table: (label, P, prepare); prepare() does the untimed work and returns the timed call ----
# Nothing is allocated before prepare(); the vectors v were made with the data (they are in the baseline).
Entry = tuple[str, int, Callable[[], Callable[[], object]]]


def rows(setup: Setup) -> list[Entry]:
    model, loss_fn, data = setup.model, setup.loss_fn, setup.data
    params = [p for p in model.parameters() if p.requires_grad]
    restricted = restrictions(model)

    def gradient() -> Callable[[], object]:
        return lambda: torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)

    def double_backward() -> Callable[[], object]:
        vs = [c.view_as(p) for c, p in zip(setup.vectors[None].split([p.numel() for p in params]), params)]

        def hvp() -> object:
            g = torch.autograd.grad(loss_fn(model(data[0]), data[1]), params, create_graph=True)
            return torch.autograd.grad(g, params, vs)
        return hvp

    def one_shot(cls: type, where: str | None, **kwargs: object) -> Callable[[], Callable[[], object]]:
        names, v = restricted.get(where), setup.vectors[where]
        return lambda: lambda: cls(model, loss_fn, data, params=names, **kwargs) @ v

    def kept(cls: type, where: str | None) -> Callable[[], Callable[[], object]]:
        def prepare() -> Callable[[], object]:
            op, v = cls(model, loss_fn, data, params=restricted.get(where)), setup.vectors[where]
            op @ v  # builds and keeps the graph
            return lambda: op @ v
        return prepare

    P = num_params(model)
    out: list[Entry] = [(GRAD, P, gradient), (DOUBLE_BACKWARD, P, double_backward)]
    for sym, cls in (("H", curvature.HessianOperator), ("G", curvature.GGNOperator)):
        out += [(f"{sym} @ v, one-shot", P, one_shot(cls, None)),
                (f"{sym} @ v, one-shot, keep_graph=False", P, one_shot(cls, None, keep_graph=False)),
                (f"{sym} @ v, kept graph", P, kept(cls, None))]
    for where in restricted:
        size = setup.vectors[where].numel()
        out += [(f"H @ v, {where}, one-shot", size, one_shot(curvature.HessianOperator, where)),
                (f"H @ v, {where}, kept graph", size, kept(curvature.HessianOperator, where))]
    return out


def lambda_max(setup: Setup) -> dict[str, object]:
    """λ_max of the last-block Hessian (build included): value, products, converged."""
    names = restrictions(setup.model)["last block"]
    H = curvature.HessianOperator(setup.model, setup.loss_fn, setup.data, params=names)
    res = curvature.eigenvalues(H, k=1, tol=1e-2, max_matvecs=60, generator=torch.Generator().manual_seed(0))
    return {"value": float(res.values[0]), "num_matvecs": res.num_matvecs, "converged": bool(res.converged)}


LAMBDA = "lambda_max, last block (eigenvalues, tol 1e-2)"


# -- memory: one row per fresh process ----------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(setup: Setup) -> bool:
    """Reset the peak counter; False when only the monotone ``ru_maxrss`` is available."""
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak(setup: Setup) -> int:
    if setup.device.type == "cuda":
        return torch.cuda.max_memory_allocated(setup.device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def current(setup: Setup) -> int:
    return torch.cuda.memory_allocated(setup.device) if setup.device.type == "cuda" else rss()


def measure_memory(args: argparse.Namespace) -> dict[str, object]:
    """In this (fresh) process: the peak memory of one row above the baseline of model, data and vectors v.

    The row runs once on a tiny model first, so that what a first call sets up once per process (lazily
    loaded code, thread pools, library workspaces) is in the baseline, not in the row's peak.
    """
    tiny = build(args, warmup=True)
    if args.measure == LAMBDA:
        lambda_max(tiny)
    else:
        {label: prep for label, _, prep in rows(tiny)}[args.measure]()()
    del tiny
    gc.collect()
    setup = build(args)
    setup.sync()
    baseline = current(setup)
    if args.measure == LAMBDA:
        reset_peak(setup)
        start = time.perf_counter()
        info = lambda_max(setup)
        setup.sync()
        info["seconds"] = time.perf_counter() - start
    else:
        prepare = {label: prep for label, _, prep in rows(setup)}[args.measure]
        if "kept graph" in args.measure:
            fn = prepare()  # the first product: the kept graph now counts in the baseline-relative peak
            setup.sync()
            reset_peak(setup)
        else:
            reset_peak(setup)
            fn = prepare()
        fn()
        setup.sync()
        info = {}
    info.update(peak_bytes=peak(setup) - baseline, baseline_bytes=baseline, reset=reset_peak(setup))
    return info


def memory_in_subprocess(label: str, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", label, "--device", args.device,
           "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    result = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"memory measurement of {label!r} failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- time: round-robin in this process ----------------------------------------------------------------------
def time_rows(setup: Setup, table: list[Entry], repeats: int) -> dict[str, Row]:
    """One warm-up round, then ``repeats`` rounds that run every row once, in an order shuffled per round.

    A row's time depends on its predecessor: after a small row (the gradient) the allocator has given the
    pages back, and a row that builds a 2 GB graph faults them in again (up to 2 s slower, measured with a
    fixed order). Shuffling (fixed seed) turns that order effect into noise that the median discards.
    """
    timed = [Row(label, prepare()) for label, _, prepare in table]
    round_robin(timed, repeats, warmup=1, device=setup.device, order=random.Random(0))
    return {row.label: row for row in timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny config (2 layers, d_model 32): a smoke test")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one memory row in this process
    args = parser.parse_args()
    if args.quick:
        args.seq = min(args.seq, quick_config().context)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure_memory(args)))
        return

    setup = build(args)
    cfg = quick_config() if args.quick else gpt_20m()
    environment_header(f"repeats {args.repeats}", device=setup.device)
    print(f"\nGPT {cfg}\nP = {num_params(setup.model)} parameters, {args.dtype}, batch {args.batch} x {args.seq} "
          f"tokens, CrossEntropyLoss over {args.batch * args.seq} positions, device {args.device}\n")

    table = rows(setup)
    memory = {label: memory_in_subprocess(label, args) for label, _, _ in table}
    memory[LAMBDA] = memory_in_subprocess(LAMBDA, args)
    times = time_rows(setup, table, args.repeats)

    grad = times[GRAD].stats()
    grad_m = memory[GRAD]["peak_bytes"]
    what = "peak RSS" if setup.device.type == "cpu" else "peak allocated"
    print(f"| row | P | median s | min s | x gradient (median) | x gradient (min) | {what} above baseline MB "
          "| x gradient (memory) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    disturbed = 0
    for label, size, _ in table:
        st, m = times[label].stats(), memory[label]["peak_bytes"]
        disturbed += st.disturbed
        print(f"| {label} | {size:,} | {st.median:.3f}{st.mark} | {st.min:.3f} | {st.median / grad.median:.2f} "
              f"| {st.min / grad.min:.2f} | {m / MB:,.0f} | {m / grad_m:.2f} |")
    lam = memory[LAMBDA]
    names = restrictions(setup.model)["last block"]
    size = sum(p.numel() for n, p in setup.model.named_parameters() if n in names)
    print(f"| {LAMBDA}: {lam['value']:.4g} in {lam['num_matvecs']} products"
          f"{'' if lam['converged'] else ' (not converged)'} | {size:,} | {lam['seconds']:.3f} (1 run) | | "
          f"{lam['seconds'] / grad.median:.2f} | | {lam['peak_bytes'] / MB:,.0f} | {lam['peak_bytes'] / grad_m:.2f} |")
    if disturbed:
        print(f"\n{spread_note(disturbed, len(table))}")
    base = memory[GRAD]["baseline_bytes"]
    param_bytes = num_params(setup.model) * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"\nbaseline ({'RSS' if setup.device.type == 'cpu' else 'allocated'} with model, data and v, before any "
          f"work): {base / MB:,.0f} MB; the parameters alone: {param_bytes / MB:,.1f} MB")
    if not all(m["reset"] for m in memory.values()):
        print("note: the peak counter could not be reset (no /proc/self/clear_refs): peaks are ru_maxrss above the "
              "baseline, and the kept-graph rows include their first product.")
    print()
    print_load()


if __name__ == "__main__":
    main()
