"""The update rules of curvature.optim.functional against dense float64 solves, on the registry and by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import build, reference, rel_err

import curvature
from curvature.optim import functional as F

F64 = torch.float64


def symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q, made exactly symmetric."""
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    A = Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T
    return (A + A.T) / 2


def vector(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def absolute(A: torch.Tensor) -> torch.Tensor:
    """|A| = U |Λ| Uᵀ."""
    values, U = torch.linalg.eigh(A)
    return U @ torch.diag(values.abs()) @ U.T


# -- registry: operator products against the dense float64 reference ---------------------------------------
#
# A relative residual of 1e-13 bounds the error by κ · 1e-13; the damping below keeps κ(B + λI) under 1e3.


def test_hessian_free_step_on_damped_ggn_matches_dense_solve(case_name: str) -> None:
    G, dense = build("ggn", case_name), reference("ggn", case_name)
    g = vector(G.shape[0])
    damping = 1e-3 * float(torch.linalg.eigvalsh(dense)[-1]) + 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvature.PrecisionWarning)  # an inner solve reports, it does not warn
        step = F.hessian_free_step(G, g, damping, tol=1e-13)
    damped = dense + damping * torch.eye(len(g), dtype=F64)
    truth = torch.linalg.solve(damped, -g)
    assert rel_err(step.direction, truth) < 1e-9
    assert rel_err(step.curvature_product, dense @ step.direction) < 1e-10
    assert not step.negative_curvature and not step.fallback
    # One product for the curvature product, and one more where CG cannot vouch for tol = 1e-13 by its
    # recurrence (ε ‖A‖ ‖x‖ above 1% of it) and computes the residual of x afresh (curvature.solve). With
    # κ up to 1e3, 1e-13 is below ε κ: converged may then be False, but when it is True it holds.
    assert step.iterations + 1 <= step.num_matvecs <= step.iterations + 2
    residual = float((damped @ step.direction + g).norm() / g.norm())
    assert not step.converged or residual <= 1e-13 + 64 * torch.finfo(F64).eps * float(
        torch.linalg.matrix_norm(damped, 2) * step.direction.norm() / g.norm())


def test_regularized_newton_step_on_hessian_matches_dense_solve(case_name: str) -> None:
    H, dense = build("hessian", case_name), reference("hessian", case_name)
    g = vector(H.shape[0])
    values = torch.linalg.eigvalsh(dense)
    shift = max(0.0, -float(values[0])) + 1e-2 * float(values.abs().max())  # makes H + λI positive definite
    gamma = float(g.norm()) / shift
    step = F.regularized_newton_step(H, g, gamma, tol=1e-13)
    truth = torch.linalg.solve(dense + shift * torch.eye(len(g), dtype=F64), -g)
    assert rel_err(step.direction, truth) < 1e-9
    assert step.converged and not step.negative_curvature


def test_saddle_free_step_with_full_krylov_space_matches_dense_absolute_hessian(case_name: str) -> None:
    H, dense = build("hessian", case_name), reference("hessian", case_name)
    g = vector(H.shape[0])
    damping = 0.1 * float(torch.linalg.eigvalsh(dense).abs().max())
    step = F.saddle_free_newton_step(H, g, num_steps=H.shape[0], damping=damping)
    truth = -torch.linalg.solve(absolute(dense) + damping * torch.eye(len(g), dtype=F64), g)
    assert rel_err(step.direction, truth) < 1e-9
    model = float(g @ step.direction) + 0.5 * float(step.direction @ absolute(dense) @ step.direction)
    assert step.predicted_change == pytest.approx(model, rel=1e-8)
    assert step.num_matvecs <= H.shape[0]


def test_float32_hessian_free_step_agrees_with_float64() -> None:
    G32, dense = build("ggn", "mlp_tanh_ce_mean", torch.float32), reference("ggn", "mlp_tanh_ce_mean")
    g = vector(G32.shape[0])
    damping = 1e-2 * float(torch.linalg.eigvalsh(dense)[-1])
    step = F.hessian_free_step(G32, g.float(), damping, tol=1e-6)
    truth = torch.linalg.solve(dense + damping * torch.eye(len(g), dtype=F64), -g)
    assert step.direction.dtype == torch.float32
    assert rel_err(step.direction, truth) < 1e-4  # κ ≈ 100 times the tolerance 1e-6


