"""Data-parallel curvature over torch.distributed: 2 and 3 gloo processes on loopback equal one process.

Each world size spawns its processes once (``distributed_worker.worker``); every rank computes H@V, GGN@V,
Fisher@V, the loss gradient, eigenvalues, a trace estimate and the SLQ density of every registry case over its
uneven shard (with three ranks one shard is empty), and the error cases. Here one process computes the same over the
union of the shards; float64 results must agree to 1e-10 on every rank.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from cases import make_case
from distributed_worker import ALL_CASES, low_precision_product, results, shards, union, worker

import curvature

TIMEOUT = 240  # seconds for a whole spawned run; the group itself times out a stuck collective after 60


def spawn(world: int, directory: str) -> list[dict[str, Any]]:
    """Run ``worker`` on ``world`` ranks and return each rank's saved results."""
    context = mp.start_processes(worker, args=(world, directory, ALL_CASES), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} processes did not finish within {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(f"{directory}/rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list]:
    world = request.param
    outputs = spawn(world, str(tmp_path_factory.mktemp(f"world{world}")))
    for rank, out in enumerate(outputs):
        assert "failure" not in out, f"rank {rank} failed:\n{out['failure']}"
    return world, outputs


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> bool:
    return a.shape == b.shape and bool((a - b).norm() <= rel * max(b.norm(), torch.finfo(b.dtype).tiny))


@pytest.mark.parametrize("name", ALL_CASES)
def test_every_rank_equals_one_process_over_the_union(ranks: tuple[int, list], name: str) -> None:
    world, outputs = ranks
    case = make_case(name)
    expected = results(case, union(shards(case, world)))
    for rank, out in enumerate(outputs):
        got = out[name]
        changed = got.pop("changed")
        assert not changed, f"rank {rank} changed the model: {changed}"
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert close(got[key], value), f"rank {rank}, {key}: {(got[key] - value).norm() / value.norm():.3g}"


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_products_equal_one_process(ranks: tuple[int, list], dtype: torch.dtype, rel: float) -> None:
    """float32 to its usual 1e-5; bfloat16 (8 significant bits) to a few of its roundings. Its products are
    reduced in float32, so the ignore_index counts of the mean stay exact."""
    world, outputs = ranks
    case = make_case("ce_nd_ignore_index_mean", torch.float32)
    case["model"].to(dtype)
    expected = low_precision_product(case, union(shards(case, world)), dtype)
    for out in outputs:
        assert close(out[f"ggn_{dtype}"], expected, rel)


def test_ddp_model_and_auto_group(ranks: tuple[int, list]) -> None:
    world, outputs = ranks
    case = make_case("layernorm_ce_mean")
    H = curvature.HessianOperator(case["model"], case["loss_fn"], union(shards(case, world)),
                                  params=["3.weight", "1.bias"])
    expected = H @ torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for out in outputs:
        assert close(out["ddp"], expected)
        assert out["ddp_grads_none"]  # no gradient all-reduce, no .grad


def test_no_host_reads_per_product_without_verify(ranks: tuple[int, list]) -> None:
    """On a GPU, products over kept graphs never wait for the device: only the first product reads totals."""
    _, outputs = ranks
    for out in outputs:
        first, *later = out["syncs"]
        assert first >= 1 and later == [0, 0], out["syncs"]


def test_misuse_raises_on_every_rank(ranks: tuple[int, list]) -> None:
    world, outputs = ranks
    for rank, out in enumerate(outputs):
        errors = out["errors"]
        assert "differs between the ranks" in errors["probes_differ"]
        assert "identically seeded generators" in errors["probes_differ"]
        assert torch.isnan(errors["probes_differ_quiet"]).all()  # verify=False: poisoned, not silently wrong
        assert "empty on every rank" in errors["empty_everywhere"]
        assert errors["after_mode_switch"] == 0.0
        assert errors["empty_first_batch"] < 1e-12
        if rank == 1:
            assert "NaN" in errors["nan_on_rank_1"]
            # Its own error (the model's RuntimeError, named with the batch it came from), not the agreement's.
            assert "does not fit the model" in errors["shape_error_on_rank_1"]
            assert "RuntimeError: mat1 and mat2" in errors["shape_error_on_rank_1"]
            assert "class indices" in errors["late_error_on_rank_1"] or "99" in errors["late_error_on_rank_1"]
            assert "vector multiplied by the operator contains NaN" in errors["nan_vector_on_rank_1"]
        else:
            assert "failed on rank(s) [1]" in errors["nan_on_rank_1"]
            assert "failed on rank(s) [1]" in errors["shape_error_on_rank_1"]
            assert "product failed on rank(s) [1]" in errors["late_error_on_rank_1"]
            assert "product failed on rank(s) [1]" in errors["nan_vector_on_rank_1"]


def test_process_group_argument_errors() -> None:
    case = make_case("mlp_tanh_ce_mean")
    args = (case["model"], case["loss_fn"], case["data"])
    with pytest.raises(ValueError, match="'auto'"):
        curvature.HessianOperator(*args, process_group="world")
    with pytest.raises(TypeError, match="ProcessGroup"):
        curvature.HessianOperator(*args, process_group=3)
    # "auto" without an initialized torch.distributed is one process
    auto = curvature.HessianOperator(*args, process_group="auto")
    plain = curvature.HessianOperator(*args)
    v = torch.randn(plain.shape[0], dtype=torch.float64)
    assert torch.equal(auto @ v, plain @ v)
