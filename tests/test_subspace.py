"""Subspace overlap, principal angles and orthonormal bases against known geometry and SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import seeded

from curvature.linalg import orthonormal_basis, principal_angles, subspace_overlap


def _frame(size: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``(size, size)`` matrix: known geometry, seen in no coordinate frame in particular."""
    return torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=seeded(seed))).Q


def _tilted(size: int, angles: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``(P, k)`` bases ``a`` and ``b`` whose principal angles are exactly ``angles``.

    ``a_i = u_i`` and ``b_i = cos θ_i u_i + sin θ_i u_{k+i}`` for orthonormal ``u``: ``aᵀ b = diag(cos θ)``.
    """
    U = _frame(size, seed)
    k = len(angles)
    theta = torch.tensor(angles, dtype=torch.float64)
    return U[:, :k], torch.cos(theta) * U[:, :k] + torch.sin(theta) * U[:, k : 2 * k]


def _columns(size: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(size, k, dtype=torch.float64, generator=seeded(seed)).to(dtype)


# --- orthonormal_basis ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_orthonormal_basis_spans_the_columns(dtype: torch.dtype) -> None:
    V = _columns(40, 6, seed=1, dtype=dtype)
    Q = orthonormal_basis(V)
    assert Q.shape == (40, 6) and Q.dtype == dtype
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    Q64, V64 = Q.double(), V.double()
    assert torch.allclose(Q64.T @ Q64, torch.eye(6, dtype=torch.float64), atol=tol)
    assert float((V64 - Q64 @ (Q64.T @ V64)).norm() / V64.norm()) < tol  # every column inside span Q


def test_orthonormal_basis_drops_dependent_and_zero_columns() -> None:
    x, y = _columns(30, 2, seed=2).unbind(1)
    V = torch.stack([x, y, 2 * x - 3 * y, torch.zeros(30, dtype=torch.float64), y], 1)
    Q = orthonormal_basis(V)
    assert Q.shape == (30, 2)
    assert float((V - Q @ (Q.T @ V)).norm()) < 1e-13 * float(V.norm())


def test_orthonormal_basis_rtol_decides_what_is_rounding() -> None:
    """A column 1e-8 off the span of the others is a direction by default (above max(P, k) ε), not with rtol=1e-6."""
    x, y, z = _columns(30, 3, seed=3).unbind(1)
    V = torch.stack([x, y, x + y + 1e-8 * z], 1)
    assert orthonormal_basis(V).shape == (30, 3)
    assert orthonormal_basis(V, rtol=1e-6).shape == (30, 2)
    assert orthonormal_basis(V, rtol=0.0).shape == (30, 3)


@pytest.mark.parametrize("shape", [(7,), (7, 3)])
def test_orthonormal_basis_of_zeros_is_empty(shape: tuple[int, ...]) -> None:
    assert orthonormal_basis(torch.zeros(shape, dtype=torch.float64)).shape == (7, 0)


def test_orthonormal_basis_of_a_vector_is_the_unit_vector() -> None:
    v = torch.tensor([3.0, 0.0, -4.0], dtype=torch.float64)
    Q = orthonormal_basis(v)
    assert Q.shape == (3, 1)
    assert torch.allclose(Q[:, 0].abs(), v.abs() / 5, atol=1e-15)


# --- subspace_overlap -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_overlap_of_a_vector_is_its_squared_cosine_to_the_span(angle: float) -> None:
    """A unit vector at angle θ to a 3-dimensional subspace has overlap cos² θ, whatever its length."""
    U = _frame(20, seed=4)
    basis = U[:, :3] @ torch.randn(3, 3, dtype=torch.float64, generator=seeded(5))  # not orthonormal columns
    inside = U[:, :3] @ torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    v = math.cos(angle) * inside + math.sin(angle) * U[:, 7]
    for scale in (1.0, 1e-200, 1e200):  # squares that under- and overflow in float64
        overlap = subspace_overlap(scale * v, basis)
        assert overlap.shape == () and overlap.dtype == torch.float64
        assert abs(float(overlap) - math.cos(angle) ** 2) < 1e-14


def test_overlap_per_column_and_of_orthonormal_bases() -> None:
    U = _frame(12, seed=6)
    basis = U[:, :4]
    V = torch.stack([U[:, 0] + U[:, 1], U[:, 5], U[:, 2] + U[:, 9], 3 * U[:, 3]], 1)
    expected = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    for orthonormal in (False, True):
        overlaps = subspace_overlap(V, basis, orthonormal=orthonormal)
        assert overlaps.shape == (4,)
        assert torch.allclose(overlaps, expected, atol=1e-14)


def test_overlap_depends_only_on_the_span() -> None:
    V, B = _columns(25, 3, seed=7), _columns(25, 5, seed=8)
    mixed = B @ torch.randn(5, 5, dtype=torch.float64, generator=seeded(9))  # another basis of the same span
    for reduce in ("none", "subspace"):
        assert torch.allclose(subspace_overlap(V, B, reduce=reduce), subspace_overlap(V, mixed, reduce=reduce),
                              atol=1e-13)
    assert torch.allclose(subspace_overlap(V, B, reduce="subspace"),
                          subspace_overlap(V @ torch.tensor([[1.0, 2, 0], [0, 1, 0], [3, 0, 1]]).double(), B,
                                           reduce="subspace"), atol=1e-13)


def test_random_unit_vectors_have_expected_overlap_k_over_p() -> None:
    """The baseline to read an overlap against: E overlap = k/P for isotropic vectors (here 0.1 = 5/50).

    Each overlap is Beta(k/2, (P-k)/2), standard deviation 0.059, so the mean of 2000 is 0.1 ± 0.0013.
    """
    overlaps = subspace_overlap(_columns(50, 2000, seed=10), _columns(50, 5, seed=11))
    assert overlaps.shape == (2000,)
    assert abs(float(overlaps.mean()) - 0.1) < 5 * 0.0013
    assert bool(((overlaps >= 0) & (overlaps <= 1)).all())


@pytest.mark.parametrize("dims", [(3, 3), (2, 5), (6, 4)])
def test_subspace_overlap_is_the_mean_squared_cosine_of_the_principal_angles(dims: tuple[int, int]) -> None:
    """‖Q_bᵀ Q_a‖_F² / dim(a) = (1/r_a) Σ cos² θ_i (the angles beyond min(r_a, r_b) are π/2)."""
    ka, kb = dims
    a, b = _columns(30, ka, seed=12), _columns(30, kb, seed=13)
    a = torch.cat([a, b[:, :1] + 0.1 * a[:, :1]], 1)  # one direction close to span(b): not all angles large
    angles = torch.from_numpy(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
    assert abs(float(subspace_overlap(a, b, reduce="subspace")) - float(angles.cos().pow(2).sum()) / (ka + 1)) < 1e-13


@pytest.mark.parametrize("seed", range(3))
def test_subspace_overlap_is_symmetric_for_equal_dimensions(seed: int) -> None:
    a, b = _columns(40, 4, seed=20 + seed), _columns(40, 4, seed=30 + seed)
    b = b + 0.5 * a  # some overlap, not the tiny one of independent subspaces
    ab, ba = subspace_overlap(a, b, reduce="subspace"), subspace_overlap(b, a, reduce="subspace")
    assert 0.1 < float(ab) < 1
    assert abs(float(ab) - float(ba)) < 1e-14


def test_subspace_overlap_of_a_subspace_is_not_symmetric_for_different_dimensions() -> None:
    U = _frame(10, seed=14)
    small, large = U[:, :2], U[:, :6]
    assert abs(float(subspace_overlap(small, large, reduce="subspace")) - 1.0) < 1e-14
    assert abs(float(subspace_overlap(large, small, reduce="subspace")) - 2 / 6) < 1e-14


def test_overlap_of_the_gradient_with_the_top_eigenspace() -> None:
    """Gur-Ari et al.'s measurement on a dense matrix: a gradient with 90% of its squared norm on the top-3 space."""
    U = _frame(30, seed=15)
    top = U[:, :3]
    g = math.sqrt(0.9) * top @ torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64) + math.sqrt(0.1) * U[:, 10]
    H = (U * torch.linspace(10.0, 0.1, 30, dtype=torch.float64)) @ U.T
    vectors = torch.linalg.eigh(H).eigenvectors[:, -3:]
    assert abs(float(subspace_overlap(17.0 * g, vectors, orthonormal=True)) - 0.9) < 1e-13


