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
from ..sampling import resolve_generator
from ._gram_schmidt import orthogonalize
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
        num_matvecs: Products that entered the result (``m``). When an invariant subspace ends the process
            early, the operator is still applied to a zero vector for the remaining steps, so that no step
            waits for the host; its own counter shows those products too.
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
    process ends early when ``β`` vanishes (the Krylov space is invariant, so every Ritz value is an exact
    eigenvalue): when ``β ≤ η``, the rounding level of the products, ``η = max(8 u, 100 ε_w) ‖T‖``
    (``Operand.noise``; ``u`` the unit roundoff of the operator's dtype,
    ``ε_w`` the machine epsilon of the working precision).

    Precision: the basis, the reorthogonalization and the coefficients are computed in the working precision,
    at least float32 (``Operand``); only the products run in the operator's
    dtype. For a float16 or bfloat16 operator the invariant-subspace test is therefore ``β ≤ 8 u ‖T‖``, what
    the products can resolve (it was ``100 ε`` of the half dtype, 0.8 ``‖T‖`` in bfloat16: every process
    "ended" after one step), and the Ritz values are as exact as the products (within ``2 u ‖A‖`` of the
    float64 eigenvalues on the registry's models, ``benchmarks/precision.py``). The basis is returned rounded
    to the operator's dtype.

    Cost: one product per step, ``O(P m²)`` flops and ``P m`` memory for the reorthogonalization. No step
    reads a value on the host: the test for an invariant subspace runs on the operator's device, and the
    coefficients come to the host in one transfer at the end. After an invariant subspace the remaining
    steps multiply a zero vector, up to the next check after step 8, 16, 32, ... (one flag read each), where
    the run stops: at most half of the products are wasted, and a GPU waits for the host a logarithmic
    number of times.

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator
            (refused if flagged ``is_symmetric=False``), a dense tensor (refused unless symmetric to rounding,
            ``check_symmetric``), or any object with ``@`` (trusted).
        num_steps: The largest number of steps ``m``; at most ``P``.
        v0: The start vector ``(P,)``; None draws a Gaussian one from ``generator``.
        generator: The source of the random start vector; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        keep_basis: Return the basis ``Q`` (needed for Ritz vectors); False frees it at the end.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: If ``num_steps`` is out of range, ``v0`` is zero or does not match ``op``, or ``op`` is not
            symmetric.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> result = lanczos(A, num_steps=5, generator=torch.Generator().manual_seed(0))
        >>> torch.linalg.eigvalsh(result.tridiagonal()).round(decimals=10).tolist()
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    operand = Operand(op, deferred=True)
    check_count(num_steps, "num_steps")
    if num_steps > operand.size:
        raise ValueError(f"num_steps={num_steps} exceeds the operator's size {operand.size}; use at most that.")
    generator = resolve_generator(generator)
    if v0 is None:
        start = operand.probes("gaussian", (operand.size, 1), generator)
    else:
        start = operand.work(operand.check_vector(v0, "v0")).unsqueeze(1)
    run = lanczos_many(operand, start, num_steps)
    m = int(run.lengths[0])
    return LanczosResult(
        alpha=run.alpha[0, :m].clone(),
        beta=run.beta[0, : m - 1].clone(),
        residual_norm=float(run.beta[0, m - 1]),
        basis=run.basis[0, :m].T.to(operand.dtype).contiguous() if keep_basis else None,
        num_matvecs=run.num_matvecs,
    )


_FIRST_CHECK = 8  # the first step after which lanczos_many asks whether every process is finished


@dataclass(frozen=True)
class _Many:
    alpha: torch.Tensor  # (b, m) float64 on the CPU
    beta: torch.Tensor  # (b, m) float64 on the CPU: beta[:, j] couples steps j, j + 1; beta[:, len - 1]: the residual
    lengths: list[int]  # steps taken per start vector
    num_matvecs: int  # products that entered the coefficients: the sum of the lengths
    basis: torch.Tensor  # (b, m, P) on the operator's device; rows past a process's length are zero


def lanczos_many(operand: Operand, V0: torch.Tensor, num_steps: int) -> _Many:
    """Run independent Lanczos processes from the columns of ``V0`` in lockstep, without host synchronisation.

    Each step multiplies the columns together (one ``op @ V`` of ``b`` columns, which the curvature operators
    evaluate in one vectorized pass). A process whose ``β`` vanishes (an invariant Krylov space) is finished:
    its length is recorded on the device and its column is zero from then on, so that no step needs to read
    ``β`` on the host. Every step therefore multiplies all ``b`` columns; the coefficients, the lengths and
    the finiteness of the products come to the host in one transfer at the end. Only after steps 8, 16, 32,
    ... is one flag read, to stop once every process is finished (a low-rank GGN or empirical Fisher): the
    reads grow with the logarithm of ``num_steps``, and at most half of the products are spent on finished
    processes.

    Args:
        operand: The validated operator.
        V0: Start vectors ``(P, b)``, each nonzero.
        num_steps: Steps per process, at most ``P``.

    Returns:
        The per-process coefficients, lengths and bases.
    """
    size, b = V0.shape
    device = V0.device
    norms = V0.norm(dim=0)
    if bool((norms == 0).any()):
        raise ValueError("the Lanczos start vector is zero; pass a nonzero v0.")
    # One contiguous (m, P) basis per process, in the working precision, so that each Gram-Schmidt pass is
    # two batched matrix products over the processes.
    V0 = operand.work(V0)
    basis = V0.new_zeros(b, num_steps, size)
    basis[:, 0] = (V0 / norms).T
    alpha = torch.zeros(b, num_steps, dtype=torch.float64, device=device)
    beta = torch.zeros(b, num_steps, dtype=torch.float64, device=device)
    lengths = torch.full((b,), num_steps, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    scale = torch.zeros(b, dtype=torch.float64, device=device)  # running estimate of ‖T‖ per process
    for j in range(num_steps):
        Q = basis[:, : j + 1]  # (b, j + 1, P), a view
        W = (operand @ Q[:, j].T).T.unsqueeze(2)  # (b, P, 1); zero for finished processes
        W, coef = orthogonalize(Q.transpose(1, 2), W)  # against the whole basis, twice
        W = W.squeeze(2)  # (b, P)
        a_j = coef[:, j, 0].double()
        b_j = W.norm(dim=1).double()
        scale = torch.maximum(scale, torch.maximum(a_j.abs(), b_j))
        invariant = b_j <= operand.noise(scale)  # β at the rounding level of the products: invariant
        alpha[:, j] = torch.where(active, a_j, 0.0)
        beta[:, j] = torch.where(active & ~invariant & (j + 1 < size), b_j, 0.0)
        if j + 1 == num_steps:
            break
        lengths = torch.where(active & invariant, j + 1, lengths)
        active = active & ~invariant
        if j + 1 >= _FIRST_CHECK and (j + 1) & j == 0 and not bool(active.any()):
            break  # every process is finished: at a power of two, so at most half of the products are wasted
        # Divide by 1 where the process is finished (its β may be 0), then zero its column. (The norm of the
        # row-major copy can differ from β in the last bit; it is the one that makes the new vector a unit one.)
        safe = torch.where(active, W.contiguous().norm(dim=1), 1.0)
        basis[:, j + 1] = W / safe.unsqueeze(1) * active.unsqueeze(1).to(W.dtype)
    values = operand.fetch_floats(alpha, beta, lengths)
    host = torch.tensor(values[: 2 * b * num_steps], dtype=torch.float64).reshape(2, b, num_steps)
    steps = [int(n) for n in values[2 * b * num_steps :]]
    return _Many(alpha=host[0], beta=host[1], lengths=steps, num_matvecs=sum(steps), basis=basis)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T
