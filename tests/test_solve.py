"""CG and MINRES solves: registry cases against dense float64 solves, dense edge cases, errors."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import pytest
import torch
from cases import make_case
from helpers import assert_unchanged, reference, rel_err, snapshot

import curvature
from curvature import GGNOperator, HessianOperator
from curvature.linalg.solve import SolveResult, solve
from curvature.operators.base import LinearOperator

F64 = torch.float64
solve_module = importlib.import_module("curvature.linalg.solve")  # the name `solve` is the function
DAMPING = 1e-2


class Dense(LinearOperator):
    """A dense matrix as an operator (test double) with explicit structure flags."""

    def __init__(self, A: torch.Tensor, *, symmetric: bool = True, psd: bool = False) -> None:
        super().__init__(A.shape[0], A.dtype, A.device, is_symmetric=symmetric, is_psd=psd)
        self.A = A

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A @ V


def rhs(size: int, dtype: torch.dtype = F64, seed: int = 1) -> torch.Tensor:
    return torch.randn(size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q, made exactly symmetric."""
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    A = Q @ torch.diag(eigenvalues.to(F64)) @ Q.T
    return (A + A.T) / 2


def true_rel_residual(A: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> float:
    return float((b.double() - A.double() @ x.double()).norm() / b.double().norm())


# -- registry cases against torch.linalg.solve on the dense float64 reference -----------------------------
#
# For any x, ‖x − x*‖/‖x*‖ ≤ κ(A) ‖b − A x‖/‖b‖. The solvers stop at a recurrence residual ≤ tol = 1e-12;
# the true residual of the dense reference then differs from it only by rounding (a few ε‖A‖‖x‖, at most
# about ε κ ≈ 2e-12 for the worst case here, κ ≈ 7e3), so it stays below 10 tol, and the error below
# 10 κ tol ≤ 7e-8 (about 1e-9 for the typical κ ≈ 100). The reference solve itself is off by about ε κ.

TOL = 1e-12


def test_cg_on_damped_ggn_matches_dense_solve(case: dict) -> None:
    G_ref = reference("ggn", case["name"])
    A_ref = G_ref + DAMPING * torch.eye(G_ref.shape[0], dtype=F64)
    evals = torch.linalg.eigvalsh(A_ref)
    # A GGN is PSD, so the damped one is positive definite; the generic (log-cosh) loss is convex too, but
    # the operator cannot know it (is_psd False), so the dense spectrum vouches for assume_psd there.
    assert float(evals.min()) > 0.5 * DAMPING
    cond = float(evals.max() / evals.min())
    before = snapshot(case["model"])
    G = GGNOperator(case["model"], case["loss_fn"], case["data"])
    op = G.damped(DAMPING)
    b = rhs(A_ref.shape[0])
    result = solve(op, b, tol=TOL, assume_psd=not op.is_psd)
    assert result.converged and not result.negative_curvature
    # One more product where the recurrence cannot vouch for tol = 1e-12 (ε ‖A‖ ‖x‖ above 1% of it): the
    # residual is then computed afresh, so that `converged` holds for x.
    assert result.num_matvecs == G.num_matvecs == op.num_matvecs
    assert result.iterations <= result.num_matvecs <= result.iterations + 1
    assert result.residual_norm <= TOL * float(b.norm())
    assert true_rel_residual(A_ref, result.x, b) <= 10 * TOL
    assert rel_err(result.x, torch.linalg.solve(A_ref, b)) <= 10 * cond * TOL
    assert_unchanged(case["model"], before)


def test_minres_on_shifted_hessian_matches_dense_solve(case: dict) -> None:
    H_ref = reference("hessian", case["name"])
    A_ref = H_ref + DAMPING * torch.eye(H_ref.shape[0], dtype=F64)
    evals = torch.linalg.eigvalsh(A_ref)
    # Every case's Hessian is indefinite, so H + 0.01 I is too; the shift keeps it nonsingular with
    # min |λ| ≥ 3e-4 and κ ≤ 7e3 across the registry (checked here, so a new case cannot slip through).
    assert float(evals.min()) < 0 < float(evals.max())
    cond = float(evals.abs().max() / evals.abs().min())
    assert cond < 1e4
    before = snapshot(case["model"])
    H = HessianOperator(case["model"], case["loss_fn"], case["data"])
    op = H.damped(DAMPING)
    b = rhs(A_ref.shape[0])
    result = solve(op, b, method="minres", tol=TOL)
    assert not result.negative_curvature
    # Where the recurrence cannot vouch for tol = 1e-12 (ε ‖A‖ ‖x‖ above 1% of it) the residual is computed
    # afresh (one or two products), so that `converged` holds for x: on one case it missed tol by rounding
    # (6.29e-12 against 6.24e-12), where converged used to be claimed.
    assert result.num_matvecs == H.num_matvecs == op.num_matvecs
    assert result.iterations <= result.num_matvecs <= result.iterations + 2
    assert result.converged == (result.residual_norm <= TOL * float(b.norm()))
    assert result.converged or (result.num_matvecs > result.iterations
                                and result.residual_norm <= 2 * TOL * float(b.norm()))
    assert true_rel_residual(A_ref, result.x, b) <= 10 * TOL
    assert rel_err(result.x, torch.linalg.solve(A_ref, b)) <= 10 * cond * TOL
    assert_unchanged(case["model"], before)


def test_float32_cg_on_damped_ggn() -> None:
    # The float32 case has the float64 case's parameters and data exactly (both drawn in float32), so the
    # float64 reference is the exact operator. The float32 products are off by about ε₃₂‖A‖ (ε₃₂ ≈ 1.2e-7),
    # which moves the solution by about κ ε₃₂, and the solve stops at a residual of tol = 1e-6: with
    # κ ≈ 60 the error is about κ (tol + ε₃₂) ≈ 7e-5; 2 κ (tol + 10 ε₃₂) ≈ 2.6e-4 leaves room for rounding.
    name = "mlp_tanh_ce_mean"
    G_ref = reference("ggn", name)
    A_ref = G_ref + DAMPING * torch.eye(G_ref.shape[0], dtype=F64)
    evals = torch.linalg.eigvalsh(A_ref)
    cond = float(evals.max() / evals.min())
    case = make_case(name, torch.float32)
    G = GGNOperator(case["model"], case["loss_fn"], case["data"])
    b = rhs(A_ref.shape[0], torch.float32)
    result = solve(G.damped(DAMPING), b, tol=1e-6)
    assert result.x.dtype == torch.float32
    eps32 = torch.finfo(torch.float32).eps
    err = rel_err(result.x, torch.linalg.solve(A_ref, b.double()))
    assert err <= 2 * cond * (1e-6 + 10 * eps32)
    assert true_rel_residual(A_ref, result.x, b) <= 1e-6 + 100 * eps32
    # The recurrence reaches 1e-6, but its rounding ε₃₂ ‖A‖ ‖x‖ is not below 1% of that: the residual is
    # computed afresh (one product) and it is above tol by rounding (1.1e-6), so converged is False where it
    # used to be claimed. At tol = 1e-5 the recurrence is met with room.
    assert result.num_matvecs == result.iterations + 1
    assert not result.converged and result.residual_norm > 1e-6 * float(b.norm())
    loose = solve(G.damped(DAMPING), b, tol=1e-5)
    assert loose.converged and true_rel_residual(A_ref, loose.x, b) <= 1e-5


# -- dense tensors ------------------------------------------------------------------------------------------


def test_dense_spd_cg_and_minres_agree_with_dense_solve() -> None:
    A = symmetric(torch.logspace(0, 2, 20))
    b = rhs(20)
    x_ref = torch.linalg.solve(A, b)
    cg = solve(A, b, tol=1e-12, assume_psd=True)
    mr = solve(A, b, method="minres", tol=1e-12)
    for result in (cg, mr):
        assert isinstance(result, SolveResult)
        assert result.converged and result.num_matvecs == result.iterations <= 200
        assert rel_err(result.x, x_ref) <= 10 * 100 * 1e-12  # κ = 100
    assert not cg.negative_curvature and not mr.negative_curvature
    with pytest.raises(dataclasses.FrozenInstanceError):
        cg.x = b  # type: ignore[misc]


def test_dense_indefinite_minres() -> None:
    eigenvalues = torch.cat([-torch.logspace(0, 1, 10), torch.logspace(-1, 1, 15)])
    A = symmetric(eigenvalues, seed=3)
    b = rhs(25)
    result = solve(A, b, method="minres", tol=1e-10)
    assert result.converged
    assert true_rel_residual(A, result.x, b) <= 1e-9
    assert rel_err(result.x, torch.linalg.solve(A, b)) <= 10 * 100 * 1e-10  # κ = 100
    # The recurrence tracks the true residual to rounding.
    assert abs(result.residual_norm - float((b - A @ result.x).norm())) <= 1e-12 * float(b.norm())


def test_minres_singular_consistent_system() -> None:
    eigenvalues = torch.cat([torch.zeros(5), torch.linspace(-3, -0.5, 10), torch.linspace(0.5, 4, 15)])
    A = symmetric(eigenvalues, seed=4)
    b = A @ rhs(30, seed=2)  # in the range of A: consistent
    result = solve(A, b, method="minres", tol=1e-12)
    assert torch.isfinite(result.x).all()
    assert result.converged and true_rel_residual(A, result.x, b) <= 1e-11
    # From x0 = 0 the Krylov space lies in range(A), so MINRES finds the minimum-norm solution.
    assert rel_err(result.x, torch.linalg.pinv(A) @ b) <= 1e-10


def test_minres_zero_curvature_directions_give_no_nan() -> None:
    # A zero eigenvalue (exactly: a diagonal keeps it exact) with b orthogonal to its eigenvector.
    A = torch.diag(torch.tensor([1.0, 0.0, 2.0, -3.0], dtype=F64))
    b = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    result = solve(A, b, method="minres", tol=1e-14)
    assert result.converged and result.iterations == 3  # three distinct eigenvalues: Lanczos breaks down
    assert torch.allclose(result.x, torch.tensor([1.0, 0.0, 0.5, -1 / 3], dtype=F64), rtol=0, atol=1e-14)
    # Zero curvature along the first Lanczos vector (α₁ = vᵀAv = 0) on a nonsingular indefinite matrix.
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    result = solve(swap, torch.tensor([1.0, 0.0], dtype=F64), method="minres", tol=1e-14)
    assert result.converged and torch.equal(result.x, torch.tensor([0.0, 1.0], dtype=F64))
    # An inconsistent singular system: MINRES returns a least-squares solution, not NaN, and says so.
    result = solve(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), torch.ones(2, dtype=F64), method="minres")
    assert torch.isfinite(result.x).all() and not result.converged
    assert result.x[0] == pytest.approx(1.0) and result.residual_norm == pytest.approx(1.0)
    # b in the null space: A b = 0 at the first product; nothing to gain, x stays 0.
    result = solve(torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), torch.tensor([0.0, 1.0], dtype=F64),
                   method="minres")
    assert torch.equal(result.x, torch.zeros(2, dtype=F64)) and not result.converged
    assert result.iterations == 1 and result.residual_norm == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_minres_stops_on_lanczos_breakdown(seed: int) -> None:
    # Three distinct eigenvalues, exactly (a diagonal: Q diag Qᵀ in floating point would split them by
    # rounding): the Krylov space is invariant after three steps, and MINRES stops there with the exact
    # solution although tol asks for more than rounding allows.
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, -5.0, -5.0, -5.0], dtype=F64))
    b = rhs(10, seed=seed)
    result = solve(A, b, method="minres", tol=1e-30)
    assert result.iterations == 3 and result.num_matvecs == 3
    assert result.residual_norm <= 1e-14 * float(b.norm())
    assert rel_err(result.x, torch.linalg.solve(A, b)) <= 1e-14


