"""Lanczos tridiagonalization with full reorthogonalization.

The Lanczos process (Lanczos 1950) builds an orthonormal basis ``Q = [q_1, ..., q_m]`` of the Krylov space
``span{v, A v, ..., A^{m-1} v}`` and the tridiagonal matrix ``T = Qᵀ A Q``. In floating point the basis
loses orthogonality as soon as a Ritz value converges, and the plain three-term recurrence then produces
spurious copies ("ghosts") of converged eigenvalues (Paige 1971). Here every new vector is orthogonalized
against the whole basis, twice (classical Gram-Schmidt with one reorthogonalization: "twice is enough",
Giraud et al. 2005), so ``Q`` is orthonormal to working precision and ``T`` has no ghosts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_count
from ..sampling import probes, resolve_generator
from ._operand import Operand

__all__ = ["LanczosResult", "lanczos"]


@dataclass(frozen=True)
class LanczosResult:
    """The output of :func:`lanczos`.

    Attributes:
        alpha: Diagonal of ``T``, shape ``(m,)``, float64.
        beta: Off-diagonal of ``T``, shape ``(m - 1,)``, float64.
        residual_norm: ``β_m = ‖A q_m − α_m q_m − β_{m−1} q_{m−1}‖``, the size of the part of ``A q_m``
            outside the basis (0 when the Krylov space is invariant).
        basis: The orthonormal basis ``Q`` of shape ``(P, m)`` in the operator's dtype, or None when not kept.
        num_matvecs: Products spent (``m``).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    residual_norm: float
    basis: torch.Tensor | None
    num_matvecs: int

    @property
    def num_steps(self) -> int:
        """The number of steps taken, ``m`` (fewer than asked when an invariant subspace was found)."""
        return int(self.alpha.numel())

    def tridiagonal(self) -> torch.Tensor:
        """Return the dense ``(m, m)`` tridiagonal matrix ``T = Qᵀ A Q`` (float64)."""
        return _tridiagonal(self.alpha, self.beta)


