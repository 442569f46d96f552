r"""Krylov solvers for :math:`A x = b` with a symmetric operator: conjugate gradients and MINRES.

Both methods need only products ``A @ v``, one per iteration, and a few vectors of memory. CG
(Hestenes & Stiefel 1952) is the method of choice for a positive definite ``A`` (a damped GGN or Fisher,
the Newton systems of Hessian-free optimization); MINRES (Paige & Saunders 1975) handles any symmetric
``A``, indefinite or singular (a damped Hessian away from a minimum). Both stop on the relative residual
:math:`\|b - A x_k\| \le \mathrm{tol}\, \|b\|`, measured by the recurrence (no extra product); MINRES also
stops at a least-squares solution when the system is singular and inconsistent. Both accept a symmetric
positive definite preconditioner :math:`M \approx A^{-1}` (one product with it per iteration), checked and
counted by ``linalg._preconditioner``; ``tol`` keeps its meaning, the residual of the original system.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from .._checks import check_count, check_scalar
from ._operand import NOISE, Operand, PrecisionWarning, until_check
from ._preconditioner import Preconditioner

__all__ = ["SolveResult", "solve"]

_METHODS = ("cg", "minres")

# MINRES's least-squares test stops when ‖A r‖ ≤ ε^_LS_EXPONENT ‖A‖ ‖r‖ (√ε; see solve's docstring).
_LS_EXPONENT = 0.5
# A recurrence's residual is trusted while the rounding of b - A x, about ε‖A‖‖x‖ (ε of the operator's dtype),
# stays below this fraction of the residual it claims.
_HONEST = 1e-2


@dataclass(frozen=True)
class SolveResult:
    r"""The output of :func:`solve`.

    Attributes:
        x: The approximate solution, shape ``(P,)``, in the operator's dtype and device (computed in the
            working precision, float32 at least, and rounded to the operator's dtype at the end; the residual
            and ``converged`` are those of the rounded ``x``).
        num_matvecs: Products with ``op`` spent: ``iterations``, plus one when ``x0`` was given (for
            ``b − A x0``), plus one (CG) or one or two (MINRES) when the final residual was computed afresh (see
            ``residual_norm``; preconditioned MINRES always does); 0 when ``b = 0``. Products with the
            preconditioner are not counted here (``num_preconditioner_applications``).
        converged: True when the relative residual :math:`\|b - A x\| \le \mathrm{tol}\, \|b\|` was
            met by the returned ``x``: by the recurrence where its rounding is below 1% of ``tol``, else by a
            freshly computed residual, to which the rounding of half-precision products is added (see
            :func:`solve`). False, also before ``max_iter``, when MINRES stopped short of ``tol``: at a
            least-squares solution of an inconsistent system (``residual_norm`` is then the least-squares
            residual), at an invariant subspace or its size limit, or when a final check of the residual found
            it above ``tol``.
        residual_norm: The final residual norm :math:`\|b - A x\|`, as tracked by the recurrence or, where that
            could not be trusted, computed afresh. A recurrence's residual keeps shrinking while the true one
            stalls near the rounding of the products, about :math:`\varepsilon \|A\| \|x\|` (``ε`` of the
            operator's dtype), and MINRES's can drift further; so the residual is computed afresh (one product,
            MINRES one or two) when a solver cannot vouch for it: when :math:`\varepsilon \|A\| \|x\|` exceeds
            1% of ``tol ‖b‖`` (or, for MINRES ending short of ``tol``, of its residual), after MINRES's size
            test, or when its estimate of :math:`\kappa(A)` reaches :math:`1/\sqrt{\varepsilon}`; and always
            after preconditioned MINRES, whose recurrence minimizes :math:`\sqrt{r^\top M r}` instead.
        iterations: Iterations run, each costing one product: up to the one whose test stopped the method
            (for CG that met negative curvature, that iteration's product found it and ``x`` was not moved
            along it), and after it at most 7 more that ran before the host read the test's outcome, which
            leave ``x`` as it is (see :func:`solve`).
        negative_curvature: True when CG met a direction :math:`p` with :math:`p^\top A p \le 0` and
            stopped there; always False for MINRES.
        num_preconditioner_applications: Products with the preconditioner: one for the initial residual and one
            per iteration (those after the stopping test included), so ``iterations + 1``; 0 without a
            preconditioner or when ``b = 0``.
    """

    x: torch.Tensor
    num_matvecs: int
    converged: bool
    residual_norm: float
    iterations: int
    negative_curvature: bool = False
    num_preconditioner_applications: int = 0


def solve(
    op: Any,
    b: torch.Tensor,
    method: str = "cg",
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    x0: Optional[torch.Tensor] = None,
    assume_psd: bool = False,
    preconditioner: Any = None,
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
    memory stays a few vectors. It works for any symmetric :math:`A`, indefinite or singular. Besides the
    residual test below it stops, with ``converged=False`` unless that test is met too:

    * On a Lanczos breakdown (:math:`\beta_{k+1} \le 100\, \varepsilon \|A\|`, with :math:`\|A\|` estimated from
      :math:`\bar T_k`: the Krylov space is invariant to working precision; ``8 u ‖A‖`` for half-precision
      products, ``Operand.noise``), with the exact minimizer over that space.
    * At a least-squares solution: when :math:`\|A r_k\| \le \sqrt{\varepsilon}\, \|A\| \|r_k\|`, with
      :math:`\|A r_k\| = \|r_k\| \sqrt{\bar\gamma_{k+1}^2 + c_k^2 \beta_{k+2}^2}` from the recurrence (Choi,
      Paige & Saunders 2011, "MINRES-QLP: a Krylov subspace method for indefinite or singular symmetric
      systems", SIAM J. Sci. Comput. 33(4); the ``Arnorm`` test of Paige & Saunders' code). On a singular
      inconsistent system :math:`\|r_k\|` cannot reach ``tol`` ‖b‖ but :math:`A r_k \to 0` at the
      least-squares solutions, and the next step would divide by a near-zero pivot and send :math:`x` along
      a near-null direction, so MINRES keeps :math:`x_k`. (``ε`` here is the working precision's, float32 at
      least.) It is a least-squares solution but not the
      minimum-norm one: it carries a null-space component, which MINRES-QLP would remove, and which can be
      much larger than the solution when :math:`A` has eigenvalues of both signs near zero (measured: 1e3
      times the minimum norm with :math:`|\lambda|` down to 1e-3 around five zero eigenvalues). The level
      is :math:`\sqrt{\varepsilon}` (1.5e-8 in float64, 3.5e-4 in float32), not ``tol``: on a consistent
      system :math:`\|A r\| \ge \|r\| \|A\| / \kappa(A)`, so the test can fire only when
      :math:`\kappa(A) > 1/\sqrt{\varepsilon}`, where MINRES's recurrence is unreliable anyway (below);
      tied to ``tol`` it stopped solvable systems with :math:`\kappa(A) > 1/\mathrm{tol}` (measured at
      :math:`\kappa = 10^4`, ``tol=1e-2``, :math:`P = 30`: residual 0.3 ‖b‖ after 15 steps, where 38
      steps converge). The test also covers a breakdown with a singular reduced system (Paige & Saunders'
      ``Acond`` test).
    * When :math:`\|x_k - x_0\| \ge \|r_0\| / (100\, \varepsilon \|A\|)` (Paige & Saunders' size test; in
      exact arithmetic :math:`\|x_k - x_0\| \le \|r_0\| / \sigma_{\min}(A)`): :math:`x` has moved along
      directions of numerically zero curvature.

    Without reorthogonalization, MINRES can run past a least-squares point whose :math:`\|A r\|` stays above
    that level (measured: up to 6e-9 relative in float64 on random singular systems); :math:`x` then grows
    along near-null directions and the recurrence's residual parts from the true one. When MINRES ends short
    of ``tol`` with :math:`\varepsilon \|A\| \|x\|` above 1% of its residual, or after the size test, it
    computes the true residual and that of the earlier iterate with the least :math:`\|A r\| / \|r\|` among
    those whose residual could be trusted, and returns the better (one or two products).

    **Preconditioning.** ``preconditioner=M``, a symmetric positive definite approximation of :math:`A^{-1}`
    (a K-FAC or diagonal inverse of a damped GGN, say), replaces the Krylov space by
    :math:`\mathcal{K}_k(M A, M r_0)`: the iterations needed then depend on the spectrum of :math:`M A`
    instead of that of :math:`A` (with :math:`M = A^{-1}` exactly, one iteration solves the system). Each
    iteration costs one product with ``M`` besides the one with ``A``. Preconditioned CG (Hestenes & Stiefel
    1952; Saad 2003, "Iterative Methods for Sparse Linear Systems", 2nd ed., SIAM, §9.2, Algorithm 9.1) starts
    from :math:`z_0 = M r_0`, :math:`p_0 = z_0` and runs

    .. math::

        \alpha_k = \frac{r_k^\top z_k}{p_k^\top A p_k}, \quad x_{k+1} = x_k + \alpha_k p_k, \quad
        r_{k+1} = r_k - \alpha_k A p_k, \quad z_{k+1} = M r_{k+1}, \quad
        p_{k+1} = z_{k+1} + \frac{r_{k+1}^\top z_{k+1}}{r_k^\top z_k} p_k,

    which minimizes the :math:`A`-norm of the error over :math:`x_0 + \mathcal{K}_k(M A, M r_0)`; ``r_k`` is
    still the residual :math:`b - A x_k` of the original system. Preconditioned MINRES (Paige & Saunders
    1975, as in their MINRES code; derived in Elman, Silvester & Wathen 2014, "Finite Elements and Fast
    Iterative Solvers", 2nd ed., Oxford University Press) runs the Lanczos process of :math:`M^{1/2} A M^{1/2}`
    without forming the square root: the vectors :math:`q_k` are orthonormal in the inner product
    :math:`q^\top M q`, with :math:`\beta_{k+1} = \sqrt{w^\top M w}` for the new Lanczos remainder :math:`w`,
    and ``A`` multiplies :math:`M q_k`. Its recurrence then minimizes :math:`\sqrt{r_k^\top M r_k}`, not
    :math:`\|r_k\|`; so it also updates the residual vector itself (:math:`r_k = s_k^2 r_{k-1} - (\phi_k /
    \gamma_k) w`, one more vector) for the stopping test, and always computes its final residual afresh (one
    or two products). The least-squares and breakdown tests above apply to the preconditioned operator; the
    size test measures :math:`x_k - x_0` by :math:`\|x_k - x_0\| / \sqrt{\|M\|}` (:math:`\|M\|` estimated by the
    largest :math:`\|M w\| / \|w\|` seen); on a singular inconsistent system the least-squares point is the
    one of the norm :math:`\sqrt{r^\top M r}`.

    ``M`` must be symmetric positive definite: it is refused before any product if its shape, device or dtype
    do not match (its dtype may be the operator's or the working dtype: a float32 preconditioner of a bfloat16
    operator receives the float32 vectors as they are), if it is not symmetric (as ``op``), or if it is
    flagged ``is_psd=False``. An object without the flag (a dense tensor) is accepted, and positive
    definiteness is checked as the iterations run, at no cost: a residual (CG) or Lanczos remainder (MINRES)
    :math:`r \ne 0` with :math:`r^\top M r \le 0` raises a ``ValueError`` at the next check instead of
    returning iterates that mean nothing. Whatever ``M``, ``tol`` keeps its meaning (the relative residual of
    the original system, certified as below), so results with and without a preconditioner compare, and
    ``num_matvecs`` counts the products with ``op`` only.

    Both stop when :math:`\|r_k\| \le \mathrm{tol}\, \|b\|`, with :math:`\|r_k\|` from the recurrence.
    In exact arithmetic both terminate within :math:`P` iterations; rounding delays that, so ``max_iter``
    defaults to :math:`10 P`. The true residual cannot fall much below :math:`\varepsilon \|A\| \|x\|`
    (``ε`` of the operator's dtype) while the recurrence's keeps shrinking. So when that rounding, with
    :math:`\|A\|` estimated by the largest :math:`\|A p\| / \|p\|` seen, exceeds 1% of ``tol ‖b‖``, a solver
    that claims convergence computes :math:`\|b - A x\|` afresh with one more product, and ``converged``
    holds for the returned ``x``. MINRES's recurrence can drift further, like
    :math:`\varepsilon \kappa(A)^2 \|b\|` (Sleijpen, van der Vorst & Modersitzki 2000, SIAM J. Matrix Anal.
    Appl. 22); once its estimate :math:`\|A\| \max_k \|d_k\| \le \kappa(A)` (:math:`d_k` the update
    directions, :math:`\|A d_k\| = 1`) reaches :math:`1/\sqrt{\varepsilon}` it checks its final residual too.
    In float32 and float64 the fresh residual is computed in the same precision as everything else (a ``tol``
    below about :math:`\varepsilon \kappa(A)` is then met to that rounding). Half-precision products are far
    coarser than the working precision: there the fresh residual is computed with a float32 product of the same
    operator where it offers one (:meth:`curvature.LinearOperator.higher_precision`: every half-precision
    curvature operator, and a dense half-precision tensor), so it is the residual of the returned ``x``
    (rounded to the operator's dtype) against the exact operator, to float32 rounding; without one, it is itself
    off by up to :math:`\eta = 8 u \|A\| \|x\|` (``u`` the unit roundoff of float16 or bfloat16, the constant
    measured as for :func:`~curvature.eigenvalues`), and ``converged`` needs
    :math:`\|b - A x\| + \eta \le \mathrm{tol}\, \|b\|`. When the recurrence met ``tol`` but the fresh
    residual does not, ``tol`` is below what the products can certify: a
    :class:`~curvature.linalg._operand.PrecisionWarning` (a ``RuntimeWarning``) names the dtype and the
    relative residual that was certified, and ``converged`` is False. The iterations themselves (vectors,
    inner products, the recurrence) run in the working precision, float32 at least, whatever the operator's
    dtype. The solve is not differentiable: ``b`` and ``x0`` are detached.

    Both run their iterations on the device and read the outcome of the stopping tests on the host after
    iterations 1 to 8, 10, 12, 15, 18, 22, 27, 33, 41 and then every 8 (convergence is tested every 8 iterations
    to avoid a host synchronisation per product on GPUs): a solve that stops after ``k`` iterations runs up to
    ``min(7, k / 4)`` more, which change nothing (``x``, the residual and the flags are those of iteration
    ``k``) but are counted in ``iterations`` and ``num_matvecs``.

    Cost: one product per iteration, plus one for :math:`b - A x_0` when ``x0`` is given, plus one or two
    when MINRES checks its final residual (above); none when ``b = 0`` (the solution is 0). With a
    preconditioner, also one product with it per iteration and one for :math:`M r_0`. Memory: about
    six vectors of size :math:`P` (CG) or ten (MINRES); a preconditioner adds one (CG) or three (MINRES).

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator,
            a :class:`~curvature.LinearOperator` such as ``G.damped(1e-2)``, or a dense symmetric tensor
            (any other object with ``@`` is trusted to be symmetric).
        b: The right-hand side, shape ``(P,)``, in the operator's dtype and device.
        method: ``"cg"`` (positive definite ``A``) or ``"minres"`` (any symmetric ``A``).
        tol: Relative residual tolerance, positive.
        max_iter: Most iterations (products, not counting the one for ``x0``); None means :math:`10 P`.
        x0: Initial guess ``(P,)`` (a warm start); None starts from zero.
        assume_psd: Let CG run on an operator not flagged ``is_psd`` (a dense tensor, or a Hessian damped
            enough to be positive definite); the caller vouches for it.
        preconditioner: None, or a symmetric positive definite approximation ``M`` of :math:`A^{-1}` with
            ``@``, ``.shape``, ``.dtype`` and ``.device`` (a :class:`~curvature.LinearOperator`, such as a K-FAC
            inverse, or a dense tensor), of shape ``(P, P)``, on the operator's device, in its dtype or the
            working dtype; for either method (see above).

    Returns:
        A :class:`SolveResult`.

    Raises:
        TypeError: If ``op`` or ``preconditioner`` is not an operator, or ``b``, ``x0``, ``tol``,
            ``max_iter`` or ``preconditioner`` have the wrong type or dtype.
        ValueError: If ``method`` is unknown, ``tol`` is not positive and finite, ``max_iter`` is below 1,
            ``b`` or ``x0`` have the wrong shape or device or are not finite, ``op`` is not symmetric (flagged
            ``is_symmetric=False``, or a dense tensor that is not symmetric to rounding,
            ``check_symmetric``), or CG is asked to solve with an operator not
            known to be PSD; if ``preconditioner`` has the wrong shape or device, is not symmetric, is flagged
            ``is_psd=False``, or turns out not to be positive definite (:math:`r^\top M r \le 0` for some
            :math:`r \ne 0`, found during the iterations) or to return NaN or Inf.

    Warns:
        PrecisionWarning: When the recurrence met ``tol`` but the residual of the returned ``x``, computed afresh
            (plus the rounding of half-precision products), does not: ``tol`` is below what the products can
            certify.

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
        >>> S = torch.diag(torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64))  # Jacobi: M = diag(A)⁻¹
        >>> pcg = solve(S, torch.ones(3, dtype=torch.float64), assume_psd=True, preconditioner=torch.diag(1 / S.diag()))
        >>> pcg.iterations, pcg.num_preconditioner_applications
        (1, 2)
    """
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    operand = Operand(op, deferred=True)
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
    precond = None if preconditioner is None else Preconditioner(preconditioner, operand)

    b_norm = float(b.norm())
    if b_norm == 0.0:  # A x = 0 is solved by x = 0 whatever A is; no product needed
        return SolveResult(x=torch.zeros_like(b), num_matvecs=0, converged=True, residual_norm=0.0, iterations=0)
    b = operand.work(b)  # the iterations run in the working precision
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x0 = operand.work(x0)
        x, r = x0.clone(), b - operand @ x0
    if method == "cg":
        result, achievable = _cg(operand, b, x, r, tol, max_iter, precond)
    else:
        result, achievable = _minres(operand, b, x, r, tol, max_iter, precond)
    if achievable > tol:
        why = (f"the rounding of b - A x is about {NOISE:g} u ‖A‖ ‖x‖ with u = {operand.unit_roundoff:.1e}"
               if _rounding(operand) else "the recurrence met it, the residual of x computed afresh did not")
        warnings.warn(
            f"tol={tol:g} is below what {str(operand.dtype).replace('torch.', '')} products can certify here "
            f"(about {achievable:.0e}: {why}); returning converged=False. Compute in "
            f"{'float32' if _rounding(operand) else 'higher precision'} or pass tol>={achievable:.0e}.",
            PrecisionWarning,
            stacklevel=2,
        )
    return result


def _rounding(operand: Operand) -> float:
    """The relative rounding of a product beyond the working precision: ``8 u`` for half precision, else 0.

    In float32 and float64 a freshly computed residual is as exact as the rest of the solve; half-precision
    products are off by up to about ``8 u ‖A‖ ‖v‖`` (see :meth:`~curvature.linalg._operand.Operand.noise`).
    """
    return NOISE * operand.unit_roundoff if operand.unit_roundoff > torch.finfo(operand.work_dtype).eps else 0.0


class _Residuals:
    """``b - A x`` for the final checks, through float32 products where the operator offers them.

    A half-precision operator's float32 view (:meth:`~curvature.linalg._operand.Operand.refined`) gives the
    residual to float32 rounding; without one, its own products with a rounding margin do.

    A model that cannot run in float32 (a plain half-precision tensor attribute, a hard-coded ``.half()``) makes
    the first float32 product fail: the check then falls back to the operator's own products, and warns.

    Attributes:
        margin: The relative rounding of the products used, to be added as ``margin ‖A‖ ‖x‖`` (:func:`_rounding`;
            0 with float32 products).
    """

    def __init__(self, operand: Operand) -> None:
        self.operand = operand
        self.refined = operand.refined()
        self.margin = 0.0 if self.refined is not None else _rounding(operand)

    def __call__(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.refined is not None:
            try:
                return b - self.operand.refined_product(self.refined, x)
            except (RuntimeError, ValueError, TypeError) as error:
                dtype = str(self.operand.dtype).replace("torch.", "")
                warnings.warn(
                    f"solve: the float32 product that checks a {dtype} residual failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0][:200]}); the residual is computed in {dtype}, with its rounding "
                    "margin.",
                    RuntimeWarning, stacklevel=5,  # solve's caller: solve, a solver, _certify, here
                )
                self.refined, self.margin = None, _rounding(self.operand)
        return b - self.operand @ x


class _Certified(NamedTuple):
    """The outcome of :func:`_certify`."""

    x: torch.Tensor  # the iterate returned: the one given, or the earlier one where that is better
    residual_norm: float  # ‖b - A x‖, computed afresh
    converged: bool  # the residual plus the rounding of half-precision products is within the threshold
    achievable: float  # the relative residual certified instead (0 when converged)


def _certify(operand: Operand, b: torch.Tensor, x: torch.Tensor, threshold: float, a_norm: float, b_norm: float,
             earlier: Optional[torch.Tensor] = None) -> _Certified:
    """The residual of ``x`` (in the operator's dtype) computed afresh, for a solver that cannot vouch for its own.

    ``converged`` needs the residual plus the rounding of half-precision products (:func:`_rounding`) within
    ``threshold``; when it is not, ``achievable`` is the relative residual that was certified instead. When
    ``x`` misses the threshold and an ``earlier`` iterate is given (MINRES: the trusted one with the least
    ``‖A r‖ / ‖r‖``), its residual is computed too (a second product), and it is returned instead unless ``x``
    is better by more than the rounding ``ε ‖A‖ ‖x‖`` (``ε`` of the operator's dtype).
    """
    residuals = _Residuals(operand)  # half precision: from float32 products, to float32 rounding
    residual, x_norm = operand.fetch_floats(residuals(b, x).norm(), x.norm())
    if earlier is not None and residual > threshold:
        (earlier_residual,) = operand.fetch_floats(residuals(b, earlier).norm())
        if earlier_residual <= residual + 2 * operand.unit_roundoff * a_norm * x_norm:
            x, residual = earlier, earlier_residual
            (x_norm,) = operand.fetch_floats(x.norm())
    margin = residuals.margin * a_norm * x_norm
    converged = residual + margin <= threshold
    return _Certified(x, residual, converged, 0.0 if converged else (residual + margin) / b_norm)


def _cg(operand: Operand, b: torch.Tensor, x: torch.Tensor, r: torch.Tensor, tol: float,
        max_iter: int, precond: Optional[Preconditioner] = None) -> tuple[SolveResult, float]:
    """Conjugate gradients from ``x`` with residual ``r = b - A x``, reading its state on the host at checks only.

    Every iteration computes its step and its stopping tests on the device; once a test has fired (converged,
    or negative curvature), the later iterations of the batch leave ``x``, ``r`` and ``p`` as they are. The
    host reads the flags and ``rᵀr`` in one transfer per check (:func:`~curvature.linalg._operand.until_check`).
    When the recurrence claims convergence but its rounding, ``ε ‖A‖ ‖x‖`` with ``‖A‖ ≥ max ‖A p‖ / ‖p‖``, is
    above 1% of the threshold, the residual is computed afresh (:func:`_certify`).

    With a preconditioner ``M`` the directions are built from ``z = M r`` and ``ρ = rᵀz`` replaces ``rᵀr`` in
    ``α`` and ``β`` (:func:`_preconditioned_residual`); ``r`` is still the residual of the original system, and
    ``rᵀr`` is tracked beside ``ρ`` for the stopping test. A residual with ``ρ ≤ 0`` stops the iterations and is
    reported at the next check (``M`` is not positive definite).

    Returns the result and the relative residual that half-precision products can certify when ``tol`` is
    below it (0 otherwise).
    """
    z = r if precond is None else precond @ r
    rho = torch.dot(r, z)  # ρ = rᵀ M r (rᵀr without a preconditioner)
    rs = torch.dot(r, r) if precond is not None else rho
    flags = () if precond is None else precond.flags(~(rho > 0))
    b_norm, rs_host, *checks = operand.fetch_floats(b.norm(), rs, *flags)
    threshold = tol * b_norm
    converged = math.sqrt(rs_host) <= threshold
    if precond is not None and not converged:  # r ≠ 0 here
        precond.verify(*checks, "cg")
    negative_curvature = False
    iterations = 0
    p = z.clone()
    active = torch.ones((), dtype=torch.bool, device=r.device)  # no stopping test has fired yet
    met = negative = broken = torch.zeros((), dtype=torch.bool, device=r.device)
    a_norm = torch.zeros((), dtype=torch.float64, device=r.device)  # max ‖A p‖ / ‖p‖: a lower bound on ‖A‖
    a_norm_host = 0.0
    while not converged and not negative_curvature and iterations < max_iter:
        count = min(until_check(iterations), max_iter - iterations)
        for _ in range(count):
            Ap = operand @ p
            a_norm = torch.where(active, torch.maximum(a_norm, (Ap.norm() / p.norm()).double()), a_norm)
            pAp = torch.dot(p, Ap)
            alpha = rho / pAp
            x_new = x + alpha * p
            r_new = r - alpha * Ap
            rs_new = torch.dot(r_new, r_new)
            # A direction of non-positive curvature stops CG before x moves along it.
            step = active & (pAp > 0)
            negative = negative | (active & ~(pAp > 0))
            done = step & (rs_new.double().sqrt() <= threshold)
            met = met | done
            x, r = torch.where(step, x_new, x), torch.where(step, r_new, r)
            active = step & ~done
            if precond is None:
                z_new, rho_new = r_new, rs_new
            else:
                z_new, rho_new, active, broken = _preconditioned_residual(precond, r, active, broken)
            p = torch.where(active, z_new + (rho_new / rho) * p, p)
            rho = torch.where(step, rho_new, rho)
            rs = torch.where(step, rs_new, rs) if precond is not None else rho
        iterations += count
        flags = () if precond is None else precond.flags(broken)
        met_host, negative_host, rs_host, a_norm_host, *checks = operand.fetch_floats(met, negative, rs, a_norm,
                                                                                       *flags)
        if precond is not None:
            precond.verify(*checks, "cg")
        converged, negative_curvature = bool(met_host), bool(negative_host)
    residual_norm, achievable = math.sqrt(rs_host), 0.0
    x = x.to(operand.dtype)
    if converged and iterations > 0:
        (x_norm,) = operand.fetch_floats(x.norm())
        if operand.unit_roundoff * 2 * a_norm_host * x_norm > _HONEST * threshold:
            _, residual_norm, converged, achievable = _certify(operand, b, x, threshold, a_norm_host, b_norm)
    return SolveResult(
        x=x,
        num_matvecs=operand.num_matvecs,
        converged=converged,
        residual_norm=residual_norm,
        iterations=iterations,
        negative_curvature=negative_curvature,
        num_preconditioner_applications=0 if precond is None else precond.num_applications,
    ), achievable


def _preconditioned_residual(precond: Preconditioner, r: torch.Tensor, active: torch.Tensor,
                             broken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCG's ``z = M r`` and ``ρ = rᵀ z`` for the new residual, and the breakdown test on the device.

    Where CG goes on (``active``: ``r`` is above the threshold, so not zero), ``ρ ≤ 0`` means that ``M`` is not
    positive definite: ``active`` is cleared and ``broken`` set, for :meth:`Preconditioner.verify` to raise at the
    next check. ``r`` is the residual kept (the previous one where CG stopped), so ``M`` never sees the NaN of a
    step that was not taken.

    Returns ``z``, ``ρ``, the updated ``active`` and ``broken``.
    """
    z = precond @ r
    rho = torch.dot(r, z)
    positive = rho > 0
    return z, rho, active & positive, broken | (active & ~positive)


def _minres(
    operand: Operand, b: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, tol: float, max_iter: int,
    precond: Optional[Preconditioner] = None,
) -> tuple[SolveResult, float]:
    """MINRES from ``x0`` with residual ``r = b - A x0``, reading its state on the host at checks only.

    The iterations run on the device (:class:`_MinresState`); after each batch
    (:func:`~curvature.linalg._operand.until_check`) the host reads whether a stopping test has fired. At the
    end the recurrence's residual is taken for the returned ``x`` unless it cannot be trusted
    (:func:`_recurrence_trusted`); then the residual is computed afresh (:func:`_certify`). With a
    preconditioner ``M`` the Lanczos process starts from ``β_1 = √(r_0ᵀ M r_0)`` (refused unless positive), and
    the final residual is always computed afresh: the recurrence's is in the norm ``√(rᵀ M r)``.

    Returns the result and the relative residual that the products can certify when the recurrence met ``tol``
    but the fresh residual does not (0 otherwise).
    """
    y = r if precond is None else precond @ r
    r_norm = r.norm()
    ry = None if precond is None else torch.dot(r, y)
    beta_1 = r_norm if ry is None else ry.clamp_min(0).sqrt()  # β_1 = √(r_0ᵀ M r_0); ‖r_0‖ without M
    flags = () if ry is None else precond.flags(~(ry > 0))
    b_norm, r_norm, beta_1, x0_norm, *checks = operand.fetch_floats(b.norm(), r_norm, beta_1, x0.norm(), *flags)
    threshold = tol * b_norm
    applications = 0 if precond is None else precond.num_applications
    if r_norm <= threshold:
        result = SolveResult(x=x0.to(operand.dtype), num_matvecs=operand.num_matvecs, converged=True,
                             residual_norm=r_norm, iterations=0, num_preconditioner_applications=applications)
        return result, 0.0
    if precond is not None:  # r_0 ≠ 0 here
        precond.verify(*checks, "minres")
    state = _MinresState(operand, r, beta_1, x0_norm, threshold, precond, y)
    while state.iterations < max_iter:
        for _ in range(min(until_check(state.iterations), max_iter - state.iterations)):
            state.step()
        outcome = state.read()
        if not outcome.active:
            break
    x = (x0 + state.z).to(operand.dtype)
    applications = 0 if precond is None else precond.num_applications
    if precond is None and _recurrence_trusted(operand, outcome, x, threshold):
        result = SolveResult(x=x, num_matvecs=operand.num_matvecs, converged=outcome.converged,
                             residual_norm=outcome.residual_norm, iterations=state.iterations)
        return result, 0.0
    # The trusted iterate with the least ‖A r‖ / ‖r‖, the fallback when the last one misses tol.
    earlier = (x0 + state.best_z).to(operand.dtype) if outcome.has_best and not outcome.best_is_z else None
    certified = _certify(operand, b, x, threshold, outcome.a_norm, b_norm, earlier=earlier)
    result = SolveResult(x=certified.x, num_matvecs=operand.num_matvecs, converged=certified.converged,
                         residual_norm=certified.residual_norm, iterations=state.iterations,
                         num_preconditioner_applications=applications)
    # Only a residual the recurrence claimed met tol can be below what the products certify.
    return result, certified.achievable if outcome.converged else 0.0


@dataclass(frozen=True)
class _MinresOutcome:
    """What the host reads of :class:`_MinresState` at a check (one transfer).

    Attributes:
        active: No stopping test has fired: the iterations go on.
        converged: The recurrence's residual met the threshold.
        breakdown: The Lanczos process found an invariant space (``x`` is the exact minimizer over it).
        too_large: The size test stopped it (``x`` moved along directions of numerically zero curvature).
        residual_norm: The recurrence's residual ``|φ̄|`` (with a preconditioner, the norm of the residual vector
            updated beside it: ``|φ̄|`` is then ``√(rᵀ M r)``).
        a_norm: The running lower bound on ``‖A‖``.
        d_max: The largest ``‖d_k‖``, so that ``a_norm · d_max`` estimates ``κ(A)``.
        has_best: Some iterate's residual could be trusted.
        best_is_z: The best trusted iterate is the last one.
    """

    active: bool
    converged: bool
    breakdown: bool
    too_large: bool
    residual_norm: float
    a_norm: float
    d_max: float
    has_best: bool
    best_is_z: bool


class _MinresState:
    r"""The state of MINRES between two iterations, on the device, and its :meth:`step`.

    MINRES (Paige & Saunders 1975, SIAM J. Numer. Anal. 12) as in their code, with the stopping tests of
    :func:`solve`.

    Step :math:`k` of the Lanczos process gives column :math:`k` of :math:`\bar T_k`: :math:`\beta_k` above
    the diagonal, :math:`\alpha_k` on it and :math:`\beta_{k+1}` below. The two previous Givens rotations
    turn it into :math:`(\epsilon_k, \delta_k, \bar\gamma_k)`; a new rotation
    :math:`(c_k, s_k)` zeroes :math:`\beta_{k+1}` against :math:`\bar\gamma_k`, leaving
    :math:`\gamma_k = \sqrt{\bar\gamma_k^2 + \beta_{k+1}^2}` on the diagonal of :math:`R_k`, and rotates the
    right-hand side: :math:`\phi_k = c_k \bar\phi_{k-1}`, :math:`\bar\phi_k = -s_k \bar\phi_{k-1}`, with
    :math:`|\bar\phi_k| = \|r_k\|`. The directions :math:`D_k = V_k R_k^{-1}` follow from
    :math:`d_k = (v_k - \delta_k d_{k-1} - \epsilon_k d_{k-2}) / \gamma_k`, and the correction from
    :math:`z_k = x_k - x_0 = z_{k-1} + \phi_k d_k`.

    Once :math:`\alpha_k, \beta_{k+1}` are known, and before step :math:`k` moves the iterate, the loop has
    for :math:`x_{k-1}`:

    * :math:`\|A r_{k-1}\| = \|r_{k-1}\| \sqrt{\bar\gamma_k^2 + c_{k-1}^2 \beta_{k+1}^2}` (the ``Arnorm`` of
      Choi, Paige & Saunders 2011). With orthonormal :math:`V`: :math:`r_{k-1} = \bar\phi_{k-1} V_k
      Q_{k-1}^\top e_k` and :math:`A V_k = V_{k+1} \bar T_k`; the last entry of :math:`Q_{k-1}^\top e_k` is
      :math:`c_{k-1}` and the last row of :math:`Q_{k-1} T_k Q_{k-1}^\top` is
      :math:`\bar\gamma_k (Q_{k-1} e_k)^\top`, so :math:`\|\bar T_k Q_{k-1}^\top e_k\|^2 = \bar\gamma_k^2
      + c_{k-1}^2 \beta_{k+1}^2`.
    * :math:`\|z_{k-1}\|`.

    All of it is evaluated on the device, in float64 0-d tensors, with the same formulas as a loop on the host;
    each stopping test sets a flag, after which the remaining iterations of the batch change nothing. The host
    reads the flags and the few scalars it needs at the end in one transfer per check (:meth:`read`).

    The recurrence runs in the working precision; ``ε`` of the operator's dtype measures the rounding of the
    products (what the true residual can reach), that of the working dtype the least-squares test's level.

    With a preconditioner ``M`` the same recurrence runs on :math:`M^{1/2} A M^{1/2}` without its square root
    (as in Paige & Saunders' code): ``v`` holds the Lanczos vectors, orthonormal in the inner product
    :math:`v^\top M v`, and ``mv`` their images ``M v``, which ``A`` multiplies and ``d`` gathers;
    :math:`\beta_{k+1} = \sqrt{w^\top M w}` (:meth:`_precondition`). Then :math:`|\bar\phi_k|` is
    :math:`\sqrt{r_k^\top M r_k}`, so ``r`` itself is updated (:meth:`_update_iterate`) for the residual test, and
    the rounding tests use ``op_norm``, a lower bound on :math:`\|A\|`, where ``a_norm`` bounds the
    preconditioned operator.
    """

    def __init__(self, operand: Operand, r: torch.Tensor, beta_1: float, x0_norm: float, threshold: float,
                 precond: Optional[Preconditioner], y: torch.Tensor) -> None:
        self.operand, self.beta_1, self.x0_norm, self.threshold = operand, beta_1, x0_norm, threshold
        self.precond = precond
        self.eps = 2 * operand.unit_roundoff  # the machine epsilon of the products
        # Relative to ‖A‖, what counts as zero for β (Lanczos breakdown) and for a singular value of A. At an
        # invariant subspace the computed β is rounding noise of the product and the three-term recurrence, a
        # few ε‖A‖ (up to about 10 ε‖A‖ measured on small dense matrices); 100 ε leaves room for less exact
        # products, and for half-precision products the level is 8 u (Operand.noise).
        self.small = operand.noise(1.0)
        # The least-squares test's level: √ε of the working precision, not tol.
        self.ls_tol = torch.finfo(operand.work_dtype).eps ** _LS_EXPONENT
        # The recurrence's scalars live on the device as float64 0-d tensors (the values the host formulas used).
        scalar = functools.partial(torch.full, (), dtype=torch.float64, device=r.device)
        true, false = scalar(1.0) > 0, scalar(0.0) > 0
        self.iterations = 0
        self.v_prev = torch.zeros_like(r)
        self.v = r / beta_1
        # M v (y = M r_0): the vector multiplied by A and gathered into x; v itself without a preconditioner
        self.mv = self.v if precond is None else y / beta_1
        self.z = torch.zeros_like(r)  # x - x0
        self.d_prev2, self.d_prev = torch.zeros_like(r), torch.zeros_like(r)
        self.c_prev2, self.s_prev2, self.c_prev, self.s_prev = scalar(1.0), scalar(0.0), scalar(1.0), scalar(0.0)
        self.beta = scalar(beta_1)  # β_k: multiplies v_{k-1} in the recurrence
        self.coupling = scalar(0.0)  # β_k as an entry of T (above the diagonal); none in the first column
        self.phi_bar = scalar(beta_1)
        self.a_norm = scalar(0.0)  # running lower bound on ‖A‖: max_k ‖A v_k‖ = max_k √(β_k² + α_k² + β_{k+1}²)
        self.d_max = scalar(0.0)  # max_k ‖d_k‖; ‖A d_k‖ = 1 in exact arithmetic, so Acond = ‖A‖ max_k ‖d_k‖ ≤ κ(A)
        self.best_ar, self.best_z = scalar(math.inf), self.z  # ‖A r‖ / ‖r‖ and z of the least such trusted iterate
        self.has_best, self.best_is_z = false, false  # whether there is one, and whether it is the final z
        self.active, self.converged, self.breakdown, self.too_large = true, false, false, false
        if precond is not None:
            self.r = r.clone()  # b - A x: the recurrence gives its M-norm only, so the vector is updated too
            self.r_norm = r.norm().double()
            self.op_norm_ = scalar(0.0)  # running lower bound on ‖A‖: max_k ‖A M v_k‖ / ‖M v_k‖
            self.m_norm = (y.norm() / r.norm()).double()  # running lower bound on ‖M‖: max ‖M w‖ / ‖w‖
            self.broken = false  # some w ≠ 0 had wᵀ M w ≤ 0

    @property
    def residual(self) -> torch.Tensor:
        """``‖b − A x_k‖`` as the recurrence has it: ``|φ̄_k|``, or with a preconditioner the norm of ``r``."""
        return self.phi_bar.abs() if self.precond is None else self.r_norm

    @property
    def op_norm(self) -> torch.Tensor:
        """The running lower bound on ``‖A‖`` (with a preconditioner, ``a_norm`` bounds ``‖M^½ A M^½‖`` instead)."""
        return self.a_norm if self.precond is None else self.op_norm_

    def step(self) -> None:
        """One iteration (one product): the Lanczos step, the stopping tests on ``x_{k-1}``, then ``x_k``."""
        self.iterations += 1
        w, alpha = self._lanczos_step()
        y, beta_next = (w, w.norm()) if self.precond is None else self._precondition(w)
        beta_next_ = beta_next.double()
        z_norm = self.z.norm().double()
        self.a_norm = torch.where(
            self.active, torch.maximum(self.a_norm, (self.coupling**2 + alpha**2 + beta_next_**2).sqrt()), self.a_norm
        )
        # With a preconditioner the size test measures z in the M⁻¹-norm, estimated by ‖z‖ / √‖M‖.
        going = self.active & ~self._too_large(z_norm if self.precond is None else z_norm / self.m_norm.sqrt())
        epsilon, delta, gamma_bar = self._rotate_column(alpha)
        a_r = torch.hypot(gamma_bar, self.c_prev * beta_next_)  # ‖A r_{k-1}‖ / ‖r_{k-1}‖
        self._remember_trusted(going, a_r, z_norm)
        going = going & ~self._least_squares(a_r)
        c, s, d = self._update_iterate(going, gamma_bar, beta_next_, delta, epsilon, w)
        met = going & (self.residual <= self.threshold)
        # Lanczos breakdown: x is the exact minimizer over the space.
        broke = going & (beta_next_ <= self.small * self.a_norm)
        self.converged, self.breakdown = self.converged | met, self.breakdown | broke
        self.active = going & ~met & ~broke
        if self.precond is not None:  # wᵀ M w ≤ 0 for w ≠ 0: M is not positive definite, stop and report it
            self.active = self.active & ~self.broken
        self._shift(c, s, d, w, y, beta_next, beta_next_)

    def _lanczos_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``w = A v_k − β_k v_{k-1} − α_k v_k`` (no reorthogonalization) with ``α_k`` (float64).

        With a preconditioner ``A`` multiplies ``M v_k`` and ``α_k = (M v_k)ᵀ w``; the running ``‖A‖`` is updated.
        """
        w = self.operand @ self.mv
        if self.precond is not None:
            ratio = (w.norm() / self.mv.norm()).double()
            self.op_norm_ = torch.where(self.active, torch.maximum(self.op_norm_, ratio), self.op_norm_)
        if self.iterations > 1:
            w = w - self.beta * self.v_prev
        alpha = torch.dot(self.mv, w)
        w = w - alpha * self.v
        return w, alpha.double()

    def _precondition(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = M w`` and ``β_{k+1} = √(wᵀ M w)``, recording a breakdown (``wᵀ M w ≤ 0`` for ``w ≠ 0``).

        At an invariant space ``w`` is rounding noise, and ``wᵀ M w`` stays positive for a positive definite ``M``
        (well conditioned to working precision); only an exactly zero ``w`` has ``wᵀ M w = 0`` legitimately.
        """
        y = self.precond @ w
        wy, w_norm = torch.dot(w, y), w.norm()
        self.broken = self.broken | (self.active & ~(wy > 0) & (w_norm > 0))
        ratio = torch.where(w_norm > 0, y.norm() / w_norm, 0.0).double()
        self.m_norm = torch.where(self.active, torch.maximum(self.m_norm, ratio), self.m_norm)
        return y, wy.clamp_min(0).sqrt()

    def _too_large(self, z_norm: torch.Tensor) -> torch.Tensor:
        """Size test (Paige & Saunders' bound on ``‖x‖``, at the 100 ε level used here for a zero singular value).

        In exact arithmetic ``‖z_k‖ = ‖R_k⁻¹ t_k‖ ≤ ‖r_0‖ / σ_min(A)``, so ``‖z‖ ≥ ‖r_0‖ / (100 ε ‖A‖)`` means
        that ``x`` moved along directions of numerically zero curvature. Records the flag; returns the test.
        """
        large = self.small * self.a_norm * z_norm >= self.beta_1
        self.too_large = self.too_large | (self.active & large)
        return large

    def _rotate_column(self, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The previous two rotations applied to column ``k`` of ``T̄``: ``(0, β_k, α_k) → (ε_k, δ_k, γ̄_k)``."""
        epsilon = self.s_prev2 * self.coupling
        delta_tmp = self.c_prev2 * self.coupling
        delta = self.c_prev * delta_tmp + self.s_prev * alpha
        gamma_bar = -self.s_prev * delta_tmp + self.c_prev * alpha
        return epsilon, delta, gamma_bar

    def _remember_trusted(self, going: torch.Tensor, a_r: torch.Tensor, z_norm: torch.Tensor) -> None:
        """Keep ``z_{k-1}`` as the best trusted iterate if its ``‖A r‖ / ‖r‖`` is the least so far.

        Its recurrence residual is trusted while the rounding of ``b - A x``, about ``ε ‖A‖ ‖x‖``, stays below
        1% of it (``_HONEST``).
        """
        trusted = self.eps * self.op_norm * (self.x0_norm + z_norm) <= _HONEST * self.residual
        better = going & trusted & (a_r < self.best_ar)
        self.best_ar, self.best_z = torch.where(better, a_r, self.best_ar), torch.where(better, self.z, self.best_z)
        self.has_best, self.best_is_z = self.has_best | better, self.best_is_z | better

    def _least_squares(self, a_r: torch.Tensor) -> torch.Tensor:
        """Least-squares test: ``x_{k-1}`` is a least-squares solution to working accuracy, ``‖A r‖ ≤ √ε ‖A‖ ‖r‖``.

        Step ``k`` would divide by ``γ_k ≥ a_r``, tiny, and move ``x`` along a direction of near-zero curvature
        (on an inconsistent system, without end). This also covers a breakdown with a singular reduced system
        (``γ_k ≤ 100 ε ‖A‖``, Paige & Saunders' Acond test). Where it holds, ``x_{k-1}`` is kept.
        """
        return a_r <= self.ls_tol * self.a_norm

    def _update_iterate(self, going: torch.Tensor, gamma_bar: torch.Tensor, beta_next: torch.Tensor,
                        delta: torch.Tensor, epsilon: torch.Tensor,
                        w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The new rotation ``(c_k, s_k)``, direction ``d_k`` and, where ``going``, ``z_k`` and ``φ̄_k``.

        With a preconditioner, also the residual vector :math:`r_k = s_k^2 r_{k-1} - (\phi_k / \gamma_k) w`:
        :math:`r_k = \bar\phi_k V_{k+1} Q_k^\top e_{k+1}` (the Lanczos vectors :math:`v`, orthonormal in the
        :math:`M`-inner product, not in the Euclidean one, so :math:`\|r_k\| \ne |\bar\phi_k|`), and the last
        column of :math:`Q_k^\top` is :math:`(-s_k\, Q_{k-1}^\top e_k,\ c_k)`, so
        :math:`r_k = s_k^2 r_{k-1} + c_k \bar\phi_k v_{k+1}` with :math:`c_k \bar\phi_k v_{k+1}
        = -c_k s_k \bar\phi_{k-1} w / \beta_{k+1} = -(\phi_k / \gamma_k) w`: no division by a vanishing
        :math:`\beta_{k+1}`.
        """
        gamma = torch.hypot(gamma_bar, beta_next)  # ≥ a_r > 0 where going
        c, s = gamma_bar / gamma, beta_next / gamma
        d = (self.mv - delta * self.d_prev - epsilon * self.d_prev2) / gamma
        phi = c * self.phi_bar  # φ_k
        self.z = torch.where(going, self.z + phi * d, self.z)
        if self.precond is not None:
            self.r = torch.where(going, (s * s) * self.r - (phi / gamma) * w, self.r)
            self.r_norm = torch.where(going, self.r.norm().double(), self.r_norm)
        self.best_is_z = self.best_is_z & ~going
        self.d_max = torch.where(going, torch.maximum(self.d_max, d.norm().double()), self.d_max)
        self.phi_bar = torch.where(going, -s * self.phi_bar, self.phi_bar)
        return c, s, d

    def _shift(self, c: torch.Tensor, s: torch.Tensor, d: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
               beta_next: torch.Tensor, beta_next_: torch.Tensor) -> None:
        """Where still active, step ``k`` becomes the previous one: directions, rotations, Lanczos vectors."""
        active = self.active
        self.d_prev2, self.d_prev = torch.where(active, self.d_prev, self.d_prev2), torch.where(active, d, self.d_prev)
        self.c_prev2 = torch.where(active, self.c_prev, self.c_prev2)
        self.s_prev2 = torch.where(active, self.s_prev, self.s_prev2)
        self.c_prev, self.s_prev = torch.where(active, c, self.c_prev), torch.where(active, s, self.s_prev)
        self.v_prev, self.v = torch.where(active, self.v, self.v_prev), torch.where(active, w / beta_next, self.v)
        self.mv = self.v if self.precond is None else torch.where(active, y / beta_next, self.mv)
        self.coupling = self.beta = torch.where(active, beta_next_, self.beta)

    def read(self) -> _MinresOutcome:
        """The flags and scalars the host needs, in one transfer."""
        flags = () if self.precond is None else self.precond.flags(self.broken)
        host = self.operand.fetch_floats(self.active, self.converged, self.breakdown, self.too_large, self.residual,
                                         self.op_norm, self.d_max, self.has_best, self.best_is_z, *flags)
        active, converged, breakdown, too_large, residual, a_norm, d_max, has_best, best_is_z, *checks = host
        if self.precond is not None:
            self.precond.verify(*checks, "minres")
        return _MinresOutcome(
            active=bool(active), converged=bool(converged), breakdown=bool(breakdown), too_large=bool(too_large),
            residual_norm=residual, a_norm=a_norm, d_max=d_max, has_best=bool(has_best),
            best_is_z=bool(best_is_z),
        )


def _recurrence_trusted(operand: Operand, outcome: _MinresOutcome, x: torch.Tensor, threshold: float) -> bool:
    """Whether MINRES's recurrence residual can be taken for ``‖b - A x‖`` of the returned ``x``.

    Not once ``ε Acond² ≥ 1``: it can then be off by as much as ``‖b‖`` (its gap grows like ``ε κ(A)² ‖b‖``,
    Sleijpen, van der Vorst & Modersitzki 2000), nor after the size test. Nor when the rounding ``ε ‖A‖ ‖x‖`` of
    ``b - A x`` is not small next to what it claims: converged, next to the threshold (the recurrence keeps
    shrinking while the true residual stalls at that rounding); short of convergence, next to the residual (an
    inconsistent system has then run on past its least-squares point, where ``x`` grows along near-null
    directions and the recurrence parts from the truth: measured 1e-3 against 6e13). At a breakdown it is
    trusted. One host read (``‖x‖``) where the last test is needed.
    """
    eps = 2 * operand.unit_roundoff
    if outcome.too_large or eps * (outcome.a_norm * outcome.d_max) ** 2 >= 1:
        return False
    if outcome.breakdown:
        return True
    (x_norm,) = operand.fetch_floats(x.norm())
    return not eps * outcome.a_norm * x_norm > _HONEST * (threshold if outcome.converged else outcome.residual_norm)
