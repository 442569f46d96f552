"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, and power iteration for comparison."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_count, check_scalar
from ..sampling import resolve_generator
from ._bounds import _stall, _Verdict, _verdict
from ._gram_schmidt import orthogonalize
from ._operand import CHECK_EVERY, NOISE, WORK_NOISE, Operand, PrecisionWarning, until_check

__all__ = ["EigenResult", "eigenvalues"]

WHICH = ("largest", "smallest", "magnitude")
METHODS = ("lanczos", "power")
# The Ritz values' distance from the eigenvalues against the loss of symmetry of the computed projections
# (the largest antisymmetric part of a coefficient column): at most 3.4 measured over the registry in
# bfloat16 and float16; the products' rounding is taken as this multiple of it when that exceeds NOISE u ‖A‖
# (products noisier than their dtype, e.g. an operator that resamples at every product).
ASYMMETRY = 4.0


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs found by :func:`eigenvalues`.

    Attributes:
        values: The ``k`` eigenvalues, float64, in the order asked for (``"largest"``: descending,
            ``"smallest"``: ascending, ``"magnitude"``: descending ``|λ|``).
        vectors: The unit eigenvectors as the columns of a ``(P, k)`` tensor in the operator's dtype.
        residuals: Residual norms ``‖A x_i − λ_i x_i‖`` (float64, ``(k,)``) as the recurrence computes them
            (they fall below the rounding of the products, which ``error_bounds`` adds).
        num_matvecs: Products spent, including up to 10 dropped after the step that stopped the method, and
            as many after each invariant subspace (see :func:`eigenvalues`).
        converged: Whether every eigenvalue met the tolerance, ``error_bounds[i] ≤ tol · |values[i]|``, within
            the product budget, or is zero to the rounding of the products (see :func:`eigenvalues`).
        error_bounds: Bounds on ``|values[i] − λ|`` for the eigenvalue ``λ`` nearest each value (float64,
            ``(k,)``): the residual-and-gap bound plus the rounding of the products (see :func:`eigenvalues`).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    error_bounds: torch.Tensor