def lanczos(
    op: Any,
    num_steps: int,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    keep_basis: bool = True,
) -> LanczosResult:
    r"""Run ``num_steps`` Lanczos steps with full reorthogonalization.

    .. math::

        A Q_m = Q_m T_m + \beta_m q_{m+1} e_m^\top, \qquad Q_m^\top Q_m = I, \qquad
        T_m = \operatorname{tridiag}(\beta, \alpha, \beta)

    The eigenvalues of ``T_m`` (Ritz values) approximate the extreme eigenvalues of ``A``, and
    ``(e_1ᵀ U)²`` over its eigenvectors ``U`` are the Gauss quadrature weights of the spectral measure of
    ``A`` seen from ``v0`` (the basis of stochastic Lanczos quadrature, Golub & Meurant 2010). The
    process stops early when ``β`` vanishes (the Krylov space is invariant, so every Ritz value is an exact
    eigenvalue).

    Cost: one product per step, ``O(P m²)`` flops and ``P m`` memory for the reorthogonalization.

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device`` (a curvature operator
            or a dense tensor).
        num_steps: The largest number of steps ``m``; at most ``P``.
        v0: The start vector ``(P,)``; None draws a Gaussian one from ``generator``.
        generator: The source of the random start vector; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        keep_basis: Return the basis ``Q`` (needed for Ritz vectors); False frees it at the end.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: If ``num_steps`` is out of range or ``v0`` is zero or does not match ``op``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> result = lanczos(A, num_steps=5, generator=torch.Generator().manual_seed(0))
        >>> torch.linalg.eigvalsh(result.tridiagonal()).round(decimals=10).tolist()
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    operand = Operand(op)
    check_count(num_steps, "num_steps")
    if num_steps > operand.size:
        raise ValueError(f"num_steps={num_steps} exceeds the operator's size {operand.size}; use at most that.")
    generator = resolve_generator(generator)
    if v0 is None:
        start = probes("gaussian", (operand.size, 1), generator, operand.dtype, operand.device)
    else:
        start = operand.check_vector(v0, "v0").unsqueeze(1)
    run = lanczos_many(operand, start, num_steps)
    m = int(run.lengths[0])
    return LanczosResult(
        alpha=run.alpha[0, :m].clone(),
        beta=run.beta[0, : m - 1].clone(),
        residual_norm=float(run.beta[0, m - 1]),
        basis=run.basis[0, :m].T.contiguous() if keep_basis else None,
        num_matvecs=operand.num_matvecs,
    )


@dataclass(frozen=True)
class _Many:
    alpha: torch.Tensor  # (b, m) float64
    beta: torch.Tensor  # (b, m) float64: beta[:, j] couples steps j and j + 1; beta[:, len - 1] is the residual
    lengths: list[int]  # steps taken per start vector
    basis: torch.Tensor  # (b, m, P)


def lanczos_many(operand: Operand, V0: torch.Tensor, num_steps: int) -> _Many:
    """Run independent Lanczos processes from the columns of ``V0`` in lockstep.

    Each step multiplies the still-active columns together (one ``op @ V`` of ``b`` columns, which the
    curvature operators evaluate in one vectorized pass); a process whose ``β`` vanishes stops and takes no
    further products.

    Args:
        operand: The validated operator.
        V0: Start vectors ``(P, b)``, each nonzero.
        num_steps: Steps per process, at most ``P``.

    Returns:
        The per-process coefficients, lengths and bases.
    """
    size, b = V0.shape
    norms = V0.norm(dim=0)
    if bool((norms == 0).any()):
        raise ValueError("the Lanczos start vector is zero; pass a nonzero v0.")
    eps = torch.finfo(operand.dtype).eps
    # One contiguous (m, P) basis per process, so that the reorthogonalization is two batched matrix
    # products over the processes (no copy of the basis while every process is active).
    basis = V0.new_zeros(b, num_steps, size)
    basis[:, 0] = (V0 / norms).T
    alpha = torch.zeros(b, num_steps, dtype=torch.float64)
    beta = torch.zeros(b, num_steps, dtype=torch.float64)
    lengths = [num_steps] * b
    active = list(range(b))
    scale = torch.zeros(b, dtype=torch.float64)  # running estimate of ‖T‖ per process
    for j in range(num_steps):
        if len(active) == b:
            Q = basis[:, : j + 1]  # (a, j + 1, P), a view
        else:
            Q = basis[torch.tensor(active, device=V0.device), : j + 1]
        W = (operand @ Q[:, j].T).T.unsqueeze(2)  # (a, P, 1)
        # Classical Gram-Schmidt against the whole basis, twice.
        coef = torch.bmm(Q, W)
        W = W - torch.bmm(Q.transpose(1, 2), coef)
        coef2 = torch.bmm(Q, W)
        W = W - torch.bmm(Q.transpose(1, 2), coef2)
        W = W.squeeze(2)  # (a, P)
        a_j = (coef[:, j, 0] + coef2[:, j, 0]).double().cpu()
        b_j = W.norm(dim=1).double().cpu()
        still = []
        for row, proc in enumerate(active):
            alpha[proc, j] = a_j[row]
            beta[proc, j] = b_j[row]
            scale[proc] = max(float(scale[proc]), abs(float(a_j[row])), float(b_j[row]))
            invariant = float(b_j[row]) <= 100 * eps * float(scale[proc])
            if invariant or j + 1 == num_steps or j + 1 == size:
                lengths[proc] = j + 1
                if invariant or j + 1 == size:
                    beta[proc, j] = 0.0
            else:
                still.append((row, proc))
        if not still:
            break
        rows = torch.tensor([r for r, _ in still], device=V0.device)
        procs = torch.tensor([p for _, p in still], device=V0.device)
        basis[procs, j + 1] = W[rows] / W[rows].norm(dim=1, keepdim=True)
        active = [p for _, p in still]
    return _Many(alpha=alpha, beta=beta, lengths=lengths, basis=basis)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T
