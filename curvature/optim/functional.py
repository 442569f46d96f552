r"""The update rules of the curvature-aware optimizers as plain functions on an operator and a gradient.

Each function takes a symmetric curvature operator ``B`` (anything with ``@``, ``.shape``, ``.dtype`` and
``.device``: a :class:`~curvature.HessianOperator`, a GGN, a damped expression of them, or a dense tensor)
and a flat gradient ``g`` of shape ``(P,)``, and returns the step as a small frozen dataclass with the
products it spent. They neither see a model nor move parameters, so research code can use them on any
problem (the optimizers in :mod:`curvature.optim` are thin wrappers that evaluate a closure and call them):

* :func:`hessian_free_step`: truncated Newton-CG on the damped system :math:`(B + \lambda I) d = -g`
  (Martens 2010), warm-started, stopping at negative curvature.
* :func:`saddle_free_newton_step`: :math:`d = -V\,(|T| + \delta I)^{-1} V^\top g` in the Krylov space of
  :math:`B` and :math:`g` (Dauphin et al. 2014).
* :func:`natural_gradient_step`: :math:`d = -\nu P g` with a preconditioner :math:`P \approx (F + \lambda I)^{-1}`
  (K-FAC's damped inverse, Martens & Grosse 2015) and the KL-clipping factor :math:`\nu` (Ba, Grosse & Martens
  2017).
* :func:`regularized_newton_step`: :math:`d = -(B + \lambda I)^{-1} g` with the gradient regularization
  :math:`\lambda = \|g\| / \gamma` (Semenov, Jaggi & Doikov 2025), together with the acceptance test
  :func:`regularized_newton_accepts` and the damping rule :func:`levenberg_marquardt_damping`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._checks import check_count, check_scalar
from ..linalg import Operand, PrecisionWarning, lanczos, solve

__all__ = [
    "NaturalGradientStep",
    "NewtonStep",
    "SaddleFreeStep",
    "forcing_tolerance",
    "hessian_free_step",
    "levenberg_marquardt_damping",
    "loss_rounding",
    "natural_gradient_step",
    "quadratic_model",
    "regularized_newton_accepts",
    "regularized_newton_step",
    "saddle_free_newton_step",
]


@dataclass(frozen=True)
class NewtonStep:
    r"""A (damped, truncated) Newton step :math:`d \approx -(B + \lambda I)^{-1} g`.

    Attributes:
        direction: The step ``d``, shape ``(P,)``.
        curvature_product: :math:`B d`, shape ``(P,)``, for the quadratic model
            :math:`m(d) = g^\top d + \tfrac12 d^\top B d` (see :func:`quadratic_model`).
        num_matvecs: Products with ``B`` spent: CG's iterations, one for a warm start, one for ``B d``.
        iterations: CG iterations.
        converged: True when CG met its relative residual tolerance.
        negative_curvature: True when CG met a direction of non-positive curvature of :math:`B + \lambda I`
            and stopped there (only possible for an indefinite ``B``, such as a Hessian away from a minimum).
        fallback: True when CG produced no descent direction (negative curvature at its first iteration, or a
            warm start that is not a descent direction and could not be improved) and the step is the
            steepest-descent step :math:`-g / \lambda` of the damped model instead.
    """

    direction: torch.Tensor
    curvature_product: torch.Tensor
    num_matvecs: int
    iterations: int
    converged: bool
    negative_curvature: bool
    fallback: bool = False


@dataclass(frozen=True)
class SaddleFreeStep:
    r"""A saddle-free Newton step :math:`d = -V (|T| + \delta I)^{-1} V^\top g` in a Krylov space.

    Attributes:
        direction: The step ``d``, shape ``(P,)``.
        ritz_values: The eigenvalues of :math:`T = V^\top B V`, ascending (float64, on the CPU): the
            curvature the step saw; negative ones were turned into repelling directions.
        predicted_change: :math:`g^\top d + \tfrac12 d^\top V |T| V^\top d`, the change of the saddle-free
            model (negative unless ``g`` is zero).
        num_matvecs: Products with ``B`` spent (the Lanczos steps).
    """

    direction: torch.Tensor
    ritz_values: torch.Tensor
    predicted_change: float
    num_matvecs: int


@dataclass(frozen=True)
class NaturalGradientStep:
    r"""A preconditioned (natural-gradient) step with KL clipping: :math:`d = -\nu \Delta`, :math:`\Delta = P g`.

    Attributes:
        direction: :math:`d = -\nu \Delta`, shape ``(P,)``; the parameters move by :math:`\eta d`.
        natural_gradient: :math:`\Delta = P g`, shape ``(P,)``.
        scale: :math:`\nu \in (0, 1]` (1 without clipping or when the bound holds already).
        kl_estimate: :math:`\sum_i \eta_i^2 \Delta_i g_i`, the quadratic estimate :math:`(\eta \Delta)^\top
            (F + \lambda I) (\eta \Delta)` of the unclipped step (twice its KL divergence, to second order), when
            :math:`P = (F + \lambda I)^{-1}`; after clipping, :math:`\nu^2` times it is at most ``kl_clip``.
        num_matvecs: Products with :math:`P` (one).
    """

    direction: torch.Tensor
    natural_gradient: torch.Tensor
    scale: float
    kl_estimate: float
    num_matvecs: int


class _Shifted:
    """``B + shift * I`` for any operator ``B`` with ``@`` (also a dense tensor): what CG solves with."""

    def __init__(self, operand: Operand, shift: float) -> None:
        self.operand, self.shift = operand, shift
        self.shape = (operand.size, operand.size)
        self.dtype, self.device = operand.dtype, operand.device
        self.is_symmetric = True
        self.is_psd = operand.is_psd and shift >= 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.operand @ v + self.shift * v


def _non_negative(value: Any, name: str) -> float:
    value = check_scalar(value, name)
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}.")
    return value


def _shifted_cg(operand: Operand, grad: torch.Tensor, shift: float, x0: Optional[torch.Tensor],
                tol: Optional[float], max_iter: Optional[int], preconditioner: Any = None) -> Any:
    """CG on ``(B + shift I) d = -g`` to the given or the forcing tolerance, stopping at negative curvature.

    An inexact solve is part of a truncated Newton method, not a failure: a tolerance below what the products can
    certify (near a stationary point the forcing tolerance asks for a residual at the rounding of the gradient)
    is reported in the step's ``converged`` flag, without a :class:`~curvature.linalg.PrecisionWarning`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        return solve(_Shifted(operand, shift), -grad, method="cg", tol=forcing_tolerance(float(grad.norm()), tol),
                     max_iter=max_iter, x0=x0, assume_psd=True, preconditioner=preconditioner)