def eigenvalues(
    op: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    *,
    method: str = "lanczos",
    v0: torch.Tensor | None = None,
    num_vectors: int | None = None,
) -> EigenResult:
    r"""Compute ``k`` extreme eigenpairs of a symmetric operator, each to a relative error ``tol``.

    ``method="lanczos"`` (default) runs thick-restart Lanczos (Wu & Simon 2000, SIAM J. Matrix Anal. Appl.
    22(2)) with full reorthogonalization: the basis holds at most ``num_vectors`` vectors; when it is full,
    the wanted Ritz vectors and the residual direction are kept and the process continues from them, so
    memory stays ``P · num_vectors`` whatever the number of products. A Ritz pair ``(θ_i, Q s_i)`` of
    ``T = Qᵀ A Q`` has the residual

    .. math::

        r_i = \| A Q s_i - \theta_i Q s_i \| = \beta_m \, |e_m^\top s_i|,

    which costs nothing to evaluate.

    **What tol bounds.** ``tol`` bounds the relative error of each eigenvalue, not its residual: the method
    stops after the first step at which every wanted pair has ``error_bounds[i] ≤ tol · |θ_i|``, where
    ``error_bounds[i]`` bounds ``|θ_i − λ|`` for the eigenvalue ``λ`` of ``A`` nearest ``θ_i``. Some eigenvalue
    lies within the residual ``r_i`` of ``θ_i``; if the rest of the spectrum is at least ``δ_i > r_i`` away, that
    one lies within ``r_i² / δ_i`` (Kato-Temple: Kato 1949, J. Phys. Soc. Japan 4; Temple 1928; Parlett 1998,
    The Symmetric Eigenvalue Problem, SIAM, Thm. 11.7.1), so the eigenvalue error falls like the square of the
    residual. The gap is estimated from all Ritz values of the current projected matrix, not only the wanted
    ones, each of which has an eigenvalue within its own ``ρ_j`` (below): ``δ_i = min_{j≠i} (|θ_j − θ_i| −
    ρ_j)``. It is resolved, and the bound ``ρ_i² / δ_i`` used, only when ``δ_i > ρ_i`` and the neighbour ``θ_j``
    that sets it, and the nearest Ritz value on each side of ``θ_i``, have converged, ``r_j ≤ 0.01 |θ_j − θ_i|``
    (``RESOLVED``); until then the bound is the residual. The neighbours' convergence is the guard against an
    eigenvalue that the Krylov space has not found yet and that lies inside the estimated gap: without the
    gap-setting neighbour's, over the registry's Hessians and GGNs (every ``which``, ``k = 1, 3``, ``tol`` =
    1e-2, 1e-4, 1e-8) the bound fell below the true error in 36 of 648 runs, by up to 134 times (stopping after 3
    or 4 products), with ``0.1`` in 14, ``0.03`` in 2 and ``0.01`` in none; without the other side's, once, by
    1.3 times. Like every Krylov method, it still assumes that the Ritz values have not skipped an eigenvalue that
    the start vector barely touches, or further copies of a repeated one (see below). The eigenvectors are as
    accurate as ``r_i / δ_i``, far less than the eigenvalues: for an accurate eigenvector, ask a smaller tol.

    **Rounding.** The products are only as exact as the operator's dtype, and the recurrence's residuals fall
    far below their rounding, so the bound counts it: with ``η = max(8 u, 100 ε_w) ‖A‖``
    (``Operand.noise``: ``u`` the unit roundoff of the operator's dtype,
    ``ε_w`` the machine epsilon of the working precision, ``‖A‖`` estimated by the largest ``|θ|`` and ``β``),
    or 4 times the largest antisymmetric part of the computed projections ``Qᵀ A Q`` when that is larger (an
    operator noisier than its dtype, e.g. one that resamples at every product), and ``ρ_i = r_i + η``,

    .. math::

        \mathrm{error\_bounds}_i = \min\!\big(\rho_i,\ \rho_i^2 / \delta_i + \eta\big) \text{ (gap resolved)},
        \qquad \rho_i \text{ (otherwise)}.

    In float64 and float32 ``η`` is ``100 ε ‖A‖``, the rounding level used before; in float16 and bfloat16 it
    is ``8 u ‖A‖`` (0.4% and 3% of ``‖A‖``), whatever the working precision: the estimator works in float32
    (basis, reorthogonalization, Ritz values; ``Operand``), so the products are
    its only limit. Once a residual is below ``max(u, 100 ε_w) ‖A‖`` more steps cannot lower its bound: when
    every wanted pair has met ``tol`` or reached that level, the method stops. A pair that reached it without
    meeting ``tol`` had a ``tol · |θ_i|`` below what the products can certify: the result has
    ``converged=False`` and a ``RuntimeWarning`` names the dtype and the relative error that was certified
    (about 3e-2 in bfloat16 and 4e-3 in float16 for a well-separated ``λ_max``, 1e-5 ``‖A‖ / |θ|`` in
    float32). An eigenvalue that is zero to rounding, ``|θ_i| ≤ error_bounds[i]`` once its residual has
    stalled (the null space of a GGN), has no relative error to certify: it counts as converged, and
    ``error_bounds[i]`` is its absolute accuracy.

    The constants are measured (``benchmarks/precision.py``): over every Hessian and GGN of the registry,
    products in bfloat16 and float16 are within ``1.2 u ‖A‖ ‖v‖`` of the float64 ones, and the top Ritz
    values after 40 steps within ``1.7 u ‖A‖`` of the float64 eigenvalues (``4.2 u ‖A‖`` on a CNN trained on
    the digits); float64 Ritz values within ``24 u = 12 ε`` (27 ε on a dense ``300 × 300`` matrix after 8
    thick restarts).

    **Half precision is certified in float32.** ``η`` covers the rounding of a product, not a half-precision
    model that computes a different curvature: the registry's MLP trained to a loss of 1e-3 has a Hessian small
    next to the terms a half-precision forward pass rounds (softmax probabilities near 0 and 1), and the run
    above converged on its bfloat16 products to a ``λ_max`` 32% low with a bound of 2%. So when the operator
    offers its products in float32 (:meth:`curvature.LinearOperator.higher_precision`: every half-precision
    curvature operator does, by casting the model on the fly; a dense half-precision tensor is its own float32
    copy), each returned vector ``x`` is multiplied once more in float32 (``k`` products, counted in
    ``num_matvecs``), and the result is its Rayleigh quotient ``θ = xᵀAx`` with the bound
    ``‖A x − θ x‖ + 100 ε₃₂ ‖A‖`` (no gap: the half-precision Ritz values that would give one are what is in
    doubt). Against the exact curvature of the model as it is (its weights and data in the half dtype), the
    bounds then held in every case measured, the trained MLP included (errors of 2-3% within bounds of 14-16%),
    and the values are far better than the half-precision Ritz values (``λ_max`` within 3e-5 in bfloat16 and
    4e-7 in float16 on the registry's MLP and CNN). What a bfloat16 vector can certify is about
    ``u ‖A‖ / |θ|`` (3e-3 for those two ``λ_max``; 5e-4 in float16). Operators without a float32 view keep the
    half-precision bounds above.

    ``method="power"`` runs block power (subspace) iteration with Rayleigh-Ritz, the method of PyHessian
    (Yao et al. 2020, arXiv:1912.07145) and much of the sharpness literature, with the same bounds, its gaps
    taken among its ``k`` Ritz values and from the rest of the spectrum, which lies within ``|θ_k| + ρ_k``
    of zero (so the ``k``-th pair, and the single pair for ``k = 1``, has the residual bound only); it finds
    the eigenvalues of largest magnitude, so it accepts ``which="largest"`` only for operators known to be
    PSD. Its ``k`` columns are multiplied together (``op @ X``), but it needs many more products than
    Lanczos: its error shrinks like ``(λ_{k+1}/λ_k)^{2t}`` where Lanczos's shrinks like a Chebyshev
    polynomial in that ratio (Saad 2011, Numerical Methods for Large Eigenvalue Problems, ch. 6).

    When the Krylov space becomes invariant (``β`` at the rounding level of the products), the search
    continues once from a random vector orthogonal to it: that finds further copies of a repeated
    eigenvalue, which a single Krylov space holds only once. Like every single-vector Krylov method it can
    still miss copies of a multiple eigenvalue (for instance the null space of a GGN asked for
    ``which="smallest"``), and with a basis barely larger than ``k`` it can settle on converged eigenpairs
    that are not the extreme ones (seen for ``which="magnitude"`` with ``num_vectors = k + 3``): keep
    ``num_vectors ≥ 2k``, as the default does.

    Convergence is tested every 8 steps (iterations for ``"power"``) to avoid a host synchronisation per
    product on GPUs: the steps run on the device, and the host reads their coefficients in one transfer after
    steps 1 to 8, 10, 12, 15, 18, 22, 27, 33, 41 and then every 8, and at each thick restart (up to 11 steps
    apart, so as not to check just before one). It then replays the steps one at a time, so the eigenpairs are those a
    test after every step gives; the steps run after the one that stopped, or that found an invariant space,
    are dropped: at most 10 products each time, which count in ``num_matvecs``. With ``num_vectors`` close
    to ``k``, restarts come every few steps, and with them the host reads. Power iteration does its
    Rayleigh-Ritz step at these checks only.

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator
            (refused if flagged ``is_symmetric=False``), a dense tensor (refused unless symmetric to rounding,
            ``check_symmetric``), or any object with ``@`` (trusted).
        k: The number of eigenpairs.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"`` (largest ``|λ|``).
        tol: The relative error of each eigenvalue, ``error_bounds[i] ≤ tol · |values[i]|``.
        max_matvecs: A budget of products; when it runs out, the current estimates are returned with
            ``converged=False`` and a warning. Default ``max(1000, 30 · num_vectors)``.
        generator: The source of the random start vector(s); None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        method: ``"lanczos"`` or ``"power"``.
        v0: A start vector ``(P,)``, e.g. the previous top eigenvector when tracking sharpness during
            training; ``"power"`` uses it as the first column.
        num_vectors: Lanczos basis size (``ncv`` in ARPACK); default ``min(P, max(2k + 1, 20))``.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: If ``k``, ``which``, ``method``, ``tol`` or ``num_vectors`` are out of range, or ``op``
            is not symmetric.

    Warns:
        RuntimeWarning: When the budget runs out.
        PrecisionWarning: When ``tol`` is below what the products can certify (a ``RuntimeWarning`` subclass,
            :class:`~curvature.linalg._operand.PrecisionWarning`).

    Example:
        >>> A = torch.diag(torch.linspace(1, 30, 30, dtype=torch.float64))
        >>> result = eigenvalues(A, k=2, tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> result.values.round(decimals=6).tolist(), result.converged
        ([30.0, 29.0], True)
        >>> bool((result.error_bounds <= 1e-8 * result.values.abs()).all())
        True
    """
    operand = Operand(op, deferred=True)
    tol, max_matvecs, generator, v0, num_vectors = _checked_arguments(
        operand, k, which, tol, max_matvecs, generator, method, v0, num_vectors
    )
    if method == "power":
        result, achievable = _power(operand, k, tol, max_matvecs, generator, v0)
    else:
        result, achievable = _thick_restart_lanczos(operand, k, which, tol, max_matvecs, generator, v0, num_vectors)
    result, achievable = _certified_in_float32(operand, result, achievable, which, tol)
    if not result.converged:
        message, category = _not_converged(operand, result, achievable, tol, method, max_matvecs)
        warnings.warn(message, category, stacklevel=2)
    return result