# -- singular inconsistent systems: MINRES stops at a least-squares solution -------------------------------
#
# A least-squares solution x of A x ≈ b has A r = 0 for r = b − A x. For any x, r − r† = A (x† − x) lies in
# range(A) and A r† = 0, so ‖r − r†‖ ≤ ‖A r‖ / σ⁺ and ‖P x − x†‖ ≤ ‖r − r†‖ / σ⁺, with x† the minimum-norm
# least-squares solution, r† its residual, σ⁺ the least nonzero |eigenvalue| and P the projector on
# range(A). MINRES stops when ‖A r‖ ≤ √ε ‖A‖ ‖r‖ (by its recurrence, which follows the true value closely
# here), which bounds both.


def singular_system(
    kind: str, seed: int, dtype: torch.dtype = F64, nonzero: int = 15, zeros: int = 5
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Q diag(λ, 0) Qᵀ with b = A y + (a null-space vector): singular, inconsistent. Returns A, b, σ⁺."""
    g = torch.Generator().manual_seed(seed)
    n = nonzero + zeros
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    if kind == "reproducer":  # the review's reproducer: min ‖b − A x‖ = ‖Q[:, 17]‖ = 1
        A = (Q * torch.cat([torch.linspace(-2, 3, nonzero), torch.zeros(zeros)]).double()) @ Q.T
        b = A @ torch.randn(n, generator=g, dtype=F64) + Q[:, 17]
        return A.to(dtype), b.to(dtype), 1 / 7  # linspace(-2, 3, 15) has step 5/14; its least |λ| is 1/7
    # |λ| from 1e-3 to 1 with random signs: eigenvalues of both signs next to the zero ones.
    eigenvalues = torch.logspace(-3, 0, nonzero, dtype=F64) * torch.randn(nonzero, dtype=F64, generator=g).sign()
    A = Q @ torch.diag(torch.cat([eigenvalues, torch.zeros(zeros, dtype=F64)])) @ Q.T
    A = (A + A.T) / 2
    b = A @ torch.randn(n, dtype=F64, generator=g) + Q[:, nonzero:] @ torch.randn(zeros, dtype=F64, generator=g)
    return A.to(dtype), b.to(dtype), 1e-3


def check_least_squares(A: torch.Tensor, b: torch.Tensor, sigma: float, result: SolveResult, slack: float) -> None:
    """``result`` is a least-squares solution of A x ≈ b to √ε (times ``slack``), with an honest residual."""
    eps = torch.finfo(A.dtype).eps
    A, b, x = A.double(), b.double(), result.x.double()
    a_norm = float(torch.linalg.matrix_norm(A, 2))
    pinv = torch.linalg.pinv(A, hermitian=True, rtol=1e-10 if eps < 1e-10 else 1e-5)
    x_dagger = pinv @ b
    r, r_dagger = b - A @ x, b - A @ x_dagger
    assert torch.isfinite(result.x).all() and not result.converged  # ‖r‖ ≥ ‖r†‖ > tol ‖b‖
    assert float((A @ r).norm()) <= slack * eps**0.5 * a_norm * float(r.norm())
    assert float((r - r_dagger).norm()) <= slack * eps**0.5 * a_norm / sigma * float(r.norm())
    assert float((pinv @ (A @ x) - x_dagger).norm()) <= slack * eps**0.5 * a_norm / sigma**2 * float(r.norm())
    # The reported residual is the true one up to rounding (it was 0.377 against a true 3e15, below the
    # least-squares minimum 1, before the least-squares test): within 100 ε ‖A‖ ‖x‖.
    assert abs(result.residual_norm - float(r.norm())) <= 100 * eps * a_norm * float(x.norm())
    assert result.residual_norm >= float(r_dagger.norm()) - 100 * eps * a_norm * float(x.norm())


@pytest.mark.parametrize("tol", [1e-6, 1e-12])
def test_minres_singular_inconsistent_system_stops_at_least_squares_point(tol: float) -> None:
    # The review's reproducer: before the least-squares test MINRES reached the least-squares point at
    # iteration 15, then ran all 200 iterations, ‖x‖ growing to 3e16 along near-null directions that Lanczos
    # without reorthogonalization kept producing, and reported a residual of 0.377 (true: 3e15). The level
    # of the test is √ε whatever tol asks: a tight tol must not send MINRES past the least-squares point.
    A, b, sigma = singular_system("reproducer", 0)
    x_dagger = torch.linalg.pinv(A, hermitian=True, rtol=1e-10) @ b
    assert float((b - A @ x_dagger).norm()) == pytest.approx(1.0, abs=1e-12)  # the least-squares minimum
    result = solve(A, b, method="minres", tol=tol)
    check_least_squares(A, b, sigma, result, slack=1.0)
    # A has 16 distinct eigenvalues (counting 0), so the Krylov space is invariant after 16 steps: the
    # least-squares test fires at the singular 16th (measured: 16); the residual needed no recomputation.
    assert result.iterations <= 20 and result.num_matvecs == result.iterations
    # MINRES's iterate carries a null-space component (it is not the minimum-norm solution): ‖x‖ ≈ 5.1
    # against ‖x†‖ ≈ 3.3 here, where it was 3e16.
    assert float(result.x.norm()) <= 10 * float(x_dagger.norm())
    # Stopped before the least-squares point, MINRES reports the recurrence's residual, the true one.
    capped = solve(A, b, method="minres", tol=tol, max_iter=10)
    assert not capped.converged and capped.iterations == capped.num_matvecs == 10
    assert capped.residual_norm == pytest.approx(float((b - A @ capped.x).norm()), rel=1e-12)


def test_minres_past_the_least_squares_point_falls_back_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lower the least-squares test to ε, below the 5e-12 that the reproducer's least-squares point reaches:
    # MINRES runs past it as it did before the test existed, x grows along near-null directions until the
    # size test (‖x‖ ≥ ‖b‖ / (100 ε ‖A‖)) stops it, and the recurrence's residual no longer means anything.
    # MINRES then computes the true residuals of the last iterate and of the trusted iterate with the least
    # ‖A r‖ / ‖r‖ (two products) and returns the latter: the least-squares point, with its true residual.
    monkeypatch.setattr(solve_module, "_LS_EXPONENT", 1.0)
    A, b, sigma = singular_system("reproducer", 0)
    result = solve(A, b, method="minres", tol=1e-12)
    check_least_squares(A, b, sigma, result, slack=1.0)
    assert result.iterations < 10 * 20 and result.num_matvecs == result.iterations + 2
    assert float(result.x.norm()) <= 10 * 3.32


@pytest.mark.parametrize("seed", [1, 4])
def test_minres_singular_inconsistent_system_with_eigenvalues_near_zero(seed: int) -> None:
    # Eigenvalues of both signs down to 1e-3 next to five zeros. MINRES's iterates pick up a large
    # null-space component on the way (‖x‖ ≈ 1.4e3 to 1.9e3 against ‖x†‖ ≈ 3 to 4, from the first dozen
    # steps, before any rounding effect), and its update directions grow accordingly, so it may spend one
    # product to confirm the final residual. The true ‖A r‖ can exceed the recurrence's estimate that
    # stopped MINRES a little (measured 8.7e-10 and 7.9e-9 against √ε = 1.5e-8): slack 2.
    A, b, sigma = singular_system("log", seed)
    result = solve(A, b, method="minres")
    check_least_squares(A, b, sigma, result, slack=2.0)
    assert result.iterations < 10 * 20 and result.num_matvecs <= result.iterations + 2
    assert float(result.x.norm()) <= 1e4 * float((torch.linalg.pinv(A, hermitian=True, rtol=1e-10) @ b).norm())


def test_minres_singular_inconsistent_system_float32() -> None:
    # In float32 √ε = 3.5e-4; the least-squares point is met to that level (measured ‖A r‖ = 3.7e-5 ‖A‖ ‖r‖).
    A, b, sigma = singular_system("reproducer", 0, dtype=torch.float32)
    result = solve(A, b, method="minres")
    assert result.x.dtype == torch.float32
    check_least_squares(A, b, sigma, result, slack=2.0)
    assert float(result.x.norm()) <= 10 * 3.32


@pytest.mark.parametrize("sign", ["spd", "indefinite"])
@pytest.mark.parametrize("tol", [1e-1, 1e-2])
def test_minres_loose_tol_on_ill_conditioned_system_converges(sign: str, tol: float) -> None:
    # A least-squares test at ‖A r‖ ≤ tol ‖A‖ ‖r‖ would stop here before the residual test (a consistent
    # system has ‖A r‖ ≥ ‖A‖ ‖r‖ / κ, and κ = 1e4 > 1 / tol): at √ε it cannot, as κ < 1 / √ε.
    eigenvalues = torch.logspace(0, -4, 30, dtype=F64)
    if sign == "indefinite":
        eigenvalues = eigenvalues * torch.tensor([1.0, -1.0], dtype=F64).repeat(15)
    A = symmetric(eigenvalues, seed=5)
    b = rhs(30)
    result = solve(A, b, method="minres", tol=tol)
    assert result.converged and result.num_matvecs == result.iterations < 300
    assert true_rel_residual(A, result.x, b) <= tol * (1 + 1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_minres_residual_is_honest_on_a_nearly_singular_system(seed: int) -> None:
    # κ = 1e10 > 1 / √ε: MINRES's recurrence residual can drift far from the true one (like ε κ² ‖b‖; at
    # tol = 1e-2 it claimed convergence here with true residuals of 0.26 to 9.7 ‖b‖). MINRES's own estimate
    # of κ, ‖A‖ max ‖d_k‖, passes 1 / √ε, so it checks the final residual: what it reports holds for x.
    A = symmetric(torch.logspace(0, -10, 30, dtype=F64), seed=seed)
    b = rhs(30, seed=seed)
    for tol in (1e-2, 1e-6):
        result = solve(A, b, method="minres", tol=tol)
        true = float((b - A @ result.x).norm())
        assert result.num_matvecs > result.iterations
        assert result.residual_norm == pytest.approx(true, rel=1e-10)
        assert result.converged == (true <= tol * float(b.norm()))


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_zero_rhs_costs_nothing(method: str) -> None:
    A = symmetric(torch.logspace(0, 1, 6))
    for x0 in (None, rhs(6)):
        result = solve(A, torch.zeros(6, dtype=F64), method=method, x0=x0, assume_psd=True)
        assert result.converged and result.num_matvecs == 0 and result.iterations == 0
        assert torch.equal(result.x, torch.zeros(6, dtype=F64)) and result.residual_norm == 0.0


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_warm_start_reduces_iterations(method: str) -> None:
    A = symmetric(torch.logspace(0, 3, 40), seed=6)
    b = rhs(40)
    x_star = torch.linalg.solve(A, b)
    cold = solve(A, b, method=method, tol=1e-8, assume_psd=True)
    warm = solve(A, b, method=method, tol=1e-8, assume_psd=True, x0=x_star + 1e-6 * rhs(40, seed=9))
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert warm.num_matvecs == warm.iterations + 1  # one product for b − A x0
    assert rel_err(warm.x, x_star) <= 1e3 * 1e-8 * 10  # κ = 1e3
    exact = solve(A, b, method=method, tol=1e-8, assume_psd=True, x0=x_star)
    assert exact.iterations == 0 and exact.num_matvecs == 1 and exact.converged


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_max_iter_caps_iterations(method: str) -> None:
    A = symmetric(torch.logspace(0, 3, 40), seed=6)
    result = solve(A, rhs(40), method=method, tol=1e-12, max_iter=5, assume_psd=True)
    assert not result.converged and result.iterations == result.num_matvecs == 5
    assert torch.isfinite(result.x).all()


def test_rhs_with_graph_is_detached() -> None:
    A = symmetric(torch.logspace(0, 1, 5))
    b = rhs(5).requires_grad_(True)
    assert not solve(A, b * 2, assume_psd=True).x.requires_grad


# -- negative curvature -------------------------------------------------------------------------------------


def test_cg_detects_negative_curvature() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=F64))
    b = torch.ones(4, dtype=F64)
    result = solve(A, b, tol=1e-12, assume_psd=True)
    assert result.negative_curvature and not result.converged
    # The first direction b has bᵀAb = 5 > 0: one step x = (bᵀb / bᵀAb) b = 0.8 b; the second has pᵀAp ≤ 0
    # and the iterate is returned without moving along it.
    assert result.iterations == result.num_matvecs == 2
    assert torch.allclose(result.x, 0.8 * b, rtol=0, atol=1e-15)
    one_step = solve(A, b, tol=1e-12, assume_psd=True, max_iter=1)
    assert torch.equal(result.x, one_step.x) and not one_step.negative_curvature
    assert result.residual_norm == pytest.approx(float((b - A @ result.x).norm()), rel=1e-12)


def test_cg_negative_curvature_at_first_step_returns_start() -> None:
    A = torch.diag(torch.tensor([1.0, -5.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    result = solve(A, b, assume_psd=True)
    assert result.negative_curvature and result.iterations == result.num_matvecs == 1
    assert torch.equal(result.x, torch.zeros(2, dtype=F64))
    x0 = torch.tensor([0.5, 0.0], dtype=F64)  # r0 = (0.5, 1), r0ᵀ A r0 = 0.25 − 5 < 0
    result = solve(A, b, assume_psd=True, x0=x0)
    assert result.negative_curvature and result.num_matvecs == 2 and torch.equal(result.x, x0)
    assert not solve(A, b, method="minres").negative_curvature


# -- errors -------------------------------------------------------------------------------------------------


def test_cg_refuses_operator_not_known_psd() -> None:
    case = make_case("mlp_tanh_ce_mean")
    H = HessianOperator(case["model"], case["loss_fn"], case["data"])
    b = rhs(H.shape[0])
    with pytest.raises(ValueError, match="assume_psd=True"):
        solve(H.damped(DAMPING), b)
    with pytest.raises(ValueError, match="minres"):
        solve(H, b, method="cg")
    assert H.num_matvecs == 0  # refused before any product
    with pytest.raises(ValueError, match="assume_psd=True"):
        solve(torch.eye(3, dtype=F64), rhs(3))  # a dense tensor carries no is_psd flag
    assert solve(torch.eye(3, dtype=F64), rhs(3), assume_psd=True).converged


def test_argument_errors() -> None:
    A = symmetric(torch.logspace(0, 1, 4))
    b = rhs(4)
    with pytest.raises(ValueError, match="shape"):
        solve(A, rhs(5), assume_psd=True)
    with pytest.raises(ValueError, match="shape"):
        solve(A, b[:, None], assume_psd=True)
    with pytest.raises(TypeError, match="dtype"):
        solve(A, b.float(), assume_psd=True)
    with pytest.raises(ValueError, match="meta"):
        solve(A, torch.zeros(4, dtype=F64, device="meta"), assume_psd=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        solve(A, b.tolist(), assume_psd=True)
    with pytest.raises(ValueError, match="NaN"):
        solve(A, torch.full((4,), float("nan"), dtype=F64), assume_psd=True)
    with pytest.raises(ValueError, match="'cg', 'minres'"):
        solve(A, b, method="gmres")
    for tol in (0.0, -1e-6):
        with pytest.raises(ValueError, match="tol must be positive"):
            solve(A, b, tol=tol, assume_psd=True)
    with pytest.raises(ValueError, match="tol must be finite"):
        solve(A, b, tol=float("nan"), assume_psd=True)
    with pytest.raises(TypeError, match="tol"):
        solve(A, b, tol="1e-6", assume_psd=True)
    with pytest.raises(ValueError, match="max_iter"):
        solve(A, b, max_iter=0, assume_psd=True)
    with pytest.raises(TypeError, match="max_iter"):
        solve(A, b, max_iter=2.0, assume_psd=True)
    with pytest.raises(ValueError, match="x0 has shape"):
        solve(A, b, x0=rhs(3), assume_psd=True)
    with pytest.raises(TypeError, match="operator"):
        solve(A.tolist(), b, assume_psd=True)
    with pytest.raises(ValueError, match="square"):
        solve(A[:3], b, assume_psd=True)


def test_non_symmetric_operator_is_refused() -> None:
    M = torch.triu(torch.ones(4, 4, dtype=F64))
    op = Dense(M, symmetric=False, psd=False)
    for method in ("cg", "minres"):
        with pytest.raises(ValueError, match="not symmetric"):
            solve(op, rhs(4), method=method, assume_psd=True)
    assert op.num_matvecs == 0


# -- half precision: converged holds for the returned x -------------------------------------------------------------


def _half_system(dtype: torch.dtype, eigenvalues: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    A = symmetric(eigenvalues, seed=seed).to(dtype)
    A = ((A.double() + A.double().T) / 2).to(dtype)  # symmetric bit for bit
    return A, rhs(A.shape[0], seed=seed + 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_half_precision_converged_holds_for_x(dtype: torch.dtype, method: str) -> None:
    """CG and MINRES iterate in float32; where the recurrence cannot vouch for tol the residual of the returned x
    is computed afresh (one float32 product with the half-precision matrix) before claiming convergence.
    converged implies ‖b − A x‖ ≤ tol ‖b‖ in float64; a tol below the rounding warns, naming the dtype, and is
    not converged (before, the recurrence in float16 claimed tol = 1e-4)."""
    eigenvalues = torch.linspace(0.8, 1.25, 40)
    if method == "minres":
        eigenvalues = eigenvalues * torch.tensor([1.0, -1.0]).repeat(20)
    A, b = _half_system(dtype, eigenvalues)
    b_norm = float(b.double().norm())
    result = solve(A, b, method=method, tol=0.1, assume_psd=True)
    assert result.converged and result.x.dtype == dtype
    assert true_rel_residual(A, result.x, b) <= 0.1
    name = str(dtype).replace("torch.", "")
    with pytest.warns(RuntimeWarning, match=f"tol=0.0001 is below what {name} products can certify"):
        tight = solve(A, b, method=method, tol=1e-4, assume_psd=True)
    assert not tight.converged and tight.num_matvecs > tight.iterations  # the residual was computed afresh
    # ... with float32 products (the dense half-precision matrix's float32 copy): the float64 residual of x.
    assert tight.residual_norm == pytest.approx(float((b.double() - A.double() @ tight.x.double()).norm()), rel=1e-4)
    # the returned x is as good as the products allow: its residual within a few u ‖A‖ ‖x‖ (‖A‖ = 1.25)
    unit = torch.finfo(dtype).eps / 2
    assert true_rel_residual(A, tight.x, b) <= 8 * unit * 1.25 * float(tight.x.double().norm()) / b_norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_cg_on_registry_ggns(dtype: torch.dtype) -> None:
    """Damped GGNs of the registry's models in half precision: whenever CG says converged, the float64 residual
    against the exact GGN of the half-precision model (its weights and data as they are) meets tol. The
    weighted cross-entropy has no float32 view (its weight is bfloat16): its residual carries 8 u ‖A‖ ‖x‖."""
    converged = 0
    for i, name in enumerate(("mlp_tanh_ce_mean", "cnn_ce_mean", "layernorm_ce_mean", "ce_weighted_mean")):
        case = make_case(name, dtype)
        G = GGNOperator(case["model"], case["loss_fn"], case["data"])
        exact = curvature.reference.ggn(case["model"], case["loss_fn"], case["data"])
        A_ref = exact + torch.eye(G.shape[0], dtype=F64)
        b = rhs(G.shape[0], dtype, seed=i)
        for tol in (0.5, 0.2, 0.05, 1e-3, 1e-4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = solve(G.damped(1.0), b, tol=tol)
            if result.converged:
                converged += 1
                assert true_rel_residual(A_ref, result.x, b) <= tol, (name, tol)
            else:
                assert any("can certify" in str(w.message) for w in caught), (name, tol)
    assert converged >= 4


def test_non_symmetric_dense_tensor_is_refused() -> None:
    """The docstring promised a ValueError for a non-symmetric operator; a dense tensor used to pass unchecked."""
    M = torch.triu(torch.ones(5, 5, dtype=F64)) + 2 * torch.eye(5, dtype=F64)
    for method in ("cg", "minres"):
        with pytest.raises(ValueError, match=r"op is not symmetric.*\(op \+ op.T\) / 2"):
            solve(M, rhs(5), method=method, assume_psd=True)
    # asymmetry at the rounding level of the dtype is accepted
    S = symmetric(torch.logspace(0, 1, 5))
    S[0, 1] += 1e-15
    assert solve(S, rhs(5), method="minres", tol=1e-10).converged


# -- preconditioners ----------------------------------------------------------------------------------------------
#
# A preconditioner M ≈ A⁻¹ (symmetric positive definite) changes the Krylov space, not the problem: tol is still
# the relative residual of A x = b, so every solve below is checked against the dense float64 solve of A, and
# the preconditioner's products are counted apart from the operator's.


def abs_inverse(A: torch.Tensor) -> torch.Tensor:
    """|A|⁻¹ = Q |Λ|⁻¹ Qᵀ: A⁻¹ itself for a positive definite A, and the ideal SPD preconditioner of an indefinite
    one (M A = Q sign(Λ) Qᵀ has the eigenvalues ±1 only, so MINRES needs two iterations)."""
    evals, Q = torch.linalg.eigh(A)
    M = (Q / evals.abs()) @ Q.T
    return (M + M.T) / 2


def jacobi(A: torch.Tensor) -> torch.Tensor:
    """The Jacobi (diagonal) preconditioner diag(|A_ii|)⁻¹, positive definite for any nonzero diagonal."""
    return torch.diag(1 / A.diagonal().abs())


PRECONDITIONED = {  # method: (operator kind, the system that method is for)
    "cg": "ggn",  # G + 0.01 I: positive definite
    "minres": "hessian",  # H + 0.01 I: indefinite on every case
}


@pytest.mark.parametrize("method", sorted(PRECONDITIONED))
def test_preconditioned_solve_matches_dense_solve(case: dict, method: str) -> None:
    # Measured over the registry (tol = 1e-12): with the exact |A|⁻¹, CG converges in 1 iteration and MINRES in
    # 2 on every case (the dense inverse is exact to about ε κ ≤ 1e-12); with Jacobi, 18 to 370 iterations (more
    # than without on most cases: the registry's curvature is not diagonally dominant) and errors up to 3e-12
    # against the dense solve. `converged` is the verdict of a residual computed afresh where the recurrence
    # cannot vouch for it (always, for preconditioned MINRES): 4 of the 46 Jacobi solves (3 MINRES, 1 CG) missed
    # tol by rounding, by up to 32x (3.2e-11 on ce_nd_logits_sum, κ = 4e3), with a PrecisionWarning.
    kind = PRECONDITIONED[method]
    R = reference(kind, case["name"])
    A_ref = R + DAMPING * torch.eye(R.shape[0], dtype=F64)
    x_ref = torch.linalg.solve(A_ref, b := rhs(A_ref.shape[0]))
    a_norm = float(torch.linalg.matrix_norm(A_ref, 2))
    before = snapshot(case["model"])
    eps = torch.finfo(F64).eps
    for name, M in (("exact", abs_inverse(A_ref)), ("jacobi", jacobi(A_ref))):
        cls = GGNOperator if kind == "ggn" else HessianOperator
        inner = cls(case["model"], case["loss_fn"], case["data"])
        op = inner.damped(DAMPING)
        counted = Dense(M, psd=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", curvature.PrecisionWarning)
            result = solve(op, b, method=method, tol=TOL, assume_psd=True, preconditioner=counted)
        assert not result.negative_curvature, name
        assert rel_err(result.x, x_ref) <= 1e-10, name
        true = float((b - A_ref @ result.x).norm())
        assert true <= 100 * TOL * float(b.norm()), name
        # The reported residual is the true one (to rounding), and converged is its verdict.
        assert abs(result.residual_norm - true) <= 1e-3 * true + 100 * eps * a_norm * float(result.x.norm()), name
        assert result.converged == (result.residual_norm <= TOL * float(b.norm())), name
        # num_matvecs counts the products with op only; the preconditioner's are counted apart.
        assert result.num_matvecs == inner.num_matvecs == op.num_matvecs, name
        assert result.num_preconditioner_applications == counted.num_matvecs == result.iterations + 1, name
        assert result.iterations <= result.num_matvecs <= result.iterations + 2, name
        if name == "exact":
            assert result.converged and result.iterations <= 2, result.iterations
    assert_unchanged(case["model"], before)


def scaled_system(sign: str, size: int = 60, spread: float = 4.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = D^½ C D^½ with C well conditioned (|λ| in [1, 4], positive or of both signs) and D a diagonal spread
    over ``spread`` decades: κ(A) ≈ 10^spread, while D⁻¹ (or Jacobi, for positive definite C) brings the
    preconditioned spectrum back near C's. Returns A and the diagonal of D."""
    evals = torch.linspace(1, 4, size, dtype=F64)
    if sign == "indefinite":
        evals = evals * torch.tensor([1.0, -1.0], dtype=F64).repeat(size // 2)
    C = symmetric(evals, seed=seed)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1))
    d = torch.logspace(0, spread, size, dtype=F64)[order]
    A = d.sqrt()[:, None] * C * d.sqrt()[None, :]
    return (A + A.T) / 2, d