def forcing_tolerance(grad_norm: float, tol: Optional[float] = None) -> float:
    r"""The relative residual tolerance of an inexact Newton solve.

    With ``tol`` None it is the forcing sequence :math:`\eta = \min(\tfrac12, \sqrt{\|g\|})` of truncated
    Newton methods (Nocedal & Wright 2006, "Numerical Optimization", Algorithm 7.1; Eisenstat & Walker 1996):
    loose far from a stationary point, tight near one, which gives superlinear local convergence without
    wasting products early. A given ``tol`` is used as is.

    Args:
        grad_norm: :math:`\|g\|`.
        tol: A fixed relative tolerance, or None for the forcing sequence.

    Returns:
        The relative residual tolerance, positive.

    Example:
        >>> forcing_tolerance(1e-6)
        0.001
    """
    if tol is not None:
        return tol
    return max(min(0.5, math.sqrt(grad_norm)), torch.finfo(torch.float64).eps)


def quadratic_model(grad: torch.Tensor, direction: torch.Tensor, curvature_product: torch.Tensor,
                    scale: float = 1.0) -> float:
    r"""The change :math:`m(\alpha d) = \alpha\, g^\top d + \tfrac12 \alpha^2 d^\top B d` of a quadratic model.

    Args:
        grad: The gradient ``g``.
        direction: The step ``d``.
        curvature_product: :math:`B d`.
        scale: The step length :math:`\alpha`.

    Returns:
        The predicted change of the objective (negative for a descent step on a convex model).

    Example:
        >>> g, d = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
        >>> quadratic_model(g, d, torch.tensor([-1.0, 0.0]))  # B = I: -1 + 1/2
        -0.5
    """
    gd = float(torch.dot(grad, direction))
    dbd = float(torch.dot(direction, curvature_product))
    return scale * gd + 0.5 * scale**2 * dbd