def _checked_arguments(
    operand: Operand, k: int, which: str, tol: float, max_matvecs: int | None, generator: torch.Generator | None,
    method: str, v0: torch.Tensor | None, num_vectors: int | None,
) -> tuple[float, int, torch.Generator, torch.Tensor | None, int]:
    """:func:`eigenvalues`' arguments checked, in their order, with the defaults filled in.

    Returns ``(tol, max_matvecs, generator, v0, num_vectors)``; raises what :func:`eigenvalues` documents.
    """
    check_count(k, "k")
    if k > operand.size:
        raise ValueError(f"k={k} exceeds the operator's size {operand.size}.")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    tol = check_scalar(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}; for machine precision use e.g. 1e-12.")
    generator = resolve_generator(generator)
    if v0 is not None:
        v0 = operand.check_vector(v0, "v0")
        if not bool(v0.any()):
            raise ValueError("v0 is zero; pass a nonzero start vector or None.")
    if num_vectors is None:
        num_vectors = min(operand.size, max(2 * k + 1, 20))
    check_count(num_vectors, "num_vectors")
    if method == "lanczos" and not (k < num_vectors <= operand.size or k == num_vectors == operand.size):
        raise ValueError(
            f"num_vectors={num_vectors} must exceed k={k} and be at most the operator's size {operand.size}."
        )
    if max_matvecs is None:
        max_matvecs = max(1000, 30 * num_vectors)
    check_count(max_matvecs, "max_matvecs", minimum=k)
    if method == "power" and (which == "smallest" or (which == "largest" and not operand.is_psd)):
        raise ValueError(
            f'method="power" finds the eigenvalues of largest magnitude; which={which!r} needs '
            'method="lanczos" (or which="magnitude" to get what power iteration computes).'
        )
    return tol, max_matvecs, generator, v0, num_vectors


