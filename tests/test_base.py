"""The linear-operator algebra: products, counters, damping, sums, dense and scipy views."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from helpers import rel_err

import curvature
from curvature.operators.base import LinearOperator


class Dense(LinearOperator):
    """A dense matrix as an operator (test double)."""

    def __init__(self, A: torch.Tensor, psd: bool = False) -> None:
        super().__init__(A.shape[0], A.dtype, A.device, is_symmetric=bool(torch.equal(A, A.T)), is_psd=psd)
        self.A = A

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


@pytest.fixture
def spd() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, dtype=torch.float64, generator=g)
    A = B @ B.T
    # Symmetric bit for bit: some BLAS kernels (MKL on AMD) round B @ B.T asymmetrically in the last bit.
    return (A + A.T) / 2 + torch.eye(6, dtype=torch.float64)


def test_products_and_counter(spd: torch.Tensor) -> None:
    op = Dense(spd, psd=True)
    v, V = spd[:, 0].clone(), spd[:, :3].clone()
    assert torch.equal(op @ v, spd @ v)
    assert torch.equal(op.matvec(v), spd @ v)
    assert torch.equal(op @ V, spd @ V)
    assert torch.equal(op.matmat(V), spd @ V)
    assert op.num_matvecs == 1 + 1 + 3 + 3
    assert (op @ V[:, :0]).shape == (6, 0)


def test_algebra(spd: torch.Tensor) -> None:
    op = Dense(spd, psd=True)
    eye = torch.eye(6, dtype=torch.float64)
    cases = {
        "damped": (op.damped(0.5), spd + 0.5 * eye),
        "plus identity": (op + 2.0 * curvature.identity_like(op), spd + 2 * eye),
        "scalar left": (3.0 * op, 3 * spd),
        "scalar right": (op * 3.0, 3 * spd),
        "division": (op / 4.0, spd / 4),
        "negation": (-op, -spd),
        "difference": (op - 0.5 * op, 0.5 * spd),
        "sum builtin": (sum([op, op]), 2 * spd),
    }
    for name, (composite, dense) in cases.items():
        assert rel_err(composite.to_dense(), dense) <= 1e-15, name
        assert composite.is_symmetric, name
    assert op.damped(0.5).is_psd and (op + op).is_psd
    assert not (-op).is_psd and not (op - op).is_psd


def test_algebra_refuses_bad_operands(spd: torch.Tensor) -> None:
    op = Dense(spd)
    with pytest.raises(TypeError, match="identity_like"):
        op + 1.0
    with pytest.raises(TypeError, match="must be a scalar"):
        op * torch.ones(2)
    with pytest.raises(TypeError, match="real number"):
        op * "2"
    with pytest.raises(ValueError, match="divide"):
        op / 0
    with pytest.raises(ValueError, match="shapes"):
        op + Dense(torch.eye(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtypes"):
        op + Dense(spd.float())


def test_to_dense_chunks(spd: torch.Tensor) -> None:
    op = Dense(spd)
    assert torch.equal(op.to_dense(chunk_size=4), spd)
    with pytest.raises(ValueError, match="chunk_size"):
        op.to_dense(chunk_size=0)


def test_to_scipy(spd: torch.Tensor) -> None:
    op = Dense(spd, psd=True)
    sp = op.to_scipy()
    assert sp.shape == (6, 6) and sp.dtype == np.float64
    x = np.arange(6.0)
    np.testing.assert_allclose(sp @ x, spd.numpy() @ x, rtol=1e-14)
    np.testing.assert_allclose(sp.matmat(np.eye(6)), spd.numpy(), rtol=1e-14)
    top = scipy.sparse.linalg.eigsh(sp, k=1, which="LA", return_eigenvectors=False)[0]
    assert top == pytest.approx(float(torch.linalg.eigvalsh(spd)[-1]), rel=1e-12)
    x32 = Dense(spd.float()).to_scipy() @ np.ones(6, dtype=np.float64)
    assert x32.dtype == np.float32


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.ones(6), TypeError, "torch.Tensor"),
        (torch.ones(5, dtype=torch.float64), ValueError, "shape"),
        (torch.ones(6, 2, 1, dtype=torch.float64), ValueError, "shape"),
        (torch.ones(6, dtype=torch.float32), TypeError, "dtype"),
        (torch.ones(6, dtype=torch.float64, device="meta"), ValueError, "is on meta"),
    ],
)
def test_operand_validation(spd: torch.Tensor, bad, error, message: str) -> None:
    op = Dense(spd)
    with pytest.raises(error, match=message):
        op @ bad
    assert op.num_matvecs == 0


def test_matvec_and_matmat_check_rank(spd: torch.Tensor) -> None:
    op = Dense(spd)
    with pytest.raises(ValueError, match="matmat needs a matrix"):
        op.matmat(spd[:, 0])
    with pytest.raises(ValueError, match="matvec needs a vector"):
        op.matvec(spd)


def test_repr(spd: torch.Tensor) -> None:
    assert "symmetric, psd" in repr(Dense(spd, psd=True))