# -- dense cases ------------------------------------------------------------------------------------------


def test_saddle_free_step_repels_from_negative_curvature() -> None:
    A = symmetric([-3.0, -0.5, 1.0, 4.0])
    g = vector(4)
    newton = -torch.linalg.solve(A, g)
    step = F.saddle_free_newton_step(A, g, num_steps=4)
    values, U = torch.linalg.eigh(A)
    # Along each eigenvector the saddle-free step is Newton's with the sign of negative directions flipped.
    ratio = (U.T @ step.direction) / (U.T @ newton)
    assert torch.allclose(ratio, torch.sign(values), atol=1e-12)
    assert float(g @ step.direction) < 0  # a descent direction, where Newton's is not
    assert step.predicted_change < 0
    assert torch.allclose(step.ritz_values, values, atol=1e-12)


def test_saddle_free_step_in_small_krylov_space_is_descent_and_in_the_space() -> None:
    A = symmetric([-2.0, -1.0, 0.5, 1.0, 3.0, 5.0, 8.0, 9.0], seed=3)
    g = vector(8, seed=4)
    step = F.saddle_free_newton_step(A, g, num_steps=3, damping=1e-3)
    K = torch.stack([g, A @ g, A @ A @ g], dim=1)  # Krylov space of dimension 3
    Q, _ = torch.linalg.qr(K)
    assert float((step.direction - Q @ (Q.T @ step.direction)).norm()) < 1e-10 * float(step.direction.norm())
    assert float(g @ step.direction) < 0
    assert step.num_matvecs == 3