def _certified_in_float32(operand: Operand, result: EigenResult, achievable: float, which: str,
                          tol: float) -> tuple[EigenResult, float]:
    """The result certified with float32 products where the operator offers them (:func:`_certify`), else as is.

    A model that cannot run in float32 keeps the half-precision result, with a warning.
    """
    refined = operand.refined()
    if refined is None:  # products in float32 or float64: nothing to certify
        return result, achievable
    try:
        return _certify(operand, refined, result, achievable, which, tol)
    except (RuntimeError, ValueError, TypeError) as error:  # a model that cannot run in float32
        warnings.warn(
            f"eigenvalues: the float32 products that certify a {str(operand.dtype).replace('torch.', '')} "
            f"result failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); the bounds assume "
            "the half-precision products accurate to 8 u ‖A‖, which a model near a minimum can violate.",
            RuntimeWarning, stacklevel=3,
        )
        return result, achievable


def _not_converged(operand: Operand, result: EigenResult, achievable: float, tol: float, method: str,
                   max_matvecs: int) -> tuple[str, type[Warning]]:
    """The warning for a result short of ``tol``: its message and category.

    A :class:`~curvature.linalg._operand.PrecisionWarning` when ``tol`` is below what the products can certify
    (``achievable > tol``), else a ``RuntimeWarning``: the budget ran out.
    """
    if achievable > tol:
        message = (
            f"tol={tol:g} is below what {str(operand.dtype).replace('torch.', '')} products can certify "
            f"here (about {achievable:.0e} relative error"
        )
        if operand.dtype in (torch.float16, torch.bfloat16):
            message += f", their rounding is about {NOISE * operand.unit_roundoff:.0e} of ‖A‖"
        higher = "float32" if operand.dtype in (torch.float16, torch.bfloat16) else "float64"
        message += (
            f"): returning converged=False. Compute in {higher} or pass tol>={achievable:.0e} "
            "(see the eigenvalues docstring, 'Rounding')."
        )
        return message, PrecisionWarning
    message = (
        f"eigenvalues: {method} did not reach tol={tol:g} within max_matvecs={max_matvecs} products "
        f"(largest relative error bound {_relative(result).max():.2e}); returning the current "
        "estimates. Raise max_matvecs or tol."
    )
    return message, RuntimeWarning