@pytest.mark.parametrize(("method", "sign", "good"), [
    ("cg", "spd", "jacobi"), ("minres", "spd", "jacobi"), ("minres", "indefinite", "scaling"),
])
def test_good_preconditioner_cuts_iterations(method: str, sign: str, good: str) -> None:
    # κ(A) = 1e4 (spd) and 5e3 (indefinite), P = 60. Measured: CG 209 iterations -> 27 with Jacobi, MINRES 217 ->
    # 27; on the indefinite system MINRES 305 -> 65 with D⁻¹ (Jacobi, 121, helps less there: the diagonal of an
    # indefinite C is not its scale). The same tol means the same accuracy: both match the dense solve.
    A, d = scaled_system(sign)
    b = rhs(60, seed=7)
    x_ref = torch.linalg.solve(A, b)
    M = jacobi(A) if good == "jacobi" else torch.diag(1 / d)
    plain = solve(A, b, method=method, tol=1e-12, assume_psd=True)
    preconditioned = solve(A, b, method=method, tol=1e-12, assume_psd=True, preconditioner=M)
    for result in (plain, preconditioned):
        assert result.converged
        assert true_rel_residual(A, result.x, b) <= 1e-12 * (1 + 1e-6)
        assert rel_err(result.x, x_ref) <= 1e-10
    assert 3 * preconditioned.iterations <= plain.iterations, (plain.iterations, preconditioned.iterations)
    assert plain.num_preconditioner_applications == 0
    assert preconditioned.num_preconditioner_applications == preconditioned.iterations + 1


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_exact_inverse_preconditioner_solves_in_one_iteration(method: str) -> None:
    # M = A⁻¹: M A = I, so the first step solves the system (κ(A) = 100: the dense inverse is exact to 1e-14).
    A = symmetric(torch.logspace(0, 2, 30), seed=2)
    b = rhs(30)
    result = solve(A, b, method=method, tol=1e-10, assume_psd=True, preconditioner=torch.linalg.inv(A))
    assert result.converged and result.iterations == 1
    assert rel_err(result.x, torch.linalg.solve(A, b)) <= 1e-12
    # CG trusts its recurrence here; preconditioned MINRES always computes its final residual afresh.
    assert result.num_matvecs == (1 if method == "cg" else 2)
    assert result.num_preconditioner_applications == 2


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_preconditioner_applications_are_counted(method: str) -> None:
    A = symmetric(torch.logspace(0, 3, 40), seed=6)
    b = rhs(40)
    op, M = Dense(A, psd=True), Dense(jacobi(A) * 2.0, psd=True)  # any SPD scaling of Jacobi
    result = solve(op, b, method=method, tol=1e-8, preconditioner=M)
    assert result.converged and result.iterations > 5
    assert result.num_preconditioner_applications == M.num_matvecs == result.iterations + 1
    assert result.num_matvecs == op.num_matvecs  # the preconditioner's products are not counted as op's
    # A warm start: one product with op for b − A x0, one with M for M r0.
    x_star = torch.linalg.solve(A, b)
    warm = solve(A, b, method=method, tol=1e-8, assume_psd=True, x0=x_star + 1e-6 * rhs(40, seed=9),
                 preconditioner=jacobi(A))
    assert warm.converged and warm.iterations < result.iterations
    assert warm.num_preconditioner_applications == warm.iterations + 1
    # b = 0 costs nothing (the preconditioner is still checked first); no preconditioner counts 0.
    zero = solve(A, torch.zeros(40, dtype=F64), method=method, assume_psd=True, preconditioner=M)
    assert zero.num_matvecs == zero.num_preconditioner_applications == 0 and zero.converged
    assert solve(A, b, method=method, tol=1e-8, assume_psd=True).num_preconditioner_applications == 0
    with pytest.raises(ValueError, match="preconditioner has shape"):
        solve(A, torch.zeros(40, dtype=F64), method=method, assume_psd=True, preconditioner=torch.eye(3, dtype=F64))


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_bad_preconditioners_are_refused_before_any_product(method: str) -> None:
    A = symmetric(torch.logspace(0, 1, 4))
    op = Dense(A, psd=True)
    b = rhs(4)
    P = jacobi(A)
    bad = [
        (torch.eye(5, dtype=F64), ValueError, r"preconditioner has shape \(5, 5\), but the operator has shape \(4, 4"),
        (P[:3], ValueError, r"preconditioner has shape \(3, 4\)"),
        (torch.eye(4, dtype=F64, device="meta"), ValueError, "preconditioner is on meta but the operator is on cpu"),
        (P.float(), TypeError, r"preconditioner has dtype torch.float32 .* pass a preconditioner in float64"),
        (P.half(), TypeError, "preconditioner has dtype torch.float16"),
        (torch.eye(4, dtype=torch.int64), TypeError, "preconditioner has dtype torch.int64"),
        (P.tolist(), TypeError, "preconditioner must support `@`"),
        (Dense(P, symmetric=False, psd=True), ValueError, r"preconditioner is not symmetric \(flagged"),
        (P + torch.triu(torch.ones(4, 4, dtype=F64), 1), ValueError, r"preconditioner is not symmetric \(a dense"),
        (Dense(P, psd=False), ValueError, "preconditioner is flagged is_psd=False"),
        (-1.0 * Dense(P, psd=True), ValueError, "preconditioner is flagged is_psd=False"),
    ]
    for M, error, message in bad:
        with pytest.raises(error, match=message):
            solve(op, b, method=method, assume_psd=True, preconditioner=M)
        assert getattr(M, "num_matvecs", 0) == 0
    assert op.num_matvecs == 0
    # What is accepted: a dense tensor (no flag), an operator flagged PSD, a rounding-level asymmetry.
    S = P.clone()
    S[0, 1] += 1e-17
    for M in (P, Dense(P, psd=True), S):
        assert solve(op, b, method=method, tol=1e-10, preconditioner=M).converged


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_preconditioner_not_positive_definite_is_reported(method: str) -> None:
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    b = torch.ones(2, dtype=F64)
    # Negative definite, no flag: rᵀ M r < 0 at the start; reported before any product with op.
    op = Dense(A, psd=True)
    with pytest.raises(ValueError, match="preconditioner is not positive definite"):
        solve(op, b, method=method, preconditioner=-torch.eye(2, dtype=F64))
    assert op.num_matvecs == 0
    # Indefinite: r₀ᵀ M r₀ = 1 − 0.5 > 0, and the next residual (CG: r₁ = (2/3, 4/3), r₁ᵀ M r₁ = −4/9) or
    # Lanczos vector (MINRES) has rᵀ M r < 0: reported after the first product, whatever the flag claims.
    indefinite = torch.diag(torch.tensor([1.0, -0.5], dtype=F64))
    for M in (indefinite, Dense(indefinite, psd=True)):
        op = Dense(A, psd=True)
        with pytest.raises(ValueError, match=f"not positive definite: method='{method}'"):
            solve(op, b, method=method, preconditioner=M)
        assert op.num_matvecs == 1
    # Positive semi-definite but singular, with r₀ in its null space: rᵀ M r = 0 for r ≠ 0.
    with pytest.raises(ValueError, match="not positive definite"):
        solve(op, torch.tensor([0.0, 1.0], dtype=F64), method=method,
              preconditioner=torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
    # Already solved by x0: nothing to iterate, nothing to report.
    exact = solve(op, b, method=method, x0=torch.tensor([1.0, 0.5], dtype=F64), preconditioner=-torch.eye(2, dtype=F64))
    assert exact.converged and exact.iterations == 0


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("seed", range(10))
def test_indefinite_preconditioner_is_never_silently_wrong(method: str, seed: int) -> None:
    # A quarter of a diagonal preconditioner's entries negative, at random: either the solver reports it or
    # what it returns is honest (measured: reported in all 80 of 40 seeds x 2 methods).
    g = torch.Generator().manual_seed(seed)
    A = symmetric(torch.logspace(0, 2, 30), seed=seed)
    b = torch.randn(30, dtype=F64, generator=g)
    signs = torch.ones(30, dtype=F64)
    signs[torch.randperm(30, generator=g)[:7]] = -0.3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", curvature.PrecisionWarning)
            result = solve(A, b, method=method, tol=1e-8, assume_psd=True, preconditioner=torch.diag(signs))
    except ValueError as error:
        assert "preconditioner is not positive definite" in str(error)
    else:
        assert result.converged == (true_rel_residual(A, result.x, b) <= 1e-8)


class Poisoned(Dense):
    """A preconditioner whose products turn NaN from the third on."""

    calls = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super()._matmat(V) * (1.0 if self.calls < 3 else float("nan"))


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_preconditioner_nan_is_reported_as_its_own(method: str) -> None:
    A = symmetric(torch.logspace(0, 2, 20))
    with pytest.raises(ValueError, match="a product with preconditioner contains NaN"):
        solve(A, rhs(20), method=method, assume_psd=True, preconditioner=Poisoned(jacobi(A), psd=True))


class Recording(Dense):
    """A dense SPD preconditioner that records the dtype of every vector it is given."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__(A, psd=True)
        self.seen: set[torch.dtype] = set()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.seen.add(V.dtype)
        return super()._matmat(V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("where", ["operator", "float32"])
def test_half_precision_with_preconditioner(dtype: torch.dtype, method: str, where: str) -> None:
    """A half-precision operator with the scaling preconditioner D⁻¹ in its own dtype or in float32 (the working
    dtype): each gets vectors in its dtype; converged holds in float64 for the returned x, and a tol below the
    rounding warns. Measured (κ(A) ≈ 100, P = 40): CG 18 -> 4 iterations at tol = 0.1, MINRES 65 -> 12 (bfloat16);
    at tol = 1e-2 both preconditioned solves converge where the plain bfloat16 ones cannot."""
    A, d = scaled_system("spd" if method == "cg" else "indefinite", size=40, spread=2.0)
    A = ((A.to(dtype).double() + A.to(dtype).double().T) / 2).to(dtype)  # symmetric bit for bit
    b = rhs(40, seed=3).to(dtype)
    M = Recording(torch.diag(1 / d).to(dtype if where == "operator" else torch.float32))
    plain = solve(A, b, method=method, tol=0.1, assume_psd=True)
    result = solve(A, b, method=method, tol=0.1, assume_psd=True, preconditioner=M)
    assert result.converged and result.x.dtype == dtype
    assert true_rel_residual(A, result.x, b) <= 0.1
    assert 3 * result.iterations <= plain.iterations
    assert M.seen == {M.dtype}
    assert result.num_preconditioner_applications == result.iterations + 1
    finer = solve(A, b, method=method, tol=1e-2, assume_psd=True, preconditioner=M)
    assert finer.converged and true_rel_residual(A, finer.x, b) <= 1e-2
    name = str(dtype).replace("torch.", "")
    with pytest.warns(RuntimeWarning, match=f"tol=0.0001 is below what {name} products can certify"):
        tight = solve(A, b, method=method, tol=1e-4, assume_psd=True, preconditioner=M)
    assert not tight.converged and tight.num_matvecs > tight.iterations
    assert tight.residual_norm == pytest.approx(float((b.double() - A.double() @ tight.x.double()).norm()), rel=1e-4)


def test_preconditioned_minres_tracks_the_true_residual_vector() -> None:
    # Preconditioned MINRES minimizes √(rᵀ M r), so |φ̄| is not ‖b − A x‖; it updates the residual vector
    # r_k = s_k² r_{k-1} − (φ_k / γ_k) w alongside x (no extra product) for the stopping test. That vector is
    # b − A x_k at every step, to rounding, also where its norm alone could not tell (a sign error in the w term
    # leaves ‖r_k‖ nearly unchanged).
    A, d = scaled_system("indefinite")
    b = rhs(60, seed=7)
    from curvature.linalg._operand import Operand
    from curvature.linalg._preconditioner import Preconditioner

    operand = Operand(A, deferred=True)
    M = Preconditioner(torch.diag(1 / d), operand)
    y = M @ b
    state = solve_module._MinresState(operand, b.clone(), float(torch.dot(b, y).sqrt()), 0.0, 0.0, M, y)
    ratios = []
    for _ in range(40):
        state.step()
        true = b - A @ state.z
        assert float((state.r - true).norm()) <= 1e-10 * float(true.norm()) + 1e-13 * float(b.norm())
        assert float(state.r_norm) == pytest.approx(float(true.norm()), rel=1e-8)
        ratios.append(float(true.norm()) / float(state.phi_bar.abs()))
    assert min(ratios) > 3  # the M-norm that φ̄ measures is not the 2-norm here (measured: 5.7 to 44)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_preconditioned_solve_is_scale_invariant(method: str) -> None:
    # A → s A with M → M / s changes nothing but the scale of x (here s = 1e-30, ‖M‖ ≈ 1e30): no test of
    # either solver may compare quantities of different scales (MINRES's size test measures x − x0 in the
    # M⁻¹-norm, estimated by ‖x − x0‖ / √‖M‖).
    A, d = scaled_system("spd" if method == "cg" else "indefinite")
    b = rhs(60, seed=7)
    M = torch.diag(1 / d)
    base = solve(A, b, method=method, tol=1e-10, assume_psd=True, preconditioner=M)
    scaled = solve(1e-30 * A, b, method=method, tol=1e-10, assume_psd=True, preconditioner=1e30 * M)
    assert base.converged and scaled.converged
    assert scaled.iterations == base.iterations
    assert rel_err(1e-30 * scaled.x, base.x) <= 1e-8