def hessian_free_step(
    curvature: Any,
    grad: torch.Tensor,
    damping: float,
    *,
    x0: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    preconditioner: Any = None,
) -> NewtonStep:
    r"""Truncated Newton-CG step on the damped system :math:`(B + \lambda I)\, d = -g` (Hessian-free).

    Conjugate gradients on the Levenberg-Marquardt-damped curvature, run until the relative residual meets
    ``tol`` (the forcing sequence :func:`forcing_tolerance` by default) or ``max_iter`` iterations (Martens
    2010, "Deep learning via Hessian-free optimization", ICML; Nocedal & Wright 2006, Algorithm 7.1). CG
    minimizes the damped quadratic model over growing Krylov spaces, so every iterate from ``x0 = 0`` is a
    descent direction. On an indefinite ``B`` (a Hessian), CG stops at the first direction of non-positive
    curvature and returns the iterate before it. When that leaves no descent direction (negative curvature
    at the first iteration, or a warm start :math:`x_0` with :math:`g^\top x_0 \ge 0`), the step falls back
    to :math:`-g/\lambda`, the limit of the damped step for large :math:`\lambda`.

    Cost: one product per CG iteration, one for a warm start's residual, and one for :math:`B d` (returned
    for the reduction ratio of the damping rule).

    Args:
        curvature: The symmetric curvature ``B`` (positive semi-definite or not).
        grad: The gradient ``g``, shape ``(P,)``.
        damping: :math:`\lambda \ge 0`.
        x0: A warm start for CG, e.g. the previous step times 0.95 (Martens 2010, Section 4.5).
        tol: Relative residual tolerance; None for the forcing sequence :math:`\min(\tfrac12, \sqrt{\|g\|})`.
        max_iter: Cap on CG iterations; None for :math:`10 P`.
        preconditioner: An SPD operator :math:`M \approx (B + \lambda I)^{-1}` for preconditioned CG, e.g. the
            damped K-FAC inverse ``curvature.KFACOperator(...).inverse(damping)`` (:func:`curvature.solve`).

    Returns:
        A :class:`NewtonStep`.

    Raises:
        TypeError, ValueError: On an operator or vector that does not fit, or a negative damping.

    Example:
        >>> B = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> g = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> hessian_free_step(B, g, damping=0.0, tol=1e-12).direction.round(decimals=12).tolist()
        [-1.0, -0.5]
    """
    operand = Operand(curvature, "curvature")
    grad = operand.check_vector(grad, "grad")
    damping = _non_negative(damping, "damping")
    result = _shifted_cg(operand, grad, damping, x0, tol, max_iter, preconditioner)
    direction, fallback = result.x, False
    if float(grad.norm()) > 0 and not float(torch.dot(grad, direction)) < 0:
        if damping == 0:
            raise ValueError(
                "CG found no descent direction (negative curvature at the first iteration) and damping=0 leaves "
                "no fallback step; use a positive damping."
            )
        direction, fallback = -grad / damping, True
    product = operand @ direction
    return NewtonStep(
        direction=direction,
        curvature_product=product,
        num_matvecs=operand.num_matvecs,
        iterations=result.iterations,
        converged=result.converged and not fallback,
        negative_curvature=result.negative_curvature,
        fallback=fallback,
    )


def levenberg_marquardt_damping(damping: float, ratio: float, increase: float = 1.5,
                                decrease: float = 2.0 / 3.0, minimum: float = 0.0) -> float:
    r"""Martens' Levenberg-Marquardt rule: adapt the damping to the reduction ratio.

    .. math::

        \rho = \frac{f(\theta + d) - f(\theta)}{m(d)}, \qquad
        \lambda \leftarrow \begin{cases} \text{increase} \cdot \lambda & \rho < \tfrac14 \\
        \text{decrease} \cdot \lambda & \rho > \tfrac34 \\ \lambda & \text{otherwise} \end{cases}

    where :math:`m(d) = g^\top d + \tfrac12 d^\top B d` is the undamped quadratic model (Martens 2010,
    Section 4.1; Moré 1978). A NaN ratio (a non-finite loss at the trial point) counts as :math:`\rho < 1/4`.

    Args:
        damping: The current :math:`\lambda`.
        ratio: :math:`\rho`.
        increase: Factor above 1 for a poor model fit.
        decrease: Factor below 1 for a good fit.
        minimum: A floor for the result.

    Returns:
        The new damping.

    Example:
        >>> levenberg_marquardt_damping(1.0, ratio=0.1), levenberg_marquardt_damping(1.0, ratio=0.9)
        (1.5, 0.6666666666666666)
    """
    if ratio > 0.75:
        damping = damping * decrease
    elif not ratio >= 0.25:
        damping = damping * increase
    return max(damping, minimum)