def _certify(operand: Operand, refined: Any, result: EigenResult, achievable: float, which: str,
             tol: float) -> tuple[EigenResult, float]:
    r"""Certify half-precision eigenpairs with ``k`` float32 products: Rayleigh quotients and residual bounds.

    The bounds of the half-precision run assume that its products are the operator's to ``8 u ‖A‖``. That holds
    for the rounding of a product, not for a model whose half-precision forward pass computes a different
    function (near a minimum, where the probabilities the curvature depends on round to 0 and 1): there the
    run converges, with small bounds, to the eigenvalues of the wrong matrix (measured: 32% off with a bound of
    2%). So each returned vector ``x`` is multiplied once more by the float32 view of the operator
    (:meth:`~curvature.linalg._operand.Operand.refined`), and the result is the Rayleigh-Ritz pairs of the
    operator on their span (for ``k = 1``, the Rayleigh quotient ``θ = xᵀ A x``) with the bounds
    ``‖A x − θ x‖ + 100 ε₃₂ ‖A‖`` (some eigenvalue lies within the residual of ``θ``; no gap is used, since the
    half-precision Ritz values that would give it are what is in doubt). An eigenvalue is zero to rounding when
    ``|θ|`` is within its bound and the bound within ``8 u ‖A‖``.

    Returns the certified result and the relative error certified where ``tol`` was missed (the argument
    ``achievable`` kept when the run ran out of its budget instead).
    """
    Q = torch.linalg.qr(result.vectors.to(operand.work_dtype)).Q  # the span of the half-precision vectors
    Y = operand.refined_product(refined, Q)
    (G,) = operand.fetch(Q.T @ Y)  # Rayleigh-Ritz on the span, with float32 products
    theta, S = torch.linalg.eigh((G + G.T) / 2)
    S_work, theta_work = S.to(Q), theta.to(Q)
    vectors = Q @ S_work
    # The residual vectors themselves (a norm of a difference in float32, not √(sᵀYᵀYs − θ²), which cancels)
    (residual,) = operand.fetch((Y @ S_work - vectors * theta_work).norm(dim=0))
    vectors = vectors.to(operand.dtype)
    norm = torch.maximum(theta.abs().max(), result.values.abs().max())
    bounds = residual + WORK_NOISE * torch.finfo(torch.float32).eps * norm
    met = bounds <= tol * theta.abs()
    zero = (theta.abs() <= bounds) & (bounds <= operand.noise(norm))
    missed = ~(met | zero)
    order = _order(theta, which)
    certified = EigenResult(
        values=theta[order], vectors=vectors[:, order], residuals=residual[order],
        num_matvecs=operand.num_matvecs, converged=not bool(missed.any()), error_bounds=bounds[order],
    )
    ran_out = not result.converged and achievable <= tol  # the budget, not the precision, stopped the run
    certified_error = float(torch.where(missed, bounds / theta.abs().clamp_min(1e-300), 0.0).max())
    return certified, (achievable if ran_out else certified_error)


def _relative(result: EigenResult) -> torch.Tensor:
    return result.error_bounds / result.values.abs().clamp_min(1e-300)


def _order(values: torch.Tensor, which: str) -> torch.Tensor:
    """Indices sorting ``values`` so that the wanted ones come first."""
    if which == "largest":
        return torch.argsort(values, descending=True, stable=True)
    if which == "smallest":
        return torch.argsort(values, stable=True)
    return torch.argsort(values.abs(), descending=True, stable=True)


@dataclass
class _Step:
    """What the host knows after Lanczos step ``m``, as the loop of :func:`_thick_restart_lanczos` used it."""

    m: int
    theta: torch.Tensor
    S: torch.Tensor
    order: torch.Tensor
    wanted: torch.Tensor
    residuals: torch.Tensor
    norm: torch.Tensor
    asymmetry: torch.Tensor  # the largest antisymmetric part of a coefficient column so far
    verdict: _Verdict | None  # None before k steps
    beta: torch.Tensor  # 0 when exhausted
    exhausted: torch.Tensor
    stop: torch.Tensor

    def wanted_and_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The wanted Ritz values and their bounds (copies), what the next step's settled test compares with."""
        return (self.theta[self.wanted].clone(), self.verdict.bounds.clone()) if self.verdict else None


