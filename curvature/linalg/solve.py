r"""Krylov solvers for :math:`A x = b` with a symmetric operator: conjugate gradients and MINRES.

Both methods need only products ``A @ v``, one per iteration, and a few vectors of memory. CG
(Hestenes & Stiefel 1952) is the method of choice for a positive definite ``A`` (a damped GGN or Fisher,
the Newton systems of Hessian-free optimization); MINRES (Paige & Saunders 1975) handles any symmetric
``A``, indefinite or singular (a damped Hessian away from a minimum). Both stop on the relative residual
:math:`\|b - A x_k\| \le \mathrm{tol}\, \|b\|`, measured by the recurrence (no extra product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._checks import check_scalar
from ._operand import Operand, check_count

__all__ = ["SolveResult", "solve"]

_METHODS = ("cg", "minres")


@dataclass(frozen=True)
class SolveResult:
    r"""The output of :func:`solve`.

    Attributes:
        x: The approximate solution, shape ``(P,)``, in the operator's dtype and device.
        num_matvecs: Products spent: ``iterations``, plus one when ``x0`` was given (for ``b − A x0``);
            0 when ``b = 0``.
        converged: True when the relative residual :math:`\|b - A x\| \le \mathrm{tol}\, \|b\|` was
            met.
        residual_norm: The final residual norm :math:`\|b - A x\|` as tracked by the recurrence (it can
            differ from a freshly computed one by rounding, about :math:`\varepsilon \|A\| \|x\|`).
        iterations: Iterations started, each costing one product. For CG that met negative curvature the
            last iteration's product found it and ``x`` was not moved along it.
        negative_curvature: True when CG met a direction :math:`p` with :math:`p^\top A p \le 0` and
            stopped there; always False for MINRES.
    """

    x: torch.Tensor
    num_matvecs: int
    converged: bool
    residual_norm: float
    iterations: int
    negative_curvature: bool = False


def solve(
    op: Any,
    b: torch.Tensor,
    method: str = "cg",
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    x0: Optional[torch.Tensor] = None,
    assume_psd: bool = False,
) -> SolveResult:
    r"""Solve :math:`A x = b` for a symmetric operator :math:`A` by conjugate gradients or MINRES.

    **CG** (Hestenes & Stiefel 1952, "Methods of conjugate gradients for solving linear systems") minimizes
    the :math:`A`-norm of the error over :math:`x_0 + \mathcal{K}_k(A, r_0)`, with
    :math:`r_0 = b - A x_0`, :math:`p_0 = r_0` and

    .. math::

        \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k}, \quad x_{k+1} = x_k + \alpha_k p_k, \quad
        r_{k+1} = r_k - \alpha_k A p_k, \quad p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k.

    It needs :math:`A` positive definite, so it refuses an operator not flagged ``is_psd`` (a Hessian, a
    dense tensor) unless ``assume_psd=True``. When it meets a direction with :math:`p_k^\top A p_k \le 0` it
    stops and returns the current iterate :math:`x_k` (not moved along :math:`p_k`) with
    ``negative_curvature=True``, as truncated Newton methods need (Nocedal & Wright 2006, "Numerical
    Optimization", Algorithm 7.1; at the first iteration that iterate is ``x0``, zero by default).

    **MINRES** (Paige & Saunders 1975, "Solution of sparse indefinite systems of linear equations", SIAM J.
    Numer. Anal. 12) runs the Lanczos process :math:`A V_k = V_{k+1} \bar T_k` from :math:`r_0` and minimizes
    the residual over the same space,

    .. math::

        x_k = x_0 + V_k y_k, \qquad
        y_k = \operatorname*{arg\,min}_y \big\| \|r_0\| e_1 - \bar T_k y \big\|, \qquad
        \|b - A x_k\| = \min_{x \in x_0 + \mathcal{K}_k(A, r_0)} \|b - A x\|,

    updating a QR factorization of the tridiagonal :math:`\bar T_k` by one Givens rotation per step, so its
    memory stays a few vectors. It works for any symmetric :math:`A`, indefinite or singular. On a Lanczos
    breakdown (:math:`\beta_{k+1} \le 100\, \varepsilon \|A\|`, with :math:`\|A\|` estimated from
    :math:`\bar T_k`: the Krylov space is invariant to working precision) it stops with the exact
    minimizer over that space; if the reduced system is singular there too (an inconsistent system, or
    curvature zero to working precision along the last direction) it keeps the previous iterate rather
    than divide by zero, and reports the least-squares residual it reached.

    Both stop when :math:`\|r_k\| \le \mathrm{tol}\, \|b\|`, with :math:`\|r_k\|` from the recurrence.
    In exact arithmetic both terminate within :math:`P` iterations; rounding delays that, so ``max_iter``
    defaults to :math:`10 P`. The true residual cannot fall much below :math:`\varepsilon \|A\| \|x\|`
    while the recurrence's keeps shrinking, so a ``tol`` below about :math:`\varepsilon \kappa(A)` is met only
    on paper. The solve is not differentiable: ``b`` and ``x0`` are detached.

    Cost: one product per iteration, plus one for :math:`b - A x_0` when ``x0`` is given; none when
    ``b = 0`` (the solution is 0). Memory: about six vectors of size :math:`P`.

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator,
            a :class:`~curvature.LinearOperator` such as ``G.damped(1e-2)``, or a dense symmetric tensor.
        b: The right-hand side, shape ``(P,)``, in the operator's dtype and device.
        method: ``"cg"`` (positive definite ``A``) or ``"minres"`` (any symmetric ``A``).
        tol: Relative residual tolerance, positive.
        max_iter: Most iterations (products, not counting the one for ``x0``); None means :math:`10 P`.
        x0: Initial guess ``(P,)`` (a warm start); None starts from zero.
        assume_psd: Let CG run on an operator not flagged ``is_psd`` (a dense tensor, or a Hessian damped
            enough to be positive definite); the caller vouches for it.

    Returns:
        A :class:`SolveResult`.

    Raises:
        TypeError: If ``op`` is not an operator, or ``b``, ``x0``, ``tol`` or ``max_iter`` have the wrong
            type or dtype.
        ValueError: If ``method`` is unknown, ``tol`` is not positive and finite, ``max_iter`` is below 1,
            ``b`` or ``x0`` have the wrong shape or device or are not finite, ``op`` is not symmetric, or CG
            is asked to solve with an operator not known to be PSD.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> result = solve(A, b, tol=1e-12, assume_psd=True)
        >>> result.converged, result.num_matvecs
        (True, 2)
        >>> torch.allclose(A @ result.x, b)
        True
        >>> D = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))  # indefinite: MINRES
        >>> solve(D, torch.tensor([2.0, 1.0], dtype=torch.float64), method="minres").x.round(decimals=12).tolist()
        [1.0, -1.0]
    """
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    operand = Operand(op)
    b = operand.check_vector(b, "b").detach()
    tol = check_scalar(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be positive (a relative residual such as 1e-6), got {tol}.")
    max_iter = 10 * operand.size if max_iter is None else check_count(max_iter, "max_iter")
    if x0 is not None:
        x0 = operand.check_vector(x0, "x0").detach()
    if not isinstance(assume_psd, bool):
        raise TypeError(f"assume_psd must be a bool, got {type(assume_psd).__name__}.")
    if method == "cg" and not operand.is_psd and not assume_psd:
        raise ValueError(
            "method='cg' needs a positive definite operator, and op is not known to be PSD (a Hessian, a "
            "GGN of a loss not known to be convex, or a dense tensor); pass assume_psd=True if it is (e.g. a "
            "Hessian damped enough), or use method='minres' for a symmetric indefinite operator."
        )

    b_norm = float(b.norm())
    if b_norm == 0.0:  # A x = 0 is solved by x = 0 whatever A is; no product needed
        return SolveResult(x=torch.zeros_like(b), num_matvecs=0, converged=True, residual_norm=0.0, iterations=0)
    threshold = tol * b_norm
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x, r = x0.clone(), b - operand @ x0
    run = _cg if method == "cg" else _minres
    return run(operand, x, r, threshold, max_iter)


def _cg(operand: Operand, x: torch.Tensor, r: torch.Tensor, threshold: float, max_iter: int) -> SolveResult:
    """Conjugate gradients from ``x`` with residual ``r = b - A x``; one host sync per iteration."""
    rs = torch.dot(r, r)
    rs_host = float(rs)
    converged = math.sqrt(rs_host) <= threshold
    negative_curvature = False
    iterations = 0
    p = r.clone()
    while not converged and iterations < max_iter:
        Ap = operand @ p
        iterations += 1
        pAp = torch.dot(p, Ap)
        # Compute the step before knowing the sign of pAp, so that one transfer brings both pAp and the new
        # residual norm to the host; the step is discarded if the curvature turns out non-positive.
        alpha = rs / pAp
        x_new = x + alpha * p
        r_new = r - alpha * Ap
        rs_new = torch.dot(r_new, r_new)
        pAp_host, rs_new_host = torch.stack([pAp, rs_new]).tolist()
        if not pAp_host > 0:
            negative_curvature = True
            break
        x, r = x_new, r_new
        converged = math.sqrt(rs_new_host) <= threshold
        if not converged:
            p = r + (rs_new / rs) * p
        rs, rs_host = rs_new, rs_new_host
    return SolveResult(
        x=x,
        num_matvecs=operand.num_matvecs,
        converged=converged,
        residual_norm=math.sqrt(rs_host),
        iterations=iterations,
        negative_curvature=negative_curvature,
    )


def _minres(operand: Operand, x: torch.Tensor, r: torch.Tensor, threshold: float, max_iter: int) -> SolveResult:
    r"""MINRES from ``x`` with residual ``r = b - A x``; one host sync per iteration.

    Step :math:`k` of the Lanczos process gives column :math:`k` of :math:`\bar T_k`: :math:`\beta_k` above
    the diagonal, :math:`\alpha_k` on it and :math:`\beta_{k+1}` below. The two previous Givens rotations
    turn it into :math:`(\epsilon_k, \delta_k, \bar\gamma_k)`; a new rotation
    :math:`(c_k, s_k)` zeroes :math:`\beta_{k+1}` against :math:`\bar\gamma_k`, leaving
    :math:`\gamma_k = \sqrt{\bar\gamma_k^2 + \beta_{k+1}^2}` on the diagonal of :math:`R_k`, and rotates the
    right-hand side: :math:`\phi_k = c_k \bar\phi_{k-1}`, :math:`\bar\phi_k = -s_k \bar\phi_{k-1}`, with
    :math:`|\bar\phi_k| = \|r_k\|`. The directions :math:`D_k = V_k R_k^{-1}` follow from
    :math:`d_k = (v_k - \delta_k d_{k-1} - \epsilon_k d_{k-2}) / \gamma_k` and :math:`x_k = x_{k-1} + \phi_k d_k`.
    """
    # Relative to ‖A‖, what counts as zero for β (Lanczos breakdown) and γ (zero curvature). At an invariant
    # subspace the computed β is rounding noise of the product and the three-term recurrence, a few ε‖A‖
    # (up to about 10 ε‖A‖ measured on small dense matrices); 100 ε leaves room for less exact products.
    small = 100 * torch.finfo(operand.dtype).eps
    beta_host = float(r.norm())  # β_1 = ‖r_0‖
    phi_bar = beta_host
    converged = phi_bar <= threshold
    iterations = 0
    if converged:
        return SolveResult(x=x, num_matvecs=operand.num_matvecs, converged=True, residual_norm=phi_bar, iterations=0)
    v_prev = torch.zeros_like(r)
    v = r / beta_host
    d_prev2, d_prev = torch.zeros_like(r), torch.zeros_like(r)
    c_prev2, s_prev2, c_prev, s_prev = 1.0, 0.0, 1.0, 0.0  # the identity before the first rotation
    coupling = 0.0  # β_k as an entry of T (above the diagonal); none in the first column
    a_norm = 0.0  # running lower bound on ‖A‖: max_k ‖A v_k‖ = max_k √(β_k² + α_k² + β_{k+1}²)
    while not converged and iterations < max_iter:
        w = operand @ v
        iterations += 1
        if iterations > 1:
            w = w - beta_host * v_prev
        alpha = torch.dot(v, w)
        w = w - alpha * v
        beta_next = w.norm()
        alpha_host, beta_next_host = torch.stack([alpha, beta_next]).tolist()
        a_norm = max(a_norm, math.sqrt(coupling**2 + alpha_host**2 + beta_next_host**2))
        breakdown = beta_next_host <= small * a_norm
        # The previous two rotations applied to column k: (0, β_k, α_k) -> (ε_k, δ_k, γ̄_k).
        epsilon = s_prev2 * coupling
        delta_tmp = c_prev2 * coupling
        delta = c_prev * delta_tmp + s_prev * alpha_host
        gamma_bar = -s_prev * delta_tmp + c_prev * alpha_host
        gamma = math.hypot(gamma_bar, beta_next_host)
        if gamma <= small * a_norm:
            # Breakdown with a singular reduced system: no direction in the Krylov space lowers the
            # residual further, and dividing by γ ≈ 0 would send x to infinity. Keep the previous iterate.
            break
        c, s = gamma_bar / gamma, beta_next_host / gamma
        phi, phi_bar = c * phi_bar, -s * phi_bar
        d = (v - delta * d_prev - epsilon * d_prev2) / gamma
        x = x + phi * d
        converged = abs(phi_bar) <= threshold
        if breakdown:  # the Krylov space is invariant: x is the exact minimizer over it
            break
        d_prev2, d_prev = d_prev, d
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
        v_prev, v = v, w / beta_next_host
        coupling = beta_host = beta_next_host
    return SolveResult(
        x=x,
        num_matvecs=operand.num_matvecs,
        converged=converged,
        residual_norm=abs(phi_bar),
        iterations=iterations,
    )