def saddle_free_newton_step(
    curvature: Any,
    grad: torch.Tensor,
    num_steps: int = 20,
    damping: float = 0.0,
) -> SaddleFreeStep:
    r"""Saddle-free Newton step in the Krylov space of the curvature and the gradient.

    Lanczos from :math:`g` builds an orthonormal basis :math:`V` of
    :math:`\mathcal{K}_k(B, g) = \operatorname{span}\{g, Bg, \dots, B^{k-1} g\}` and
    :math:`T = V^\top B V = U \Theta U^\top`. The step replaces every eigenvalue by its absolute value:

    .. math:: d = -V\, U \big(|\Theta| + \delta I\big)^{-1} U^\top V^\top g

    so along directions of negative curvature it moves *downhill* away from a saddle, where Newton's step
    :math:`-B^{-1} g` would move towards it, while it keeps Newton's scaling along positive curvature
    (Dauphin, Pascanu, Gulcehre, Cho, Ganguli & Bengio 2014, "Identifying and attacking the saddle point
    problem in high-dimensional non-convex optimization", NeurIPS, arXiv:1406.2572, Algorithm 1; the
    Krylov subspace follows Vinyals & Povey 2012). :math:`d` is a descent direction whenever
    :math:`\delta > 0` or no Ritz value is zero. Since the space contains :math:`g`, the step is at least as
    good as a steepest-descent step scaled by the local curvature.

    Cost: ``num_steps`` products (fewer when the Krylov space becomes invariant), ``P * num_steps`` memory
    for the basis and :math:`O(P k^2)` flops for full reorthogonalization.

    Args:
        curvature: The symmetric curvature ``B`` (typically the Hessian).
        grad: The gradient ``g``, shape ``(P,)``.
        num_steps: The Krylov dimension ``k`` (capped at ``P``).
        damping: :math:`\delta \ge 0`, added to the absolute Ritz values; keeps the step finite where the
            curvature along some direction is (nearly) zero.

    Returns:
        A :class:`SaddleFreeStep`; a zero step without products when ``g = 0``.

    Raises:
        TypeError, ValueError: On an operator or vector that does not fit, a bad ``num_steps`` or a negative
            damping; ValueError also when a Ritz value is exactly zero and ``damping`` is zero.

    Example:
        >>> B = torch.diag(torch.tensor([2.0, -2.0], dtype=torch.float64))  # a saddle
        >>> g = torch.tensor([2.0, -0.2], dtype=torch.float64)  # at (1, 0.1)
        >>> saddle_free_newton_step(B, g, num_steps=2).direction.round(decimals=12).tolist()
        [-1.0, 0.1]
    """
    operand = Operand(curvature, "curvature")
    grad = operand.check_vector(grad, "grad")
    check_count(num_steps, "num_steps")
    damping = _non_negative(damping, "damping")
    empty = torch.zeros(0, dtype=torch.float64)
    if float(grad.norm()) == 0.0:
        return SaddleFreeStep(direction=torch.zeros_like(grad), ritz_values=empty, predicted_change=0.0,
                              num_matvecs=0)
    run = lanczos(curvature, min(num_steps, operand.size), v0=grad)
    basis = run.basis
    theta, U = torch.linalg.eigh(run.tridiagonal())
    magnitude = theta.abs() + damping
    if bool((magnitude == 0).any()):
        raise ValueError("a Ritz value is exactly zero and damping=0 makes the step infinite; use damping > 0.")
    # The small k×k problem lives on the CPU in float64 (as Lanczos' T does); Vᵀg = ‖g‖ e₁ up to rounding.
    coeffs = U.T @ (basis.T @ grad).to(device=U.device, dtype=torch.float64)
    scaled = coeffs / magnitude
    direction = -(basis @ (U @ scaled).to(device=basis.device, dtype=basis.dtype))
    change = float(-(coeffs * scaled).sum() + 0.5 * ((scaled**2) * theta.abs()).sum())
    return SaddleFreeStep(direction=direction, ritz_values=theta, predicted_change=change,
                          num_matvecs=run.num_matvecs)