def _thick_restart_lanczos(
    operand: Operand,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    generator: torch.Generator | None,
    v0: torch.Tensor | None,
    ncv: int,
) -> tuple[EigenResult, float]:
    """Thick-restart Lanczos, expanding the basis by several steps on the device between two host checks.

    A step's product, reorthogonalization and normalization need nothing from the host; they run in the
    working precision (:class:`~curvature.linalg._operand.Operand`). After a batch of steps
    (:func:`~curvature.linalg._operand.until_check`, never past a restart), their coefficients come to
    the host in one transfer, and the host replays the steps one by one exactly as a loop with a check per
    step would: Ritz values, bounds, invariant subspaces. At the first step where that loop would stop or
    continue from a fresh vector, the replay does so, and the steps computed after it are dropped (their
    products are counted, their vectors overwritten).

    Returns the result and the relative error that the bounds could certify for the pairs that missed ``tol``
    at rounding level (0 when none did).
    """
    run = _ThickRestart(operand, k, which, tol, max_matvecs, generator, v0, ncv)
    while True:
        count = _batch_size(run.steps, ncv - run.j, max_matvecs - operand.num_matvecs)
        step, stop, exhausted = run.replay(*run.expand(count))
        if stop:
            return run.result(step)
        run.go_on(step, exhausted)


def _batch_size(steps: int, room: int, budget: int) -> int:
    """The number of steps to run before the next host check.

    What :func:`~curvature.linalg._operand.until_check` allows after ``steps`` steps, never past a restart
    (``room``: the vectors the basis has left); a full batch that would leave less than half a batch before
    the restart runs on to it instead (the restart reads the host anyway). At most the ``budget`` of products
    left, but at least one.
    """
    count = min(until_check(steps), room)
    if count == CHECK_EVERY and room - count < CHECK_EVERY // 2:
        count = room  # no check just before a restart, which needs one anyway
    return min(count, max(1, budget))


