"""Lanczos eigenvalues against dense float64 eigendecompositions over the case registry."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from helpers import OPERATORS, assert_unchanged, operator_cases, reference, seeded, watched

from curvature import eigenvalues

PAIRS = pytest.mark.parametrize("kind, case_name", operator_cases())



def _expected(dense: torch.Tensor, which: str, k: int) -> torch.Tensor:
    values = torch.linalg.eigvalsh(dense)
    if which == "largest":
        return values.flip(0)[:k]
    if which == "smallest":
        return values[:k]
    return values[torch.argsort(values.abs(), descending=True)][:k]


def _synthetic(size: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense symmetric matrix with a slowly decaying positive part and 15 well-separated negative eigenvalues."""
    g = seeded(seed)
    Q = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=g)).Q
    values = torch.cat([
        100 * torch.arange(1, size - 14, dtype=torch.float64) ** -0.25,
        -torch.linspace(0.5, 3.0, 15, dtype=torch.float64),
    ])
    return (Q * values) @ Q.T, values


@PAIRS
def test_top_k_match_dense(kind: str, case_name: str) -> None:
    case = make_case(case_name, torch.float64)
    op = OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"])
    dense = reference(kind, case_name)
    k, tol = 3, 1e-6
    result = eigenvalues(op, k=k, tol=tol, generator=seeded(0))
    expected = _expected(dense, "largest", k)
    assert result.converged
    assert result.values.dtype == torch.float64
    assert torch.allclose(result.values, expected, rtol=1e-8, atol=0)
    true_residuals = (dense @ result.vectors - result.vectors * result.values).norm(dim=0)
    assert bool((true_residuals <= tol * result.values.abs() * (1 + 1e-6)).all())
    assert torch.allclose(true_residuals, result.residuals, rtol=0, atol=1e-12 * float(expected.abs().max()))
    assert torch.allclose(result.vectors.T @ result.vectors, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert result.num_matvecs == op.num_matvecs


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("k", [1, 4, 12])
def test_which_and_restarts_on_synthetic(which: str, k: int) -> None:
    A, _ = _synthetic()
    result = eigenvalues(A, k=k, which=which, tol=1e-9, generator=seeded(1), num_vectors=k + 4)
    assert result.converged
    expected = _expected(A, which, k)
    assert torch.allclose(result.values, expected, rtol=1e-10, atol=0)
    # a basis of k + 4 vectors forces thick restarts: more products than basis vectors
    assert result.num_matvecs > 2 * (k + 4)


@pytest.mark.parametrize("case_name", ["mlp_tanh_ce_mean", "cnn_ce_mean", "layernorm_ce_mean"])
def test_smallest_and_magnitude_on_hessians(case_name: str) -> None:
    case = make_case(case_name, torch.float64)
    dense = reference("hessian", case_name)
    for which in ("smallest", "magnitude"):
        op = OPERATORS["hessian"][0](case["model"], case["loss_fn"], case["data"])
        result = eigenvalues(op, k=2, which=which, tol=1e-8, generator=seeded(0))
        assert result.converged
        expected = _expected(dense, which, 2)
        scale = float(dense.norm(2))
        assert torch.allclose(result.values, expected, rtol=0, atol=1e-10 * scale)


def test_power_matches_lanczos_with_more_products() -> None:
    A, _ = _synthetic()
    lanczos = eigenvalues(A, k=1, tol=1e-6, generator=seeded(0))
    power = eigenvalues(A, k=1, which="magnitude", tol=1e-6, generator=seeded(0), method="power", max_matvecs=5000)
    assert power.converged and lanczos.converged
    assert abs(float(power.values[0]) - 100.0) <= 1e-9 * 100
    assert abs(float(lanczos.values[0]) - 100.0) <= 1e-9 * 100
    assert power.num_matvecs > 3 * lanczos.num_matvecs
    block = eigenvalues(A, k=3, which="magnitude", tol=1e-6, generator=seeded(0), method="power", max_matvecs=20000)
    assert torch.allclose(block.values, _expected(A, "magnitude", 3), rtol=1e-9, atol=0)


def test_same_seed_same_bits() -> None:
    case = make_case("cnn_ce_mean", torch.float64)
    results = [
        eigenvalues(OPERATORS["ggn"][0](case["model"], case["loss_fn"], case["data"]), k=3, generator=seeded(7))
        for _ in range(2)
    ]
    assert torch.equal(results[0].values, results[1].values)
    assert torch.equal(results[0].vectors, results[1].vectors)
    other = eigenvalues(OPERATORS["ggn"][0](case["model"], case["loss_fn"], case["data"]), k=3, generator=seeded(8))
    assert not torch.equal(results[0].vectors, other.vectors)


def test_warm_start_from_top_eigenvector_is_cheap() -> None:
    A, _ = _synthetic()
    cold = eigenvalues(A, k=1, tol=1e-8, generator=seeded(0))
    warm = eigenvalues(A, k=1, tol=1e-8, v0=cold.vectors[:, 0])
    assert warm.num_matvecs <= 2 < cold.num_matvecs
    assert abs(float(warm.values[0] - cold.values[0])) <= 1e-10 * 100


def test_invariant_subspace_and_repeated_eigenvalues() -> None:
    A = torch.diag(torch.tensor([3.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    # Krylov spaces hold one copy of each distinct eigenvalue: the first space {3, 2, 1, 0} is invariant after
    # 4 products, and a fresh orthogonal start finds the second 3.
    result = eigenvalues(A, k=2, tol=1e-10, generator=seeded(0))
    assert result.converged
    assert torch.allclose(result.values, torch.tensor([3.0, 3.0], dtype=torch.float64), atol=1e-12)
    assert result.num_matvecs <= 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_rank_deficient_operator(dtype: torch.dtype, which: str) -> None:
    """A GGN-like PSD operator of rank 18 in 60 dimensions: invariant Krylov spaces fill the whole basis
    (a regression: the continuation after one used to index past the projected matrix)."""
    Q = torch.linalg.qr(torch.randn(60, 18, dtype=torch.float64, generator=seeded(18))).Q
    values = torch.rand(18, dtype=torch.float64, generator=seeded(1)) * 10 + 0.01
    G = ((Q * values) @ Q.T).to(dtype)
    spectrum = torch.cat([values, torch.zeros(1, dtype=torch.float64)])
    for seed in range(5):
        result = eigenvalues(G, k=3, which=which, generator=seeded(seed))
        if which == "largest":
            expected = values.sort(descending=True).values[:3]
            assert torch.allclose(result.values, expected, rtol=1e-3, atol=0)
        else:
            # the null space has 42 copies of 0; one Krylov space sees one of them (see the docstring), so
            # all that is guaranteed is eigenvalues of G in ascending order, starting at 0
            assert abs(float(result.values[0])) <= 1e-5 * float(values.max())
            distance = (result.values[:, None] - spectrum[None, :]).abs().min(1).values
            assert float(distance.max()) <= 1e-3 * float(values.max())
            assert bool((result.values.diff() >= 0).all())


def test_float32_operator() -> None:
    case = make_case("mlp_tanh_ce_mean", torch.float32)
    op = OPERATORS["hessian"][0](case["model"], case["loss_fn"], case["data"])
    result = eigenvalues(op, k=2, tol=1e-4, generator=seeded(0))
    assert result.vectors.dtype == torch.float32
    expected = _expected(reference("hessian", "mlp_tanh_ce_mean"), "largest", 2)
    assert torch.allclose(result.values, expected, rtol=1e-5, atol=0)


def test_budget_exhausted_warns() -> None:
    A, _ = _synthetic()
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        result = eigenvalues(A, k=1, tol=1e-14, max_matvecs=5, generator=seeded(0))
    assert not result.converged
    assert result.num_matvecs == 5


def test_model_and_global_rng_unchanged() -> None:
    model, op, before = watched("hessian")
    first = eigenvalues(op, k=2)  # generator=None must not consume the global stream
    second = eigenvalues(op, k=2)
    assert_unchanged(model, before)
    assert torch.equal(first.values, second.values)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(k=400), ValueError, "exceeds the operator's size"),
        (dict(which="biggest"), ValueError, "which must be one of"),
        (dict(method="arnoldi"), ValueError, "method must be one of"),
        (dict(tol=0.0), ValueError, "tol must be positive"),
        (dict(num_vectors=1), ValueError, "num_vectors=1 must exceed k=1"),
        (dict(v0=torch.ones(3, dtype=torch.float64)), ValueError, "shape"),
        (dict(v0=torch.ones(300)), TypeError, "dtype"),
        (dict(v0=torch.zeros(300, dtype=torch.float64)), ValueError, "zero"),
        (dict(generator=3), TypeError, "torch.Generator"),
        (dict(which="largest", method="power"), ValueError, "largest magnitude"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    A, _ = _synthetic()
    with pytest.raises(error, match=match):
        eigenvalues(A, **kwargs)


def test_bad_operators() -> None:
    with pytest.raises(ValueError, match="square"):
        eigenvalues(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="support `@`"):
        eigenvalues([[1.0]])
    with pytest.raises(TypeError, match="floating"):
        eigenvalues(torch.ones(3, 3, dtype=torch.int64))
