"""The view every estimator works through: working precision and per-estimator symmetry (curvature.linalg._operand)."""

from __future__ import annotations

import pytest
import torch
from cases import make_case
from helpers import OPERATORS, seeded

from curvature import diagonal, eigenvalues, frobenius_norm, lanczos, solve, spectral_density, trace
from curvature.linalg._operand import Operand, check_symmetric
from curvature.operators.base import LinearOperator


class Flagged(LinearOperator):
    """A dense matrix with an explicit ``is_symmetric`` flag."""

    def __init__(self, A: torch.Tensor, symmetric: bool) -> None:
        super().__init__(A.shape[0], A.dtype, A.device, is_symmetric=symmetric)
        self.A = A

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_products_in_the_operators_dtype_returned_in_the_working_dtype(dtype: torch.dtype) -> None:
    A = torch.randn(20, 20, generator=seeded(0)).to(dtype)
    A = ((A.double() + A.double().T) / 2).to(dtype)
    operand = Operand(A)
    work = torch.promote_types(dtype, torch.float32)
    assert operand.dtype == dtype and operand.work_dtype == work
    assert operand.unit_roundoff == torch.finfo(dtype).eps / 2
    v = torch.randn(20, 3, dtype=work, generator=seeded(1))
    out = operand @ v
    assert out.dtype == work and operand.num_matvecs == 3
    assert torch.equal(out, (A @ v.to(dtype)).to(work))  # the operand rounded to the dtype, the product returned
    assert operand.zeros(4).dtype == operand.probes("rademacher", 4, seeded(0)).dtype == work
    # the rounding level scales with what the products deliver: 8 u in half precision, 100 ε_w otherwise
    level = operand.noise(1.0)
    assert level == (8 * torch.finfo(dtype).eps / 2 if dtype in (torch.bfloat16, torch.float16)
                     else 100 * torch.finfo(dtype).eps)


def test_symmetry_is_required_per_estimator() -> None:
    """Trace, diagonal and Frobenius norm accept an operator flagged non-symmetric (they used to refuse it with
    every estimator); eigenvalue methods and solvers refuse it before any product."""
    M = torch.triu(torch.ones(12, 12, dtype=torch.float64)) + torch.eye(12, dtype=torch.float64)
    op = Flagged(M, symmetric=False)
    assert trace(op, "exact").value == pytest.approx(float(torch.trace(M)))
    assert torch.allclose(diagonal(op, "exact").value, M.diagonal())
    assert frobenius_norm(op, 12, seeded(0)).num_matvecs == 12
    products = op.num_matvecs
    for refuse in (
        lambda: eigenvalues(op), lambda: lanczos(op, 3), lambda: spectral_density(op, 1, 3),
        lambda: solve(op, torch.ones(12, dtype=torch.float64), "minres"),
        lambda: solve(op, torch.ones(12, dtype=torch.float64), "cg", assume_psd=True),
    ):
        with pytest.raises(ValueError, match="op is not symmetric"):
            refuse()
    assert op.num_matvecs == products


def test_dense_symmetry_tolerance() -> None:
    """‖A − Aᵀ‖_F ≤ √u ‖A‖_F: rounding-level asymmetry passes, a non-symmetric matrix does not."""
    case = make_case("cnn_ce_mean", torch.float32)
    H = OPERATORS["hessian"][0](case["model"], case["loss_fn"], case["data"]).to_dense()  # float32 products
    assert not torch.equal(H, H.T) and check_symmetric(H, "H")
    half = H.to(torch.bfloat16)
    noisy = (half.float() * (1 + 2**-8 * torch.randn(half.shape, generator=seeded(0)).clamp(-1, 1))).to(torch.bfloat16)
    assert not torch.equal(noisy, noisy.T) and check_symmetric(noisy, "H")  # a few units of bfloat16 rounding
    M = torch.triu(torch.ones(30, 30))
    assert not check_symmetric(M, "M", refuse=False)
    with pytest.raises(ValueError, match=r"M is not symmetric.*√u ‖A‖_F for torch.float32.*\(M \+ M.T\) / 2"):
        check_symmetric(M, "M")
    # float32 rounding in a float64 tensor is not float64 rounding: symmetrize it
    with pytest.raises(ValueError, match="not symmetric"):
        check_symmetric(H.double(), "H")
    assert check_symmetric((H.double() + H.double().T) / 2, "H")