def test_zero_vectors_have_overlap_nan_and_a_zero_basis_overlap_zero() -> None:
    U = _frame(8, seed=16)
    V = torch.stack([U[:, 0], torch.zeros(8, dtype=torch.float64), U[:, 1]], 1)
    overlaps = subspace_overlap(V, U[:, :1])
    assert overlaps[0] == pytest.approx(1.0, abs=1e-15) and bool(overlaps[1].isnan())
    assert overlaps[2] == pytest.approx(0.0, abs=1e-15)
    assert bool(subspace_overlap(torch.zeros(8, dtype=torch.float64), U[:, :2]).isnan())
    assert bool(subspace_overlap(torch.zeros(8, 2, dtype=torch.float64), U[:, :2], reduce="subspace").isnan())
    assert float(subspace_overlap(U[:, 0], torch.zeros(8, 3, dtype=torch.float64))) == 0.0


def test_rank_deficient_vectors_count_their_span_once() -> None:
    U = _frame(10, seed=17)
    V = torch.stack([U[:, 0], 2 * U[:, 0], U[:, 5], torch.zeros(10, dtype=torch.float64)], 1)  # rank 2
    assert abs(float(subspace_overlap(V, U[:, :3], reduce="subspace")) - 0.5) < 1e-14
    assert abs(float(subspace_overlap(U[:, :3], V, reduce="subspace")) - 1 / 3) < 1e-14