def test_saddle_free_step_zero_gradient_and_zero_ritz_value() -> None:
    A = symmetric([-1.0, 2.0])
    step = F.saddle_free_newton_step(A, torch.zeros(2, dtype=F64))
    assert step.num_matvecs == 0 and torch.equal(step.direction, torch.zeros(2, dtype=F64))
    singular = torch.diag(torch.tensor([0.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="damping > 0"):
        F.saddle_free_newton_step(singular, torch.tensor([1.0, 0.0], dtype=F64), num_steps=1)
    step = F.saddle_free_newton_step(singular, torch.tensor([1.0, 0.0], dtype=F64), num_steps=1, damping=0.5)
    assert step.direction.tolist() == [-2.0, 0.0]


def test_hessian_free_step_stops_at_negative_curvature_with_a_descent_direction() -> None:
    A = symmetric([-1.0, 0.5, 2.0, 3.0, 4.0], seed=2)
    g = vector(5, seed=5)
    step = F.hessian_free_step(A, g, damping=0.0, tol=1e-12)
    assert step.negative_curvature and not step.converged
    assert float(g @ step.direction) < 0


def test_hessian_free_step_falls_back_to_scaled_gradient() -> None:
    A = torch.diag(torch.tensor([-2.0, 1.0], dtype=F64))
    g = torch.tensor([1.0, 0.0], dtype=F64)  # along the negative eigenvector: CG's first step meets it
    step = F.hessian_free_step(A, g, damping=0.5)
    assert step.fallback and step.negative_curvature and not step.converged
    assert step.direction.tolist() == [-2.0, 0.0]  # -g / λ
    with pytest.raises(ValueError, match="positive damping"):
        F.hessian_free_step(A, g, damping=0.0)


def test_hessian_free_step_warm_start_saves_iterations_and_bad_warm_start_is_dropped() -> None:
    A = symmetric([0.1 * i + 0.1 for i in range(30)], seed=6)
    g = vector(30, seed=7)
    cold = F.hessian_free_step(A, g, damping=0.0, tol=1e-10)
    warm = F.hessian_free_step(A, g, damping=0.0, tol=1e-10, x0=0.99 * cold.direction)
    assert warm.iterations < cold.iterations
    assert rel_err(warm.direction, cold.direction) < 1e-8
    uphill = F.hessian_free_step(A, g, damping=1.0, tol=0.9, max_iter=1, x0=10 * g)  # gᵀx0 > 0, one iteration
    assert float(g @ uphill.direction) < 0


def test_regularized_newton_step_flags_negative_curvature() -> None:
    A = torch.diag(torch.tensor([-2.0, 1.0], dtype=F64))
    g = torch.tensor([1.0, 1.0], dtype=F64)
    step = F.regularized_newton_step(A, g, gamma=10.0)  # λ = √2 / 10 < 2: H + λI is indefinite
    assert step.negative_curvature
    ok = F.regularized_newton_step(A, g, gamma=0.5, tol=1e-12)  # λ = 2√2 > 2
    truth = -torch.linalg.solve(A + 2 * math.sqrt(2) * torch.eye(2, dtype=F64), g)
    assert not ok.negative_curvature and rel_err(ok.direction, truth) < 1e-12


def test_forcing_tolerance_and_quadratic_model() -> None:
    assert F.forcing_tolerance(4.0) == 0.5
    assert F.forcing_tolerance(1e-4) == pytest.approx(1e-2)
    assert F.forcing_tolerance(0.0) > 0
    assert F.forcing_tolerance(1.0, tol=1e-3) == 1e-3
    g, d = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([-1.0, 0.5], dtype=F64)
    B = torch.diag(torch.tensor([2.0, 4.0], dtype=F64))
    assert F.quadratic_model(g, d, B @ d, scale=0.5) == pytest.approx(0.5 * 0.0 + 0.125 * (2.0 + 1.0))


def test_levenberg_marquardt_and_acceptance_rules() -> None:
    lm = F.levenberg_marquardt_damping
    assert lm(1.0, 0.5) == 1.0
    assert lm(1.0, 0.2) == 1.5 and lm(1.0, float("nan")) == 1.5 and lm(1.0, -3.0) == 1.5
    assert lm(1.0, 0.8) == pytest.approx(2 / 3)
    assert lm(1e-12, 0.9, minimum=1e-10) == 1e-10
    accepts = F.regularized_newton_accepts
    assert accepts(1.0, 0.5, trial_grad_norm=2.0, regularization=1.0)  # 0.5 ≥ 4/8
    assert not accepts(1.0, 0.6, trial_grad_norm=2.0, regularization=1.0)  # 0.4 < 0.5
    assert not accepts(1.0, float("nan"), trial_grad_norm=0.0, regularization=1.0)
    assert not accepts(1.0, 0.0, trial_grad_norm=float("inf"), regularization=1.0)
    # At a minimum both sides are rounding noise; the slack keeps a one-ulp rise from failing the test.
    f = 0.9862105518976426
    assert not accepts(f, f + 2.2e-16, trial_grad_norm=3e-17, regularization=3e-15)
    assert accepts(f, f + 2.2e-16, 3e-17, 3e-15, slack=F.loss_rounding(f, F64))


def test_argument_errors() -> None:
    A, g = symmetric([1.0, 2.0, 3.0]), vector(3)
    with pytest.raises(ValueError, match="shape"):
        F.hessian_free_step(A, vector(4), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        F.saddle_free_newton_step(A, g.float())
    with pytest.raises(ValueError, match="damping must be non-negative"):
        F.hessian_free_step(A, g, -1.0)
    with pytest.raises(ValueError, match="damping must be non-negative"):
        F.saddle_free_newton_step(A, g, damping=-1.0)
    with pytest.raises(ValueError, match="gamma must be positive"):
        F.regularized_newton_step(A, g, gamma=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        F.saddle_free_newton_step(A, g, num_steps=0)
    with pytest.raises(TypeError, match="curvature must support"):
        F.hessian_free_step(A.tolist(), g, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        F.regularized_newton_step(A, torch.full((3,), float("nan"), dtype=F64), gamma=1.0)
