"""Lanczos tridiagonalization: orthogonality, the three-term relation, early exit, reproducibility."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from helpers import OPERATORS, operator_cases, reference, seeded

from curvature import lanczos


@pytest.mark.parametrize("kind, case_name", operator_cases())
def test_basis_and_tridiagonal_match_dense(kind: str, case_name: str) -> None:
    case = make_case(case_name, torch.float64)
    op = OPERATORS[kind][0](case["model"], case["loss_fn"], case["data"])
    dense = reference(kind, case_name)
    steps = min(25, dense.shape[0])
    result = lanczos(op, steps, generator=seeded(0))
    Q, T = result.basis, result.tridiagonal()
    m = result.num_steps
    assert result.num_matvecs == m <= steps
    scale = float(dense.norm(2))
    assert torch.allclose(Q.T @ Q, torch.eye(m, dtype=torch.float64), atol=1e-12)  # no loss of orthogonality
    assert torch.allclose(Q.T @ dense @ Q, T, atol=1e-10 * scale)
    # A Q = Q T + β_m q_{m+1} e_mᵀ: the part outside the basis sits in the last column only
    outside = dense @ Q - Q @ T
    assert float(outside[:, :-1].norm()) <= 1e-10 * scale
    assert abs(float(outside[:, -1].norm()) - result.residual_norm) <= 1e-10 * scale


def test_no_ghost_eigenvalues() -> None:
    """Many more steps than needed to converge the top eigenvalue: it appears once, not repeatedly."""
    values = torch.cat([torch.tensor([100.0, 50.0]), torch.linspace(0, 1, 198)]).double()
    Q = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=seeded(0))).Q
    A = (Q * values) @ Q.T
    result = lanczos(A, 120, generator=seeded(1))
    ritz = torch.linalg.eigvalsh(result.tridiagonal())
    assert int(((ritz - 100).abs() < 1e-6).sum()) == 1
    assert int(((ritz - 50).abs() < 1e-6).sum()) == 1


def test_invariant_subspace_exits_early() -> None:
    A = torch.diag(torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0], dtype=torch.float64))
    result = lanczos(A, 5, generator=seeded(0))
    assert result.num_steps == 3 and result.residual_norm == 0.0
    assert torch.allclose(torch.linalg.eigvalsh(result.tridiagonal()), torch.tensor([1.0, 4.0, 9.0]).double())


def test_start_vector_and_reproducibility() -> None:
    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    v0 = torch.ones(20, dtype=torch.float64)
    result = lanczos(A, 6, v0=v0)
    assert torch.allclose(result.basis[:, 0], v0 / v0.norm())
    assert float(result.alpha[0]) == pytest.approx(10.5, rel=1e-14)
    first, second = lanczos(A, 6, generator=seeded(3)), lanczos(A, 6, generator=seeded(3))
    assert torch.equal(first.alpha, second.alpha) and torch.equal(first.basis, second.basis)
    assert lanczos(A, 6, generator=seeded(3), keep_basis=False).basis is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_steps=0), ValueError, "num_steps must be at least 1"),
        (dict(num_steps=9), ValueError, "exceeds the operator's size"),
        (dict(num_steps=3, v0=torch.zeros(8, dtype=torch.float64)), ValueError, "zero"),
        (dict(num_steps=3, v0=torch.ones(8, dtype=torch.float32)), TypeError, "dtype"),
        (dict(num_steps=3, v0=torch.full((8,), float("nan"), dtype=torch.float64)), ValueError, "NaN"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        lanczos(torch.eye(8, dtype=torch.float64), **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_runs_in_float32(dtype: torch.dtype) -> None:
    """A half-precision operator: the basis and Gram-Schmidt run in float32, the invariant-subspace test at
    the products' rounding (8 u ‖A‖), so the process does not stop at once (100 ε of the dtype is 0.8 ‖T‖ in
    bfloat16, 0.1 ‖T‖ in float16: before, these β passed as zero after one step) and the extreme Ritz values are
    as exact as the products."""
    # β about a quarter of the spectrum's width: between 8 u ‖A‖ and 100 ε ‖A‖ of the dtype
    low = 1.0 if dtype == torch.bfloat16 else 1.8
    values = torch.linspace(low, 2.0, 60, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=seeded(0))).Q
    A = ((Q * values) @ Q.T).to(dtype)
    A = ((A.double() + A.double().T) / 2).to(dtype)
    result = lanczos(A, 30, generator=seeded(1))
    assert result.num_steps == 30 and result.basis.dtype == dtype
    exact = torch.linalg.eigvalsh(A.double())
    ritz = torch.linalg.eigvalsh(result.tridiagonal())
    unit = torch.finfo(dtype).eps / 2
    assert abs(float(ritz[-1] - exact[-1])) <= 2 * unit * 2.0
    assert abs(float(ritz[0] - exact[0])) <= 2 * unit * 2.0
    # the basis, orthonormal to float32 working precision before it is rounded to the operator's dtype
    gram = result.basis.double().T @ result.basis.double()
    assert float((gram - torch.eye(30, dtype=torch.float64)).abs().max()) <= 4 * unit


def test_non_symmetric_input_is_refused() -> None:
    from curvature.operators.base import LinearOperator

    class Flagged(LinearOperator):
        def __init__(self, A: torch.Tensor) -> None:
            super().__init__(A.shape[0], A.dtype, A.device, is_symmetric=False)
            self.A = A

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return self.A @ V

    M = torch.triu(torch.ones(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"op is not symmetric.*\(op \+ op.T\) / 2"):
        lanczos(M, 4)
    with pytest.raises(ValueError, match="is_symmetric=False"):
        lanczos(Flagged((M + M.T) / 2), 4)
