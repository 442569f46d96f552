"""What each rank runs in tests/test_distributed.py, and how the registry's data is cut into shards.

The test spawns ``world`` processes that join a gloo group on loopback. Every rank builds the same
registry model, takes its uneven shard of the case's data (one rank's shard is empty with three ranks),
computes products and estimates over the process group, and saves them; the test compares every rank's
numbers with one process over the union of the shards. This module is imported by the spawned
processes, so it holds no test functions.
"""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from cases import FACTORIES, make_case
from helpers import assert_unchanged, count_host_syncs, snapshot
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import curvature
from curvature.operators.data import Data
from curvature.reference import _cat as cat  # the dense references' own concatenation of batches

BATCH = 5


def cat_samples(batches: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Concatenate batches of (possibly nested) inputs and targets along the sample dimension."""
    return cat([b[0] for b in batches]), cat([b[1] for b in batches])


def take(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a (possibly nested) batch."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop]
    if isinstance(obj, dict):
        return {key: take(val, start, stop) for key, val in obj.items()}
    return type(obj)(take(val, start, stop) for val in obj)


def shard_sizes(n: int, world: int) -> list[int]:
    """Uneven shard sizes; with three ranks the middle one is empty."""
    if world == 2:
        return [n // 3, n - n // 3]
    return [n // 4, 0, n - n // 4]


def shards(case: dict[str, Any], world: int) -> list[Any]:
    """Every rank's data: rank 0 one batch, the others lists of batches of ``BATCH`` and a remainder."""
    data = case["data"]
    batches = [data] if Data(data).single else list(Data(data))
    inputs, targets = cat_samples(batches)
    n = targets.shape[0]
    out, start = [], 0
    for rank, size in enumerate(shard_sizes(n, world)):
        if rank == 0:
            out.append((take(inputs, start, start + size), take(targets, start, start + size)))
        else:
            out.append([(take(inputs, a, min(a + BATCH, start + size)), take(targets, a, min(a + BATCH, start + size)))
                        for a in range(start, start + size, BATCH)])
        start += size
    return out


def union(parts: list[Any]) -> list[tuple[Any, Any]]:
    """The batches of every shard, in rank order: the data of the single-process reference."""
    batches: list[tuple[Any, Any]] = []
    for part in parts:
        batches.extend([part] if Data(part).single else part)
    return batches


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def name_of(case: dict[str, Any]) -> str:
    return case["name"]


def results(case: dict[str, Any], data: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Products and estimates of one case's operators over ``data`` (``kwargs`` reach the operators)."""
    model, loss_fn = case["model"], case["loss_fn"]
    kwargs.setdefault("reduction", case.get("reduction"))
    H = curvature.HessianOperator(model, loss_fn, data, **kwargs)
    G = curvature.GGNOperator(model, loss_fn, data, **kwargs)
    P = H.shape[0]
    V = torch.randn(P, 3, generator=generator(1), dtype=H.dtype)
    out = {"H@V": H @ V, "H@v": H @ V[:, 0], "G@V": G @ V}
    if G.has_exact_diagonal:  # the structured diagonals: one all-reduce of the ranks' sums
        out["diag G"] = G.diagonal()
    out["diag E"] = curvature.EmpiricalFisherOperator(model, loss_fn, data, **kwargs).diagonal()
    kept = curvature.HessianOperator(model, loss_fn, data, keep_graph=True, **kwargs)
    kept @ V[:, 0]  # builds the graphs, which hold each batch's gradient
    out["gradient"], out["gradient from kept graphs"] = G.gradient(), kept.gradient()
    if case["likelihood"]:
        out["F@V"] = curvature.FisherOperator(model, loss_fn, data, **kwargs) @ V
    if name_of(case) != "tied_dict_inputs_ce_sum":  # K-FAC and EK-FAC: the factors' statistics all-reduced
        fisher_type = "ggn" if isinstance(loss_fn, (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)) \
            else "empirical"
        out["KFAC@V"] = curvature.KFACOperator(model, loss_fn, data, fisher_type=fisher_type, **kwargs) @ V
        out["EKFAC@V"] = curvature.EKFACOperator(model, loss_fn, data, fisher_type=fisher_type, **kwargs) @ V
    out["eigenvalues"] = curvature.eigenvalues(H, k=2, tol=1e-9, generator=generator(2)).values
    out["trace"] = torch.tensor(curvature.trace(G, num_matvecs=12, generator=generator(3)).value)
    density = curvature.spectral_density(H, num_probes=2, num_steps=min(8, P), generator=generator(4))
    out["slq_nodes"], out["slq_weights"] = density.nodes, density.weights
    report = curvature.sharpness(model, loss_fn, data, metrics=("lambda_max", "trace"), operator="ggn", tol=1e-9,
                                 num_matvecs=12, generator=generator(7), quiet=True, **kwargs)
    out["sharpness"] = torch.tensor([report.lambda_max, report.trace.value, report.trace.std_error])
    return out


def low_precision_product(case: dict[str, Any], data: Any, dtype: torch.dtype, **kwargs: Any) -> torch.Tensor:
    """A GGN product of a float32 or bfloat16 model (inputs cast to it), as float64."""
    x, y = cat_samples(data if isinstance(data, list) else [data]) if data else (None, None)
    batches = [(x.to(dtype), y)] if x is not None else []
    G = curvature.GGNOperator(case["model"], case["loss_fn"], batches, **kwargs)
    return (G @ torch.randn(G.shape[0], 2, generator=generator(8)).to(dtype)).double()


def unchanged(model: torch.nn.Module, before: dict[str, Any]) -> str:
    """'' if the model is as in the snapshot, else what changed."""
    try:
        assert_unchanged(model, before)
    except AssertionError as err:
        return str(err) or "changed"
    return ""


def syncs_per_product(case: dict[str, Any], data: Any, **kwargs: Any) -> list[int]:
    """Host reads of a product over kept graphs with ``verify=False``: the first builds them, then none."""
    G = curvature.GGNOperator(case["model"], case["loss_fn"], data, keep_graph=True, verify=False, **kwargs)
    V = torch.randn(G.shape[0], 2, generator=generator(6), dtype=G.dtype)
    counts = []
    for _ in range(3):
        with count_host_syncs() as syncs:
            G @ V
        counts.append(syncs.count)
    return counts


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def error_of(fn: Callable[[], Any], kinds: tuple[type[Exception], ...] = (ValueError, TypeError)) -> str:
    """The message of the exception of ``kinds`` that ``fn`` raises, or '' if it returns."""
    try:
        fn()
    except kinds as err:
        return f"{type(err).__name__}: {err}"
    return ""


def error_cases(rank: int, world: int) -> dict[str, Any]:
    """What every rank sees for bad distributed use: each call must raise on every rank, never hang."""
    case = make_case("mlp_tanh_ce_mean")
    model, loss_fn = case["model"], case["loss_fn"]
    parts = shards(case, world)
    mine = parts[rank]
    out: dict[str, Any] = {}
    H = curvature.HessianOperator(model, loss_fn, mine, process_group="auto")
    torch.manual_seed(rank)  # ranks seeded apart: generator=None (a copy of the global RNG) differs by rank
    out["probes_differ"] = error_of(lambda: curvature.trace(H, num_matvecs=4))
    H_quiet = curvature.HessianOperator(model, loss_fn, mine, process_group="auto", verify=False)
    V = torch.randn(H.shape[0], 2, dtype=H.dtype, generator=generator(10 + rank))
    out["probes_differ_quiet"] = H_quiet @ V
    v = torch.randn(H.shape[0], dtype=H.dtype, generator=generator(11))
    before = H @ v
    model.train()  # no dropout or batch norm: allowed; the checks re-run on every rank, empty shards too
    out["after_mode_switch"] = rel(H @ v, before)
    model.eval()
    out["empty_everywhere"] = error_of(lambda: curvature.GGNOperator(model, loss_fn, [], process_group="auto"))
    x, y = cat_samples(union(parts))
    bad = (torch.full_like(x[:4], float("nan")), y[:4]) if rank == 1 else (x[:4], y[:4])
    out["nan_on_rank_1"] = error_of(lambda: curvature.HessianOperator(model, loss_fn, bad, process_group="auto"))
    wide = (torch.randn(4, x.shape[1] + 1, dtype=x.dtype), y[:4]) if rank == 1 else (x[:4], y[:4])
    out["shape_error_on_rank_1"] = error_of(
        lambda: curvature.HessianOperator(model, loss_fn, wide, process_group="auto"), (Exception,))
    late = [(x[:4], y[:4]), (x[4:8], y[4:8] + (99 if rank == 1 else 0))]  # a bad class index in a later batch
    G = curvature.GGNOperator(model, loss_fn, late, process_group="auto")
    out["late_error_on_rank_1"] = error_of(lambda: G @ v, (Exception,))
    nan_v = v.clone()
    if rank == 1:
        nan_v[0] = float("nan")  # checked before the product on rank 1: the others must learn of it, not wait
    out["nan_vector_on_rank_1"] = error_of(lambda: H @ nan_v, (Exception,))
    padded = [(x[:0], y[:0])] + (union([mine]) if Data(mine).single or mine else [])  # an empty first batch
    out["empty_first_batch"] = rel(curvature.HessianOperator(model, loss_fn, padded, process_group="auto") @ v, before)
    return out


def worker(rank: int, world: int, directory: str, names: list[str]) -> None:
    """One rank: join the gloo group, compute every case's results and the error cases, save them."""
    torch.set_num_threads(1)
    status: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'rendezvous')}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        for name in names:
            case = make_case(name)
            mine = shards(case, world)[rank]  # iterating a DataLoader draws from the global RNG: before the snapshot
            before = snapshot(case["model"])
            status[name] = results(case, mine, process_group="auto")
            status[name]["changed"] = unchanged(case["model"], before)
        for dtype in (torch.float32, torch.bfloat16):  # lower precisions: products and counts in float32 or better
            case = make_case("ce_nd_ignore_index_mean", torch.float32)
            case["model"].to(dtype)
            status[f"ggn_{dtype}"] = low_precision_product(case, shards(case, world)[rank], dtype, process_group="auto")
        case = make_case("layernorm_ce_mean")  # a DistributedDataParallel model, its group by "auto"
        ddp = DistributedDataParallel(case["model"])
        H = curvature.HessianOperator(ddp, case["loss_fn"], shards(case, world)[rank], process_group="auto",
                                      params=["module.3.weight", "module.1.bias"])
        status["ddp"] = H @ torch.randn(H.shape[0], 2, generator=generator(5), dtype=H.dtype)
        status["ddp_grads_none"] = all(p.grad is None for p in ddp.parameters())
        status["errors"] = error_cases(rank, world)
        case = make_case("cnn_ce_mean")
        status["syncs"] = syncs_per_product(case, shards(case, world)[rank], process_group="auto")
        dist.barrier()
    except Exception:  # reported to the test, which fails with the traceback
        status["failure"] = traceback.format_exc()
    finally:
        torch.save(status, os.path.join(directory, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


ALL_CASES = sorted(FACTORIES)
