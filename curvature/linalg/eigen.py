"""Extreme eigenpairs of a symmetric operator: thick-restart Lanczos, and power iteration for comparison."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_count, check_scalar
from ..sampling import probes, resolve_generator
from ._operand import CHECK_EVERY, Operand, until_check

__all__ = ["EigenResult", "eigenvalues"]

WHICH = ("largest", "smallest", "magnitude")
METHODS = ("lanczos", "power")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs found by :func:`eigenvalues`.

    Attributes:
        values: The ``k`` eigenvalues, float64, in the order asked for (``"largest"``: descending,
            ``"smallest"``: ascending, ``"magnitude"``: descending ``|λ|``).
        vectors: The unit eigenvectors as the columns of a ``(P, k)`` tensor in the operator's dtype.
        residuals: Residual norms ``‖A x_i − λ_i x_i‖`` (float64, ``(k,)``).
        num_matvecs: Products spent, including up to 10 dropped after the step that stopped the method, and
            as many after each invariant subspace (see :func:`eigenvalues`).
        converged: Whether every residual met the tolerance within the product budget.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool


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
    r"""Compute ``k`` extreme eigenpairs of a symmetric operator.

    ``method="lanczos"`` (default) runs thick-restart Lanczos (Wu & Simon 2000, SIAM J. Matrix Anal. Appl.
    22(2)) with full reorthogonalization: the basis holds at most ``num_vectors`` vectors; when it is full,
    the wanted Ritz vectors and the residual direction are kept and the process continues from them, so
    memory stays ``P · num_vectors`` whatever the number of products. A Ritz pair ``(θ_i, Q s_i)`` of
    ``T = Qᵀ A Q`` has the residual

    .. math::

        \| A Q s_i - \theta_i Q s_i \| = \beta_m \, |e_m^\top s_i|,

    which costs nothing to evaluate, so the process stops after the first step at which every wanted pair
    satisfies ``residual ≤ tol · |θ_i|``, or has reached rounding level, ``residual ≤ 100 ε ‖T‖`` (which
    matters only for eigenvalues near 0, such as the null space of a GGN). Since ``|θ_i − λ| ≤ residual``
    for some eigenvalue ``λ``, and ``≤ residual² / gap`` for an isolated one, the eigenvalue error is far
    below ``tol · |θ_i|``.

    ``method="power"`` runs block power (subspace) iteration with Rayleigh-Ritz, the method of PyHessian
    (Yao et al. 2020, arXiv:1912.07145) and much of the sharpness literature, with the same residual stop;
    it finds the eigenvalues of largest magnitude, so it accepts ``which="largest"`` only for operators known
    to be PSD. Its ``k`` columns are multiplied together (``op @ X``), but it needs many more products than
    Lanczos: its error shrinks like ``(λ_{k+1}/λ_k)^{2t}`` where Lanczos's shrinks like a Chebyshev
    polynomial in that ratio (Saad 2011, Numerical Methods for Large Eigenvalue Problems, ch. 6).

    When the Krylov space becomes invariant (``β = 0``), the search continues once from a random vector
    orthogonal to it: that finds further copies of a repeated eigenvalue, which a single Krylov space holds
    only once. Like every single-vector Krylov method it can still miss copies of a multiple eigenvalue
    (for instance the null space of a GGN asked for ``which="smallest"``), and with a basis barely larger
    than ``k`` it can settle on converged eigenpairs that are not the extreme ones (seen for
    ``which="magnitude"`` with ``num_vectors = k + 3``): keep ``num_vectors ≥ 2k``, as the default does.

    Convergence is tested every 8 steps (iterations for ``"power"``) to avoid a host synchronisation per
    product on GPUs: the steps run on the device, and the host reads their coefficients in one transfer after
    steps 1, 2, 3, 4, 6, 9, 13, 19, 27 and then every 8, and at each thick restart (up to 11 steps apart, so as
    not to check just before one). It then replays the steps one at a time, so the eigenpairs are those a
    test after every step gives; the steps run after the one that stopped, or that found an invariant space,
    are dropped: at most 10 products each time, which count in ``num_matvecs``. With ``num_vectors`` close
    to ``k``, restarts come every few steps, and with them the host reads. Power iteration does its
    Rayleigh-Ritz step at these checks only.

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``.
        k: The number of eigenpairs.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"`` (largest ``|λ|``).
        tol: The relative residual tolerance.
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
        ValueError: If ``k``, ``which``, ``method``, ``tol`` or ``num_vectors`` are out of range.

    Example:
        >>> A = torch.diag(torch.linspace(1, 30, 30, dtype=torch.float64))
        >>> result = eigenvalues(A, k=2, tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> result.values.round(decimals=8).tolist(), result.converged
        ([30.0, 29.0], True)
    """
    operand = Operand(op, deferred=True)
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
    if method == "power":
        if which == "smallest" or (which == "largest" and not operand.is_psd):
            raise ValueError(
                f'method="power" finds the eigenvalues of largest magnitude; which={which!r} needs '
                'method="lanczos" (or which="magnitude" to get what power iteration computes).'
            )
        result = _power(operand, k, tol, max_matvecs, generator, v0)
    else:
        result = _thick_restart_lanczos(operand, k, which, tol, max_matvecs, generator, v0, num_vectors)
    if not result.converged:
        warnings.warn(
            f"eigenvalues: {method} did not reach tol={tol:g} within max_matvecs={max_matvecs} products "
            f"(largest relative residual {_relative(result).max():.2e}); returning the current estimates. "
            "Raise max_matvecs or tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def _relative(result: EigenResult) -> torch.Tensor:
    return result.residuals / result.values.abs().clamp_min(1e-300)


def _order(values: torch.Tensor, which: str) -> torch.Tensor:
    """Indices sorting ``values`` so that the wanted ones come first."""
    if which == "largest":
        return torch.argsort(values, descending=True, stable=True)
    if which == "smallest":
        return torch.argsort(values, stable=True)
    return torch.argsort(values.abs(), descending=True, stable=True)


def _is_converged(
    residuals: torch.Tensor, values: torch.Tensor, tol: float, norm: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``residual ≤ max(tol · |θ|, 100 ε ‖T‖)`` for every pair (a bool tensor): relative, or at rounding level."""
    return (residuals <= (tol * values.abs()).clamp_min(100 * torch.finfo(dtype).eps * norm)).all()


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
    beta: torch.Tensor  # 0 when exhausted
    exhausted: torch.Tensor
    stop: torch.Tensor


def _thick_restart_lanczos(
    operand: Operand,
    k: int,
    which: str,
    tol: float,
    max_matvecs: int,
    generator: torch.Generator | None,
    v0: torch.Tensor | None,
    ncv: int,
) -> EigenResult:
    """Thick-restart Lanczos, expanding the basis by several steps on the device between two host checks.

    A step's product, reorthogonalization and normalization need nothing from the host. After a batch of
    steps (:func:`~curvature.linalg._operand.until_check`, never past a restart), their coefficients come to
    the host in one transfer, and the host replays the steps one by one exactly as a loop with a check per
    step would: Ritz values, convergence, invariant subspaces. At the first step where that loop would stop or
    continue from a fresh vector, the replay does so, and the steps computed after it are dropped (their
    products are counted, their vectors overwritten).
    """
    size, eps = operand.size, torch.finfo(operand.dtype).eps
    V = operand.zeros(size, ncv + 1)
    T = torch.zeros(ncv, ncv, dtype=torch.float64)
    start = v0 if v0 is not None else probes("gaussian", size, generator, operand.dtype, operand.device)
    V[:, 0] = start / start.norm()
    j = 0  # index of the vector to expand next; V[:, :j] and T[:j, :j] are in place
    keep = min(ncv - 1, k + (ncv - k) // 2)  # Ritz vectors kept at a restart
    norm = torch.zeros((), dtype=torch.float64)
    previous = None  # the wanted Ritz values at the last invariant subspace
    steps = 0  # steps taken in this call, dropped ones included
    while True:
        count = min(until_check(steps), ncv - j)
        if count == CHECK_EVERY and ncv - j - count < CHECK_EVERY // 2:
            count = ncv - j  # no check just before a restart, which needs one anyway
        count = min(count, max(1, max_matvecs - operand.num_matvecs))
        columns, betas = [], []
        for jj in range(j, j + count):
            w = operand @ V[:, jj]
            basis = V[:, : jj + 1]
            coef = basis.T @ w
            w = w - basis @ coef
            coef2 = basis.T @ w
            w = w - basis @ coef2
            beta = w.norm()
            columns.append((coef + coef2).double())
            betas.append(beta)
            V[:, jj + 1] = w / torch.where(beta > 0, beta, 1.0)  # replaced below if β is at rounding level
        steps += count
        *columns, betas = operand.fetch(*columns, torch.stack(betas))
        used = operand.num_matvecs - count
        replay = []
        for i, column in enumerate(columns):
            step = _replay(T, column, betas[i], norm, previous, k, which, tol, used + i + 1 >= max_matvecs,
                           size, eps, operand.dtype)
            norm = step.norm
            replay.append(step)
        flags = torch.stack([torch.stack([step.stop, step.exhausted]) for step in replay]).tolist()
        first = next((i for i, (stop, exhausted) in enumerate(flags) if stop or exhausted), len(flags) - 1)
        step, (stop, exhausted) = replay[first], flags[first]
        m, beta, wanted, norm = step.m, step.beta, step.wanted, step.norm  # the later steps are dropped
        if stop:
            vectors = V[:, :m] @ step.S[:, wanted].to(V)
            return _finish(operand, step.theta[wanted], vectors, step.residuals[wanted], tol, step.norm)
        if exhausted:
            # Continue from a random vector orthogonal to the invariant space, with coupling 0.
            previous = step.theta[wanted].clone() if m >= k else None
            w = probes("gaussian", size, generator, operand.dtype, operand.device)
            basis = V[:, :m]
            w = w - basis @ (basis.T @ w)
            w = w - basis @ (basis.T @ w)
            V[:, m] = w / w.norm()
        if m < ncv:
            T[m - 1, m] = T[m, m - 1] = beta
            j = m
            continue
        # Thick restart: keep the `keep` wanted Ritz vectors and the next direction (the residual, or the
        # fresh vector after an invariant space), coupled to them by β times the Ritz vectors' last entries.
        kept = step.order[:keep]
        V[:, :keep] = V[:, :m] @ step.S[:, kept].to(V)
        V[:, keep] = V[:, m]
        T.zero_()
        T[:keep, :keep] = torch.diag(step.theta[kept])
        T[keep, :keep] = T[:keep, keep] = beta * step.S[m - 1, kept]
        j = keep


def _replay(
    T: torch.Tensor,
    column: torch.Tensor,
    beta: torch.Tensor,
    norm: torch.Tensor,
    previous: torch.Tensor | None,
    k: int,
    which: str,
    tol: float,
    budget_spent: bool,
    size: int,
    eps: float,
    dtype: torch.dtype,
) -> _Step:
    """Enter a step's coefficients into ``T`` and decide on the host what a check after it would (no reads)."""
    m = column.numel()
    T[:m, m - 1] = column
    T[m - 1, :m] = column
    theta, S = torch.linalg.eigh(T[:m, :m])
    norm = torch.maximum(torch.maximum(norm, theta.abs().max()), beta)
    exhausted = (beta <= 100 * eps * norm) | (m == size)
    beta = torch.where(exhausted, 0.0, beta)
    order = _order(theta, which)
    residuals = beta * S[m - 1].abs()
    wanted = order[:k]
    no = torch.zeros((), dtype=torch.bool)
    if m < k:
        return _Step(m, theta, S, order, wanted, residuals, norm, beta, exhausted, no)
    done = _is_converged(residuals[wanted], theta[wanted], tol, norm, dtype)
    # An invariant Krylov space holds one copy of each eigenvalue it reaches. After the first one, look once
    # more from a random vector orthogonal to it (coupling 0): that finds further copies of repeated
    # eigenvalues and eigenvalues the start vector missed, and stop only when it changes nothing wanted.
    if m == size:
        settled = exhausted
    elif previous is not None:
        settled = exhausted & ((previous - theta[wanted]).abs() <= 64 * eps * norm).all()
    else:
        settled = no
    stop = (done & ~exhausted) | settled | budget_spent
    return _Step(m, theta, S, order, wanted, residuals, norm, beta, exhausted, stop)


def _finish(
    operand: Operand,
    values: torch.Tensor,
    vectors: torch.Tensor,
    residuals: torch.Tensor,
    tol: float,
    norm: torch.Tensor,
) -> EigenResult:
    converged = bool(_is_converged(residuals, values, tol, norm, operand.dtype))
    return EigenResult(
        values=values.clone(), vectors=vectors, residuals=residuals.clone(), num_matvecs=operand.num_matvecs,
        converged=converged,
    )


def _power(
    operand: Operand,
    k: int,
    tol: float,
    max_matvecs: int,
    generator: torch.Generator | None,
    v0: torch.Tensor | None,
) -> EigenResult:
    """Block power iteration; the Rayleigh-Ritz step and the convergence test run at the host checks only.

    Between checks the block is only multiplied and re-orthonormalized on the device. At a check, ``G = Xᵀ A X``
    and the Gram matrix of ``E = A X − X G`` come over in one transfer: the Ritz pairs are ``(θ_i, X s_i)``
    for the eigenpairs of ``G``, and their residuals ``‖A X s_i − θ_i X s_i‖ = ‖E s_i‖`` (as ``G s_i = θ_i s_i``).
    """
    X = probes("gaussian", (operand.size, k), generator, operand.dtype, operand.device)
    if v0 is not None:
        X[:, 0] = v0
    X = torch.linalg.qr(X).Q
    norm = torch.zeros((), dtype=torch.float64)
    iterations = 0
    while True:
        count = min(until_check(iterations), (max_matvecs - operand.num_matvecs) // k)
        for _ in range(count - 1):
            X = torch.linalg.qr(operand @ X).Q
        Y = operand @ X
        iterations += count
        G = X.T @ Y
        E = Y - X @ G
        G, gram = operand.fetch(G, E.T @ E)
        theta, S = torch.linalg.eigh(G)
        order = _order(theta, "magnitude")
        theta, S = theta[order], S[:, order]
        residuals = (S * (gram @ S)).sum(0).clamp_min(0).sqrt()
        norm = torch.maximum(norm, theta.abs().max())
        converged = bool(_is_converged(residuals, theta, tol, norm, operand.dtype))
        if converged or operand.num_matvecs + k > max_matvecs:
            return _finish(operand, theta, X @ S.to(X), residuals, tol, norm)
        X = torch.linalg.qr(Y).Q