def regularized_newton_step(
    curvature: Any,
    grad: torch.Tensor,
    gamma: float,
    *,
    x0: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    preconditioner: Any = None,
) -> NewtonStep:
    r"""Gradient-regularized Newton step :math:`d = -(B + \lambda I)^{-1} g` with :math:`\lambda = \|g\|/\gamma`.

    The regularization shrinks with the gradient, so far from a solution the step is a short, gradient-like
    step and near one it becomes Newton's step, with fast local convergence (Semenov, Jaggi & Doikov 2025,
    "Gradient-Normalized Smoothness for Optimization with Approximate Hessians", arXiv:2506.13710,
    Algorithm 1). :math:`B` may be the Hessian or an approximation (GGN, Fisher, empirical Fisher). The
    choice :math:`\gamma = \sqrt{\|g\|/L}` gives :math:`\lambda = \sqrt{L \|g\|}`, the regularization of
    Mishchenko 2023 ("Regularized Newton method with global O(1/k²) convergence", SIAM J. Optim.) and
    Doikov, Mishchenko & Nesterov 2024 for a Hessian with Lipschitz constant :math:`L`.

    The system is solved by CG (a Hessian that is indefinite is allowed: CG then stops at negative curvature,
    ``negative_curvature`` is set, and the caller should increase :math:`\lambda`). Accept the step with
    :func:`regularized_newton_accepts`.

    Cost: as :func:`hessian_free_step`.

    Args:
        curvature: The symmetric curvature ``B``.
        grad: The gradient ``g``, shape ``(P,)``.
        gamma: :math:`\gamma > 0`; larger means closer to Newton's step.
        x0: A warm start for CG.
        tol: Relative residual tolerance; None for the forcing sequence :math:`\min(\tfrac12, \sqrt{\|g\|})`.
        max_iter: Cap on CG iterations; None for :math:`10 P`.
        preconditioner: An SPD operator :math:`M \approx (B + \lambda I)^{-1}` for preconditioned CG.

    Returns:
        A :class:`NewtonStep` (``fallback`` is always False; ``negative_curvature`` says the step is not to be
        trusted).

    Raises:
        TypeError, ValueError: On an operator or vector that does not fit or a non-positive ``gamma``.

    Example:
        >>> B = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> g = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ‖g‖ = 5, so λ = 5 / γ = 1
        >>> regularized_newton_step(B, g, gamma=5.0, tol=1e-12).direction.tolist()
        [-1.5, -0.8]
    """
    operand = Operand(curvature, "curvature")
    grad = operand.check_vector(grad, "grad")
    gamma = check_scalar(gamma, "gamma")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    result = _shifted_cg(operand, grad, float(grad.norm()) / gamma, x0, tol, max_iter, preconditioner)
    product = operand @ result.x
    return NewtonStep(
        direction=result.x,
        curvature_product=product,
        num_matvecs=operand.num_matvecs,
        iterations=result.iterations,
        converged=result.converged,
        negative_curvature=result.negative_curvature,
    )


def regularized_newton_accepts(loss: float, trial_loss: float, trial_grad_norm: float,
                               regularization: float, slack: float = 0.0) -> bool:
    r"""The acceptance test of the gradient-regularized Newton method.

    .. math:: f(x) - f(x + d) \ge \frac{\|\nabla f(x + d)\|^2}{8 \lambda}

    (Semenov, Jaggi & Doikov 2025, Algorithm 1): on success :math:`\gamma` doubles, otherwise it halves and the
    step is recomputed. A non-finite trial loss or gradient fails the test. ``slack`` relaxes the test by the
    rounding error of the loss: at a minimum, where both sides are at rounding level, a change of a few
    units in the last place of :math:`f` must not count as a failure (the optimizers pass
    :func:`loss_rounding`).

    Args:
        loss: :math:`f(x)`.
        trial_loss: :math:`f(x + d)`.
        trial_grad_norm: :math:`\|\nabla f(x + d)\|`.
        regularization: :math:`\lambda > 0`.
        slack: A non-negative allowance for the rounding error of the two loss values.

    Returns:
        True when the step is accepted.

    Example:
        >>> regularized_newton_accepts(1.0, 0.5, trial_grad_norm=1.0, regularization=1.0)
        True
    """
    if not (math.isfinite(trial_loss) and math.isfinite(trial_grad_norm)):
        return False
    return loss - trial_loss + slack >= trial_grad_norm**2 / (8.0 * regularization)