# --- principal_angles -------------------------------------------------------------------------------------------


def test_principal_angles_of_tilted_bases_are_the_tilts() -> None:
    angles = [0.0, 0.2, 0.7, 1.1, math.pi / 2]
    a, b = _tilted(30, angles, seed=18)
    mix = torch.randn(5, 5, dtype=torch.float64, generator=seeded(19))  # not orthonormal: the span is what counts
    computed = principal_angles(a @ mix, b)
    assert computed.dtype == torch.float64 and computed.shape == (5,)
    assert torch.allclose(computed, torch.tensor(angles, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(principal_angles(a, b, orthonormal=True), computed, atol=1e-13)


@pytest.mark.parametrize("dims", [(1, 1), (3, 3), (2, 7), (8, 3), (10, 10)])
@pytest.mark.parametrize("seed", range(3))
def test_principal_angles_of_random_subspaces_match_scipy(dims: tuple[int, int], seed: int) -> None:
    """SciPy's ``subspace_angles`` (an independent implementation, Knyazev & Argentati's algorithm) agrees."""
    a, b = _columns(25, dims[0], seed=40 + seed), _columns(25, dims[1], seed=50 + seed)
    expected = np.sort(scipy.linalg.subspace_angles(a.numpy(), b.numpy()))
    computed = principal_angles(a, b)
    assert computed.shape == (min(dims),)
    assert np.allclose(computed.numpy(), expected, rtol=0, atol=1e-12)
    assert torch.allclose(computed, principal_angles(b, a), rtol=0, atol=1e-14)  # symmetric in its arguments


@pytest.mark.parametrize("theta", [1e-4, 1e-7, 1e-9, 1e-12])
def test_tiny_principal_angles_are_accurate(theta: float) -> None:
    """Angles near 0 come from the sines: 1e-9 to about 1e-15 absolute, where arccos(cos θ) is wrong by ~1e-8.

    The construction rounds b's entries at about 1e-16, which is the accuracy any method can reach.
    """
    a, b = _tilted(30, [theta, 2 * theta, 0.0], seed=21)
    computed = principal_angles(a, b)
    expected = torch.tensor([0.0, theta, 2 * theta], dtype=torch.float64)
    assert float((computed - expected).abs().max()) < 1e-14
    # what the test protects against: the arccos of the computed cosines
    naive = torch.linalg.svdvals(a.T @ b).clamp(max=1).arccos().flip(0)
    assert theta > 1e-5 or float((naive - expected).abs().max()) > 1e-10


def test_principal_angles_of_rank_deficient_inputs_count_the_ranks() -> None:
    U = _frame(12, seed=22)
    a = torch.stack([U[:, 0], U[:, 1], U[:, 0] - U[:, 1], torch.zeros(12, dtype=torch.float64)], 1)  # rank 2
    b = torch.stack([U[:, 0], U[:, 2], U[:, 3]], 1)
    assert torch.allclose(principal_angles(a, b), torch.tensor([0.0, math.pi / 2], dtype=torch.float64), atol=1e-14)
    assert principal_angles(torch.zeros(12, 2, dtype=torch.float64), b).shape == (0,)


def test_principal_angles_of_vectors_is_the_angle_between_the_lines() -> None:
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # 135° as vectors, 45° as lines
    assert float(principal_angles(u, v)[0]) == pytest.approx(math.pi / 4, abs=1e-15)


# --- precisions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_measured_exactly_in_float64(dtype: torch.dtype) -> None:
    """The spans of the low-precision columns themselves, measured in float64: no rounding of their basis.

    A shared column gives an angle of 0 and an overlap of 1 to float64 rounding (1e-8 and 1 - 1e-7 with a basis
    rounded back to float32), and random subspaces agree with SciPy on the same numbers in float64.
    """
    a, b = _columns(30, 4, seed=23, dtype=dtype), _columns(30, 3, seed=24, dtype=dtype)
    b[:, 0] = a[:, 2]
    angles = principal_angles(a, b)
    assert angles.dtype == torch.float64
    expected = np.sort(scipy.linalg.subspace_angles(a.double().numpy(), b.double().numpy()))
    assert float(angles[0]) < 1e-14  # SciPy gives up to 3e-8 here
    assert np.allclose(angles[1:].numpy(), expected[1:], rtol=0, atol=1e-12)
    assert abs(float(subspace_overlap(a[:, 2], b)) - 1) < 1e-14
    overlap = subspace_overlap(b, a, reduce="subspace")
    assert overlap.dtype == torch.float64
    assert abs(float(overlap) - float(angles.cos().pow(2).mean())) < 1e-13
    assert orthonormal_basis(a).dtype == dtype


# --- errors -----------------------------------------------------------------------------------------------------


P = torch.ones(5, 2, dtype=torch.float64)
CALLS = {
    "overlap": lambda x, y: subspace_overlap(x, y),
    "angles": lambda x, y: principal_angles(x, y),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("bad, error, match", [
    ([[1.0, 2.0]], TypeError, "must be a tensor"),
    (torch.ones(5, 2, dtype=torch.int64), TypeError, "real floating-point"),
    (torch.ones(5, 2, dtype=torch.complex128), TypeError, "real and imaginary parts"),
    (torch.ones(5, 2, 1, dtype=torch.float64), ValueError, r"vector \(P,\) or a matrix"),
    (torch.ones(0, 2, dtype=torch.float64), ValueError, "P ≥ 1"),
    (torch.ones(4, 2, dtype=torch.float64), ValueError, "same length P, got [45] and [45]"),
    (torch.tensor([[1.0, float("nan")]] * 5, dtype=torch.float64), ValueError, "NaN or Inf"),
    (torch.full((5,), float("inf"), dtype=torch.float64), ValueError, "NaN or Inf"),
    (torch.ones(5, 2, dtype=torch.float64, device="meta"), ValueError, r"is on (meta|cpu) but .* is on (meta|cpu)"),
])
def test_bad_inputs_are_refused_naming_the_argument(call: str, bad, error: type, match: str) -> None:
    first, second = ("vectors", "basis") if call == "overlap" else ("a", "b")
    with pytest.raises(error, match=match) as info:
        CALLS[call](bad, P)
    assert first in str(info.value)
    with pytest.raises(error, match=match) as info:
        CALLS[call](P, bad)
    assert second in str(info.value)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="reduce must be 'none'"):
        subspace_overlap(P, P, reduce="mean")
    with pytest.raises(ValueError, match=r"rtol must be in \[0, 1\)"):
        orthonormal_basis(P, rtol=-1e-3)
    with pytest.raises(ValueError, match=r"rtol must be in \[0, 1\)"):
        orthonormal_basis(P, rtol=1.0)
    with pytest.raises(TypeError, match="rtol must be a real number"):
        orthonormal_basis(P, rtol="small")
    with pytest.raises(ValueError, match="vectors contains NaN"):
        orthonormal_basis(torch.full((3,), float("nan")))