class _ThickRestart:
    """The state of thick-restart Lanczos between two host checks, and the moves of its loop.

    Attributes:
        V: The basis, ``(P, ncv + 1)`` in the working precision; ``V[:, :j + 1]`` is in place.
        T: The projected matrix ``Vᵀ A V`` as the replay knows it, ``(ncv, ncv)`` float64 on the host;
            ``T[:j, :j]`` and the coupling of ``V[:, j]`` to it are in place.
        j: The index of the vector to expand next.
        keep: The number of Ritz vectors kept at a restart.
        steps: The steps taken, dropped ones included (the host checks are spaced by this count).
        norm: The running estimate of ``‖A‖``: the largest ``|θ|`` and ``β`` so far.
        asymmetry: The largest antisymmetric part of a coefficient column so far (the products' measured noise).
        previous: The wanted Ritz values at the last invariant subspace; None before one.
        last: The wanted Ritz values and their bounds at the step before (for the settled test of the gap
            bound, :func:`_verdict`); None before ``k`` steps.
    """

    def __init__(self, operand: Operand, k: int, which: str, tol: float, max_matvecs: int,
                 generator: torch.Generator | None, v0: torch.Tensor | None, ncv: int) -> None:
        self.operand, self.k, self.which, self.tol, self.max_matvecs = operand, k, which, tol, max_matvecs
        self.generator, self.ncv = generator, ncv
        self.V = operand.zeros(operand.size, ncv + 1)
        self.T = torch.zeros(ncv, ncv, dtype=torch.float64)
        start = operand.work(v0) if v0 is not None else operand.probes("gaussian", operand.size, generator)
        self.V[:, 0] = start / start.norm()
        self.j = 0
        self.keep = min(ncv - 1, k + (ncv - k) // 2)
        self.norm = torch.zeros((), dtype=torch.float64)
        self.asymmetry = torch.zeros((), dtype=torch.float64)
        self.previous: torch.Tensor | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps = 0

    def expand(self, count: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run ``count`` Lanczos steps on the device from ``V[:, j]``; return their coefficients, read in one transfer.

        Each step orthogonalizes ``A v_j`` against the whole basis (:func:`orthogonalize`, twice) and normalizes
        it into ``V[:, j + 1]``; its column of coefficients ``Vᵀ A v_j`` (float64) and its ``β`` come to the
        host together with those of the other steps.
        """
        columns, betas = [], []
        for jj in range(self.j, self.j + count):
            w, coef = orthogonalize(self.V[:, : jj + 1], self.operand @ self.V[:, jj])
            beta = w.norm()
            columns.append(coef.double())
            betas.append(beta)
            self.V[:, jj + 1] = w / torch.where(beta > 0, beta, 1.0)  # replaced below if β is at rounding level
        self.steps += count
        *columns, betas = self.operand.fetch(*columns, torch.stack(betas))
        return columns, betas

    def replay(self, columns: list[torch.Tensor], betas: torch.Tensor) -> tuple[_Step, bool, bool]:
        """Replay a batch of steps on the host as a check after each would (:func:`_replay`).

        Returns the first step at which that loop would stop or find an invariant space (the last one when
        none does), with those two flags; the steps after it are dropped from ``T`` (their products stay
        counted, their vectors are overwritten).
        """
        used = self.operand.num_matvecs - len(columns)
        replay = []
        for i, column in enumerate(columns):
            step = _replay(self.operand, self.T, column, betas[i], self.norm, self.asymmetry, self.previous,
                           self.last, self.k, self.which, self.tol, used + i + 1 >= self.max_matvecs, self.ncv)
            self.norm, self.asymmetry, self.last = step.norm, step.asymmetry, step.wanted_and_bounds()
            replay.append(step)
        flags = torch.stack([torch.stack([step.stop, step.exhausted]) for step in replay]).tolist()
        first = next((i for i, (stop, exhausted) in enumerate(flags) if stop or exhausted), len(flags) - 1)
        step, (stop, exhausted) = replay[first], flags[first]
        # The later steps are dropped: the next step, m + 1, compares with this one.
        self.norm, self.asymmetry, self.last = step.norm, step.asymmetry, step.wanted_and_bounds()
        self.T[step.m :, :] = 0.0
        self.T[:, step.m :] = 0.0
        return step, stop, exhausted

    def result(self, step: _Step) -> tuple[EigenResult, float]:
        """The wanted Ritz pairs of ``step`` and the relative error certified where ``tol`` was missed."""
        vectors = self.V[:, : step.m] @ step.S[:, step.wanted].to(self.V)
        verdict = step.verdict
        result = EigenResult(
            values=step.theta[step.wanted].clone(), vectors=vectors.to(self.operand.dtype),
            residuals=step.residuals[step.wanted].clone(), num_matvecs=self.operand.num_matvecs,
            converged=bool(verdict.done), error_bounds=verdict.bounds.clone(),
        )
        return result, float(verdict.achievable)

    def go_on(self, step: _Step, exhausted: bool) -> None:
        """Continue after ``step``: from a fresh vector when its space is invariant; restart when the basis is full."""
        m = step.m
        if exhausted:
            self.previous = step.theta[step.wanted].clone() if m >= self.k else None
            self._fresh_start(m)
        if m < self.ncv:
            self.T[m - 1, m] = self.T[m, m - 1] = step.beta
            self.j = m
        else:
            self._restart(step)

    def _fresh_start(self, m: int) -> None:
        """Put a random unit vector orthogonal to the invariant space ``V[:, :m]`` in ``V[:, m]`` (coupling 0)."""
        w, _ = orthogonalize(self.V[:, :m], self.operand.probes("gaussian", self.operand.size, self.generator))
        self.V[:, m] = w / w.norm()

    def _restart(self, step: _Step) -> None:
        """Thick restart (Wu & Simon 2000): keep the ``keep`` wanted Ritz vectors and the next direction.

        The next direction is ``V[:, m]``, the residual or the fresh vector after an invariant space; it is
        coupled to the kept Ritz vectors by ``β`` times their last entries, and ``T`` becomes the arrowhead
        ``diag(θ_kept)`` bordered by those couplings.
        """
        m, keep, kept = step.m, self.keep, step.order[: self.keep]
        self.V[:, :keep] = self.V[:, :m] @ step.S[:, kept].to(self.V)
        self.V[:, keep] = self.V[:, m]
        self.T.zero_()
        self.T[:keep, :keep] = torch.diag(step.theta[kept])
        self.T[keep, :keep] = self.T[:keep, keep] = step.beta * step.S[m - 1, kept]
        self.j = keep


def _replay(
    operand: Operand,
    T: torch.Tensor,
    column: torch.Tensor,
    beta: torch.Tensor,
    norm: torch.Tensor,
    asymmetry: torch.Tensor,
    previous: torch.Tensor | None,
    last: tuple[torch.Tensor, torch.Tensor] | None,
    k: int,
    which: str,
    tol: float,
    budget_spent: bool,
    ncv: int,
) -> _Step:
    """Enter a step's coefficients into ``T`` and decide on the host what a check after it would (no reads).

    ``T[:m-1, m-1]`` holds what the new column should be (``β`` of the previous step, the couplings after a
    restart, zeros above): the difference is rounding of the products and of the projection, the measured
    part of their noise. The step's ``β`` is entered below the column for the next step to compare with.
    """
    m = column.numel()
    asymmetry = torch.maximum(asymmetry, (column[: m - 1] - T[: m - 1, m - 1]).norm())
    T[:m, m - 1] = column
    T[m - 1, :m] = column
    theta, S = torch.linalg.eigh(T[:m, :m])
    norm = torch.maximum(torch.maximum(norm, theta.abs().max()), beta)
    eta = torch.maximum(operand.noise(norm), ASYMMETRY * asymmetry)  # the products' rounding
    stall = _stall(operand, norm)
    exhausted = (beta <= operand.noise(norm)) | (m == operand.size)
    beta = torch.where(exhausted, 0.0, beta)
    if m < ncv:
        T[m - 1, m] = T[m, m - 1] = beta
    order = _order(theta, which)
    residuals = beta * S[m - 1].abs()
    wanted = order[:k]
    no = torch.zeros((), dtype=torch.bool)
    if m < k:
        return _Step(m, theta, S, order, wanted, residuals, norm, asymmetry, None, beta, exhausted, no)
    verdict = _verdict(theta, residuals, wanted, tol, eta, stall, last=last)
    # An invariant Krylov space holds one copy of each eigenvalue it reaches. After the first one, look once
    # more from a random vector orthogonal to it (coupling 0): that finds further copies of repeated
    # eigenvalues and eigenvalues the start vector missed, and stop only when it changes nothing wanted.
    if m == operand.size:
        settled = exhausted
    elif previous is not None:
        settled = exhausted & ((previous - theta[wanted]).abs() <= eta).all()
    else:
        settled = no
    stop = (verdict.stalled & ~exhausted) | settled | budget_spent
    return _Step(m, theta, S, order, wanted, residuals, norm, asymmetry, verdict, beta, exhausted, stop)


def _power(
    operand: Operand,
    k: int,
    tol: float,
    max_matvecs: int,
    generator: torch.Generator | None,
    v0: torch.Tensor | None,
) -> tuple[EigenResult, float]:
    """Block power iteration; the Rayleigh-Ritz step and the convergence test run at the host checks only.

    Between checks the block is only multiplied and re-orthonormalized on the device. At a check, ``G = Xᵀ A X``
    and the Gram matrix of ``E = A X − X G`` come over in one transfer: the Ritz pairs are ``(θ_i, X s_i)``
    for the eigenpairs of ``G`` (symmetrized; its antisymmetric part measures the products' noise), and their
    residuals ``‖A X s_i − θ_i X s_i‖ = ‖E s_i‖`` (as ``G s_i = θ_i s_i``).
    """
    X = operand.probes("gaussian", (operand.size, k), generator)
    if v0 is not None:
        X[:, 0] = operand.work(v0)
    X = torch.linalg.qr(X).Q
    norm = torch.zeros((), dtype=torch.float64)
    asymmetry = torch.zeros((), dtype=torch.float64)
    iterations = 0
    last = None  # the Ritz values at the previous check (for the settled test of the gap bound)
    while True:
        count = min(until_check(iterations), (max_matvecs - operand.num_matvecs) // k)
        for _ in range(count - 1):
            X = torch.linalg.qr(operand @ X).Q
        Y = operand @ X
        iterations += count
        G = X.T @ Y
        E = Y - X @ (G + G.T) / 2
        G, gram = operand.fetch(G, E.T @ E)
        asymmetry = torch.maximum(asymmetry, (G - G.T).norm() / math.sqrt(2))
        theta, S = torch.linalg.eigh((G + G.T) / 2)
        order = _order(theta, "magnitude")
        theta, S = theta[order], S[:, order]
        residuals = (S * (gram @ S)).sum(0).clamp_min(0).sqrt()
        norm = torch.maximum(norm, theta.abs().max())
        eta = torch.maximum(operand.noise(norm), ASYMMETRY * asymmetry)
        stall = _stall(operand, norm)
        wanted = torch.arange(k)
        verdict = _verdict(theta, residuals, wanted, tol, eta, stall, outside=theta[-1].abs() + residuals[-1] + eta,
                           last=last)
        last = (theta[wanted], verdict.bounds)
        stop, achievable = torch.stack([verdict.stalled.double(), verdict.achievable]).tolist()  # host tensors
        if stop or operand.num_matvecs + k > max_matvecs:
            result = EigenResult(
                values=theta, vectors=(X @ S.to(X)).to(operand.dtype), residuals=residuals,
                num_matvecs=operand.num_matvecs, converged=bool(verdict.done), error_bounds=verdict.bounds,
            )
            return result, achievable
        X = torch.linalg.qr(Y).Q
