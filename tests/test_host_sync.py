"""No host synchronisation per product: the estimators keep a GPU busy between their products.

Reading a value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``) makes it wait
for every kernel queued on the GPU. :func:`helpers.count_host_syncs` counts those reads, on the CPU too, so
these tests need no GPU. Fixed-budget estimators read the same number of values whatever their budget (their
results come over in one transfer at the end); adaptive ones (eigenvalues to a tolerance, CG and MINRES) read
their state at checks, at most once per 4 products on long runs.
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any, Callable

import pytest
import torch
from helpers import count_host_syncs, seeded

from curvature import diagonal, eigenvalues, frobenius_norm, lanczos, solve, spectral_density, trace
from curvature.operators.base import LinearOperator

F64 = torch.float64


class Dense(LinearOperator):
    """A dense symmetric matrix as an operator: its products read nothing on the host."""

    def __init__(self, A: torch.Tensor, psd: bool = False) -> None:
        super().__init__(A.shape[0], A.dtype, A.device, is_psd=psd)
        self.A = A

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


def dense(eigenvalues: torch.Tensor, seed: int = 0) -> Dense:
    """``Q diag(eigenvalues) Qᵀ`` for a random orthogonal ``Q``, flagged PSD when it is."""
    n = eigenvalues.numel()
    Q = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=seeded(seed))).Q
    A = (Q * eigenvalues.to(F64)) @ Q.T
    return Dense((A + A.T) / 2, psd=bool((eigenvalues >= 0).all()))


def flat(size: int = 200) -> Dense:
    """A spectrum with a few outliers over a flat bulk (Hessian-like)."""
    return dense(torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.linspace(0.1, 1.0, size - 3)]))


def low_rank(size: int = 100, rank: int = 6) -> Dense:
    """Rank 6: every Krylov space becomes invariant after 7 or 8 steps (Lanczos' breakdown path)."""
    return dense(torch.cat([torch.arange(1.0, rank + 1), torch.zeros(size - rank)]))


def syncs(run: Callable[[], Any]) -> tuple[int, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an eigenvalue budget running out
        with count_host_syncs() as record:
            result = run()
    return record.count, result


# -- the counter itself ----------------------------------------------------------------------------------------


def test_counter_sees_host_reads() -> None:
    t = torch.arange(3.0)
    with count_host_syncs() as record:
        t.sum().item()
        float(t[0])
        bool(t[1] > 0)
        t.tolist()
        t.cpu()
        _ = t * 2 + 1  # device work reads nothing
    assert record.calls == ["item", "__float__", "__bool__", "tolist", "cpu"]


# -- fixed budgets: the count does not grow with the number of products ---------------------------------------

FIXED = {
    "lanczos": (lambda op, n: lanczos(op, n, generator=seeded(0)), (10, 40)),
    "lanczos_no_basis": (lambda op, n: lanczos(op, n, generator=seeded(0), keep_basis=False), (10, 40)),
    "spectral_density": (lambda op, n: spectral_density(op, 4, n, seeded(0)), (10, 40)),
    "trace_hutchinson": (lambda op, n: trace(op, "hutchinson", n, seeded(0)), (20, 80)),
    "trace_hutch++": (lambda op, n: trace(op, "hutch++", n, seeded(0)), (20, 80)),
    "trace_xtrace": (lambda op, n: trace(op, "xtrace", n, seeded(0)), (20, 80)),
    "diagonal_hutchinson": (lambda op, n: diagonal(op, "hutchinson", n, seeded(0)), (20, 80)),
    "diagonal_xdiag": (lambda op, n: diagonal(op, "xdiag", n, seeded(0)), (20, 80)),
    "frobenius_norm": (lambda op, n: frobenius_norm(op, n, seeded(0)), (20, 80)),
}


@pytest.mark.parametrize("name", sorted(FIXED))
@pytest.mark.parametrize("make", [flat, low_rank], ids=["flat", "low_rank"])
def test_fixed_budget_reads_do_not_grow_with_products(name: str, make: Callable[[], Dense]) -> None:
    estimator, (small, large) = FIXED[name]
    op = make()
    few, few_result = syncs(lambda: estimator(op, small))
    products_before = op.num_matvecs
    many, _ = syncs(lambda: estimator(op, large))
    # Lanczos asks once after steps 8, 16, 32, ... whether every process is finished (to stop early on a
    # low-rank operator): a read per doubling of the budget, never one per product.
    lanczos_family = name in ("lanczos", "lanczos_no_basis", "spectral_density")
    if make is flat or not lanczos_family:
        assert op.num_matvecs - products_before > few_result.num_matvecs > 0  # the budget did grow
    doublings = math.ceil(math.log2(large / small)) if lanczos_family else 0
    assert few <= many <= few + doublings, f"{name}: {few} host reads for {small}, {many} for {large}"
    assert few <= 6


@pytest.mark.parametrize("method", ["trace", "diagonal"])
def test_exact_methods_read_the_same_for_any_size(method: str) -> None:
    """P products with identity columns, 256 at a time: the reads do not grow with P."""
    estimator = trace if method == "trace" else diagonal
    counts = []
    for op in (flat(100), flat(300), flat(700)):
        counts.append(syncs(lambda op=op: estimator(op, "exact"))[0])
    assert counts[0] == counts[1] == counts[2] <= 1


def test_lanczos_breakdown_is_decided_on_the_device() -> None:
    """An invariant subspace after a few steps gives the same result, with the same reads, for any budget."""
    op = low_rank()
    results = {}
    for steps in (10, 40, 90):
        before = op.num_matvecs
        count, results[steps] = syncs(lambda steps=steps: lanczos(op, steps, generator=seeded(1)))
        assert count <= 4
        assert results[steps].num_steps == results[steps].num_matvecs <= 8
        assert op.num_matvecs - before <= max(2 * results[steps].num_matvecs, 8)  # stopped at the next check
        assert results[steps].residual_norm == 0.0
    assert torch.equal(results[10].alpha, results[90].alpha) and torch.equal(results[10].beta, results[90].beta)


# -- adaptive methods: reads at checks, at most one per 4 products on a long run --------------------------------

# Reads outside the loop (argument checks, norms, the result) and at the first checks, after iterations 1 to 8,
# 10, 12 and 15, which let a warm start, a tiny problem or a loose tolerance stop where a check per iteration
# would.
SETUP = 16

# A spectrum whose extreme eigenvalues converge slowly: hundreds of products.
SLOW = 100 * torch.arange(1, 401, dtype=F64) ** -0.3

# A weak SPD preconditioner (a diagonal from 0.5 to 2): the solves still take hundreds of products.
WEAK = Dense(torch.diag(torch.linspace(0.5, 2.0, 400, dtype=F64)), psd=True)

ADAPTIVE = {
    # A check reads the device once and the host's replay of the steps once (a CPU tensor: no wait on a GPU).
    # With the default basis of 20 vectors and k <= 3 a thick restart comes every 9 or 10 steps, and with
    # it one check: about 2 reads per 9 products.
    "eigenvalues_lanczos_largest": lambda: eigenvalues(dense(-SLOW), k=3, tol=1e-10, generator=seeded(0)),
    "eigenvalues_lanczos_smallest": lambda: eigenvalues(
        dense(SLOW), k=2, which="smallest", tol=1e-8, generator=seeded(0)
    ),
    "eigenvalues_power": lambda: eigenvalues(
        dense(torch.cat([torch.tensor([10.0, 9.5]), torch.linspace(0.0, 9.0, 198)])), k=2, which="magnitude",
        tol=1e-8, generator=seeded(0), method="power",
    ),
    "solve_cg": lambda: solve(dense(torch.logspace(0, 3, 400)), torch.ones(400, dtype=F64), "cg", tol=1e-10),
    "solve_minres": lambda: solve(
        dense(torch.logspace(0, 2, 400) * torch.tensor([1.0, -1.0]).repeat(200)), torch.ones(400, dtype=F64),
        "minres", tol=1e-10,
    ),
    # A preconditioner's finiteness and breakdown flags travel with the solver's reads: no read of its own.
    "solve_pcg": lambda: solve(dense(torch.logspace(0, 3, 400)), torch.ones(400, dtype=F64), "cg", tol=1e-10,
                               preconditioner=WEAK),
    "solve_pminres": lambda: solve(
        dense(torch.logspace(0, 2, 400) * torch.tensor([1.0, -1.0]).repeat(200)), torch.ones(400, dtype=F64),
        "minres", tol=1e-10, preconditioner=WEAK,
    ),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_methods_read_at_checks_only(name: str) -> None:
    count, result = syncs(ADAPTIVE[name])
    assert result.converged and result.num_matvecs >= 200  # long enough for the rate to show
    assert count <= result.num_matvecs / 4 + SETUP, f"{name}: {count} host reads for {result.num_matvecs} products"


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_solvers_read_less_the_longer_they_run(method: str) -> None:
    """Past the first few iterations a check comes every 8: 2.5 times the products, well under 2 times the reads."""
    op = dense(torch.logspace(0, 4, 300))
    b = torch.ones(300, dtype=F64)
    short_count, short = syncs(lambda: solve(op, b, method, tol=1e-3, assume_psd=True))
    long_count, long = syncs(lambda: solve(op, b, method, tol=1e-12, assume_psd=True))
    assert long.num_matvecs >= 2.5 * short.num_matvecs
    assert long_count - short_count <= math.ceil((long.num_matvecs - short.num_matvecs) / 8) + 1


# -- the deferred check still reports a NaN product ---------------------------------------------------------------


class Poisoned(Dense):
    """Products turn NaN from the second call on."""

    calls = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super()._matmat(V)
        return out if self.calls < 2 else out * math.nan


@pytest.mark.parametrize("run", [
    lambda op: lanczos(op, 10, generator=seeded(0)),
    lambda op: spectral_density(op, 2, 10, seeded(0)),
    lambda op: trace(op, "hutch++", 20, seeded(0)),
    lambda op: trace(op, "xtrace", 20, seeded(0)),
    lambda op: trace(op, "exact"),
    lambda op: diagonal(op, "hutchinson", 40, seeded(0)),
    lambda op: diagonal(op, "xdiag", 20, seeded(0)),
    lambda op: frobenius_norm(op, 40, seeded(0)),
    lambda op: eigenvalues(op, k=2, generator=seeded(0)),
    lambda op: eigenvalues(op, k=2, which="magnitude", generator=seeded(0), method="power"),
    lambda op: solve(op, torch.ones(300, dtype=F64), "cg"),
    lambda op: solve(op, torch.ones(300, dtype=F64), "minres"),
], ids=["lanczos", "density", "hutch++", "xtrace", "exact", "diagonal", "xdiag", "frobenius", "eigenvalues",
        "power", "cg", "minres"])
def test_nan_products_are_still_reported(run: Callable[[Dense], Any]) -> None:
    clean = dense(torch.linspace(1.0, 2.0, 300))
    op = Poisoned(clean.A, psd=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(op)


# -- checking less often changes no result ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_results_equal_those_of_a_check_per_iteration(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The iterations after a stopping test undo nothing: a check after every product gives the same bits.

    Thick-restart Lanczos replays its steps on the host, so even its product count is close; power iteration
    does its Rayleigh-Ritz step at the checks only, so it is compared by its values.
    """
    batched = ADAPTIVE[name]()
    for module in ("eigen", "solve"):  # the package's names `eigen`, `solve` are taken by functions
        monkeypatch.setattr(importlib.import_module(f"curvature.linalg.{module}"), "until_check", lambda done: 1)
    each = ADAPTIVE[name]()
    if name == "eigenvalues_power":
        assert torch.allclose(batched.values, each.values, rtol=1e-9, atol=0)
        return
    for field in ("x", "values", "vectors", "residuals"):
        if hasattr(each, field):
            assert torch.equal(getattr(batched, field), getattr(each, field)), field
    assert each.num_matvecs <= batched.num_matvecs <= each.num_matvecs + 10
    if hasattr(each, "iterations"):
        assert (batched.converged, batched.residual_norm) == (each.converged, each.residual_norm)