def loss_rounding(loss: float, dtype: torch.dtype) -> float:
    r"""An allowance for the rounding error of a loss value: :math:`16\, \varepsilon\, |f|`.

    A loss summed or averaged over a batch carries a rounding error of a few units in its last place; near a
    minimum the true changes of :math:`f` fall below it, and sufficient-decrease tests (Armijo, the
    acceptance test of :func:`regularized_newton_accepts`) would reject every step on rounding noise alone.

    Args:
        loss: The loss value :math:`f`.
        dtype: The dtype it was computed in.

    Returns:
        :math:`16\, \varepsilon_{\text{dtype}} |f|`.

    Example:
        >>> loss_rounding(1.0, torch.float64)
        3.552713678800501e-15
    """
    return 16.0 * torch.finfo(dtype).eps * abs(loss)


def natural_gradient_step(
    preconditioner: Any,
    grad: torch.Tensor,
    lr: Any = 1.0,
    kl_clip: Optional[float] = None,
) -> NaturalGradientStep:
    r"""The natural-gradient step of K-FAC, with the KL clipping of Ba, Grosse & Martens (2017).

    .. math::
        \Delta = P g, \qquad
        \nu = \min\Big(1, \sqrt{\kappa \big/ \textstyle\sum_i \eta_i^2 \Delta_i g_i}\Big), \qquad
        d = -\nu \Delta

    and the parameters move by :math:`\eta d`. :math:`P` is the damped inverse of a Fisher-type curvature, e.g.
    ``KFACOperator(...).inverse(damping)`` (Martens & Grosse 2015, "Optimizing Neural Networks with
    Kronecker-factored Approximate Curvature", ICML), so that :math:`\sum_i \eta_i^2 \Delta_i g_i =
    (\eta\Delta)^\top (F + \lambda I)(\eta\Delta)` is the step's quadratic KL estimate; the clipping scales
    the step so that it is at most :math:`\kappa` (Ba, Grosse & Martens 2017, "Distributed Second-Order
    Optimization using Kronecker-Factored Approximations", ICLR, Sec. 5). This is the update rule of
    :class:`curvature.optim.KFAC` before SGD's weight decay and momentum.

    Cost: one product with :math:`P`.

    Args:
        preconditioner: The symmetric positive definite :math:`P` (anything with ``@``, or a dense tensor).
        grad: The gradient ``g``, shape ``(P,)``.
        lr: The step size :math:`\eta > 0`, a float, or a ``(P,)`` tensor of per-entry step sizes (parameter
            groups with their own); it enters only the clipping.
        kl_clip: :math:`\kappa > 0`, or None for no clipping.

    Returns:
        A :class:`NaturalGradientStep`.

    Raises:
        TypeError, ValueError: On an operator or vector that does not fit, a non-positive ``lr`` or ``kl_clip``,
            or a natural gradient that is not finite.

    Example:
        >>> P = torch.diag(torch.tensor([1.0, 0.25], dtype=torch.float64))   # (F + λI)⁻¹ with F + λI = diag(1, 4)
        >>> g = torch.tensor([2.0, 4.0], dtype=torch.float64)
        >>> step = natural_gradient_step(P, g, lr=0.5, kl_clip=0.5)        # η² Δᵀg = 0.25 · 8 = 2 > 0.5
        >>> step.scale, step.direction.tolist()
        (0.5, [-1.0, -0.5])
    """
    operand = Operand(preconditioner, "preconditioner")
    grad = operand.check_vector(grad, "grad")
    if isinstance(lr, torch.Tensor):
        lr = operand.check_vector(lr, "lr")
        if not bool((lr > 0).all()):
            raise ValueError("lr must be positive in every entry.")
        squared = lr.square()
    else:
        if not check_scalar(lr, "lr") > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        squared = float(lr) ** 2
    if kl_clip is not None and not check_scalar(kl_clip, "kl_clip") > 0:
        raise ValueError(f"kl_clip must be positive or None, got {kl_clip}.")
    natural = operand @ grad
    kl_estimate = float((squared * natural * grad).sum())
    if not math.isfinite(kl_estimate):
        raise ValueError("the natural gradient is not finite; check the gradient and raise the damping.")
    scale = 1.0
    if kl_clip is not None and kl_estimate > kl_clip:
        scale = math.sqrt(kl_clip / kl_estimate)
    return NaturalGradientStep(direction=-scale * natural, natural_gradient=natural, scale=scale,
                               kl_estimate=kl_estimate, num_matvecs=operand.num_matvecs)
