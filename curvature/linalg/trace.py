"""Stochastic trace and Frobenius-norm estimators: Hutchinson, Hutch++ and XTrace.

Each estimator spends a fixed number of products and reports its value with a standard error computed
from the same products, so a result says how far it can be trusted. None reads a value on the host between
its products (a host synchronisation on a GPU): the results come over in one transfer at the end.

None needs a symmetric operator: Hutchinson's estimator, Hutch++ and XTrace are unbiased for any square
matrix (for Hutch++ and XTrace because ``tr((I - P) A) = tr((I - P) A (I - P))`` for any projector ``P``
built independently of the probe), and ``E ‖A ω‖² = tr(AᵀA)``.

Precision. The products of a float16 or bfloat16 operator are evaluated in its dtype and returned in float32
(:class:`~curvature.linalg._operand.Operand`): the quadratic forms ``ωᵀ A ω`` are taken in float32 and
their mean and spread in float64, so no sum runs in half precision. What remains is the rounding of the
products themselves, a bias of the order of ``u ‖A‖`` per entry that the standard error (a purely
statistical quantity, from the spread of the samples) does not include, and that more products do not
average out. Measured with Hutchinson and 100 Rademacher products on the registry's MLP and CNN Hessians
(``benchmarks/precision.py``), as the difference from the float64 estimate on the same probes: 1.6e-3 to
3.0e-3 of the trace in bfloat16, 3e-5 to 2.4e-4 in float16, 2e-8 in float32, against standard errors of
8-9%. A half-precision model near a minimum can compute a different curvature altogether (see
:func:`~curvature.linalg.eigen.eigenvalues`), which no standard error shows either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Union

import torch

from .._checks import check_count
from ..sampling import check_distribution, resolve_generator
from ._gram_schmidt import project_out
from ._operand import Operand

__all__ = ["MIN_MATVECS", "Estimate", "TRACE_METHODS", "frobenius_norm", "probe_blocks", "trace"]

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace", "exact")
MIN_MATVECS = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}  # the fewest products that give a standard error
BLOCK = 16  # probes multiplied together in one `op @ V`


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error.

    Attributes:
        value: The estimate: a float for scalar quantities, a ``(P,)`` tensor for a diagonal.
        std_error: The standard error of ``value`` estimated from the same products (same type and shape);
            0 for an exact computation. It is itself an estimate: with a few dozen samples ``value ± 2
            std_error`` covers the truth about 95% of the time for Hutchinson and Hutch++; XTrace's and
            XDiag's (from dependent leave-one-out estimates) run low, covering about 80-86% (measured on
            ``P = 200``, 20-60 products). It is statistical only: it does not include the rounding of
            half-precision products (see the module's docstring).
        num_matvecs: Products spent.
    """

    value: Union[float, torch.Tensor]
    std_error: Union[float, torch.Tensor]
    num_matvecs: int


def trace(
    op: Any,
    method: str = "hutchinson",
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
) -> Estimate:
    r"""Estimate ``tr(A)`` from products with ``A``.

    Methods, for ``m = num_matvecs`` products:

    - ``"hutchinson"`` (Hutchinson 1989; Girard 1989): :math:`\frac1m \sum_i \omega_i^\top A \omega_i` with
      isotropic probes; standard error :math:`s/\sqrt m` from the sample standard deviation ``s`` of the
      ``m`` terms. Its variance is :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)/m` for Rademacher probes.
    - ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, arXiv:2010.09649): an orthonormal basis ``Q`` of
      ``A S`` for ``m/3`` probes ``S``, the exact :math:`\operatorname{tr}(Q^\top A Q)` (``m/3`` products) and
      Hutchinson on the deflated :math:`(I - QQ^\top) A (I - QQ^\top)` with the remaining probes; the
      standard error is that of the Hutchinson part.
    - ``"xtrace"`` (Epperly, Tropp & Webber 2024, arXiv:2301.07825): ``n = m/2`` probes ``Ω``, ``Q R = A Ω``,
      and the average of the ``n`` leave-one-out Hutch++ estimates

      .. math::

          t_i = \operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
                + \omega_i^\top (I - Q_{(i)} Q_{(i)}^\top) A (I - Q_{(i)} Q_{(i)}^\top) \omega_i,

      where ``Q_{(i)}`` spans ``A Ω`` without column ``i``; each is an unbiased estimate built from all the
      other products, evaluated for all ``i`` with rank-one downdates in ``O(P n²)``. Standard error
      :math:`\operatorname{std}(t_i)/\sqrt n`.
    - ``"exact"``: the sum of ``e_iᵀ A e_i``, ``P`` products (small operators, references). Hutch++ and
      XTrace switch to it when ``num_matvecs ≥ P``: it costs no more, and sketches of ``P/2`` or more random
      sign vectors are degenerate (they repeat directions, and the leave-one-out spread can vanish).

    The low-rank methods win when the spectrum decays fast (the error of Hutch++ falls like ``1/m`` where
    Hutchinson's falls like ``1/√m``); on the flat spectra of small-model Hessians, spending every product on
    Hutchinson can be better, which is why it is the default here (``benchmarks/spectral.py``).

    Args:
        op: A square operator with ``@``, ``.shape``, ``.dtype`` and ``.device`` (symmetric or not).
        method: One of ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, ``"exact"``.
        num_matvecs: The product budget ``m`` (ignored by ``"exact"``). Hutchinson needs at least 2,
            Hutch++ at least 4 and XTrace at least 4 for a standard error.
        generator: The source of the probes; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.

    Returns:
        An :class:`Estimate` with a float value.

    Raises:
        ValueError: If ``method`` or ``distribution`` is unknown or ``num_matvecs`` is too small.

    Example:
        A rank-5 matrix of size 30: XTrace's sketch of 10 probes captures all of it, so the estimate is
        exact and its basis needs only 5 more products.

        >>> A = torch.diag(torch.cat([torch.arange(1.0, 6.0), torch.zeros(25)])).double()
        >>> est = trace(A, method="xtrace", num_matvecs=20, generator=torch.Generator().manual_seed(0))
        >>> round(est.value, 8), est.num_matvecs
        (15.0, 15)
    """
    operand = Operand(op, deferred=True, symmetric=False)
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}.")
    check_distribution(distribution)
    generator = resolve_generator(generator)
    if method != "exact":
        check_count(num_matvecs, "num_matvecs", minimum=MIN_MATVECS[method])
    if method == "exact" or (method != "hutchinson" and num_matvecs >= operand.size):
        return _exact_trace(operand)
    if method == "hutchinson":
        samples = torch.cat(
            [(Om * (operand @ Om)).sum(0) for Om in probe_blocks(operand, num_matvecs, distribution, generator)]
        )
        return _mean_estimate(samples, operand)
    if method == "hutch++":
        return _hutchpp(operand, num_matvecs, distribution, generator)
    return _xtrace(operand, num_matvecs, distribution, generator)


def frobenius_norm(
    op: Any,
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
) -> Estimate:
    r"""Estimate the Frobenius norm ``‖A‖_F`` from products with ``A``.

    .. math::

        \|A\|_F^2 = \operatorname{tr}(A^\top A) = \mathbb{E}\,\|A\omega\|^2 \quad (\mathbb{E}\,\omega\omega^\top = I),

    estimated by the mean of ``‖A ω_i‖²`` over ``m`` probes (Hutchinson's estimator for ``AᵀA``, with one
    product per probe). The standard error of the square root follows from that of the mean by the delta
    method, :math:`\operatorname{se}(\sqrt{x}) = \operatorname{se}(x) / (2\sqrt{x})`.

    Args:
        op: A square operator with ``@``, ``.shape``, ``.dtype`` and ``.device`` (symmetric or not).
        num_matvecs: The number of probes ``m`` (at least 2).
        generator: The source of the probes; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.

    Returns:
        An :class:`Estimate` of ``‖A‖_F``.

    Example:
        >>> A = torch.eye(9, dtype=torch.float64)
        >>> frobenius_norm(A, num_matvecs=4, generator=torch.Generator().manual_seed(0)).value
        3.0
    """
    operand = Operand(op, deferred=True, symmetric=False)
    check_distribution(distribution)
    generator = resolve_generator(generator)
    check_count(num_matvecs, "num_matvecs", minimum=2)
    samples = torch.cat(
        [(operand @ Om).double().pow(2).sum(0) for Om in probe_blocks(operand, num_matvecs, distribution, generator)]
    )
    squared = _mean_estimate(samples, operand)
    value = math.sqrt(max(squared.value, 0.0))
    std_error = squared.std_error / (2 * value) if value > 0 else 0.0
    return Estimate(value=value, std_error=std_error, num_matvecs=operand.num_matvecs)


def probe_blocks(
    operand: Operand, count: int, distribution: str, generator: torch.Generator | None
) -> Iterator[torch.Tensor]:
    """Yield ``count`` probes as ``(P, ≤BLOCK)`` blocks, drawn one block at a time (bounded memory).

    The probes of every stochastic estimator here: a job that runs its own pass over them (pruning's block
    traces) draws the same numbers as :func:`trace` and :func:`~curvature.linalg.diagonal.diagonal`.
    """
    for start in range(0, count, BLOCK):
        width = min(BLOCK, count - start)
        yield operand.probes(distribution, (operand.size, width), generator)


_probe_blocks = probe_blocks  # the former private name


def _mean_estimate(samples: torch.Tensor, operand: Operand, offset: torch.Tensor | None = None) -> Estimate:
    """The mean of ``samples`` (plus ``offset``) and its standard error, read on the host in one transfer."""
    samples = samples.double()
    n = samples.numel()
    stats = [samples.mean(), samples.std(correction=1) / math.sqrt(n) if n > 1 else samples.new_tensor(math.inf)]
    mean, std_error, *rest = operand.fetch_floats(*stats, *([] if offset is None else [offset]))
    value = rest[0] + mean if rest else mean
    return Estimate(value=value, std_error=std_error, num_matvecs=operand.num_matvecs)


def exact_diagonal(operand: Operand) -> torch.Tensor:
    """``e_jᵀ A e_j`` for every ``j``: ``P`` products with identity columns, 256 at a time (working dtype)."""
    value = operand.zeros(operand.size)
    for start in range(0, operand.size, 256):
        stop = min(start + 256, operand.size)
        E = operand.zeros(operand.size, stop - start)
        rows = torch.arange(start, stop, device=operand.device)
        E[rows, rows - start] = 1
        value[start:stop] = (operand @ E)[rows, rows - start]
    return value


def _exact_trace(operand: Operand) -> Estimate:
    (total,) = operand.fetch_floats(exact_diagonal(operand).double().sum())
    return Estimate(value=total, std_error=0.0, num_matvecs=operand.num_matvecs)


def _hutchpp(operand: Operand, m: int, distribution: str, generator: torch.Generator | None) -> Estimate:
    sketch = min(m // 3, operand.size)
    S = operand.probes(distribution, (operand.size, sketch), generator)
    Q = torch.linalg.qr(operand @ S).Q
    low_rank = (Q * (operand @ Q)).sum().double()
    samples = []
    for G in probe_blocks(operand, m - 2 * sketch, distribution, generator):
        G, _ = project_out(Q, G)  # deflated once, as Hutch++ is defined
        samples.append((G * (operand @ G)).sum(0))
    return _mean_estimate(torch.cat(samples), operand, offset=low_rank)


@dataclass(frozen=True, eq=False)
class XTraceSketch(Mapping[str, Optional[torch.Tensor]]):
    """The ingredients shared by XTrace and XDiag: probes, sketch, basis and the leave-one-out downdates.

    Read by attribute (``sketch.Q``) or as a read-only mapping from these names (``sketch["Q"]``), as the dict
    it replaces was read.

    Attributes:
        Om: The probes ``Ω``, ``(P, n)``, of full column rank.
        Y: The sketch ``Y = A Ω``.
        Q: An orthonormal basis of ``range(Y)`` (of the numerical range when ``Y`` is rank deficient).
        R: ``R = Qᵀ Y`` (``Y = Q R``).
        Z: ``Z = A Q``.
        S: Unit columns of ``R^{-T}``: ``Q S_i`` spans the part of ``range(Q)`` that drops out when column ``i``
            of ``Ω`` is left out; None when ``Y`` is numerically rank deficient (``Q`` then spans all of ``A``'s
            range).
    """

    Om: torch.Tensor
    Y: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    Z: torch.Tensor
    S: Optional[torch.Tensor]

    def __getitem__(self, key: str) -> Optional[torch.Tensor]:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def xtrace_samples(operand: Operand, n: int, distribution: str, generator: torch.Generator | None) -> XTraceSketch:
    """Draw ``n`` probes, sketch ``A`` with them and prepare XTrace's and XDiag's leave-one-out downdates.

    ``Ω`` has full column rank (random signs can repeat a column when ``n`` is close to ``P``; such a draw is
    replaced before any product). When ``A Ω`` is nevertheless numerically rank deficient, ``A`` has rank below
    ``n`` (almost surely), ``Q`` spans its range, which holds all of ``A``, and ``S`` is None. Products:
    ``n`` for ``Y`` and ``rank(Y)`` for ``Z``.

    Returns:
        An :class:`XTraceSketch` (``Om``, ``Y``, ``Q``, ``R``, ``Z``, ``S``).
    """
    Om = _full_rank_probes(operand, n, distribution, generator)
    Y = operand @ Om
    operand.check()  # before the SVD, which refuses NaN
    Q, R = torch.linalg.qr(Y)
    U, sigma, _ = torch.linalg.svd(R)
    rank, top = operand.fetch_floats((sigma > sigma[0] * n * torch.finfo(operand.work_dtype).eps).sum(), sigma[0])
    rank = int(rank) if top > 0 else 0
    S = None
    if rank < n:
        Q = Q @ U[:, :rank]
        R = Q.T @ Y
    else:
        Rinv_T = torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True).T
        S = Rinv_T / Rinv_T.norm(dim=0)
    Z = operand @ Q if Q.shape[1] else Q.clone()
    return XTraceSketch(Om=Om, Y=Y, Q=Q, R=R, Z=Z, S=S)


def _full_rank_probes(operand: Operand, n: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Draw ``(P, n)`` probes, redrawing (at no product cost) until they have full column rank."""
    for _ in range(100):
        Om = operand.probes(distribution, (operand.size, n), generator)
        if n == 1 or int(torch.linalg.matrix_rank(Om.double())) == n:
            return Om
    raise RuntimeError(f"could not draw {n} linearly independent probes of size {operand.size}.")


def _xtrace(operand: Operand, m: int, distribution: str, generator: torch.Generator | None) -> Estimate:
    n = min(m // 2, operand.size)
    sketch = xtrace_samples(operand, n, distribution, generator)
    Om, Y, Q, R, Z, S = sketch.Om, sketch.Y, sketch.Q, sketch.R, sketch.Z, sketch.S
    H = Q.T @ Z
    W = Q.T @ Om
    M = Om.T @ Z  # row i: ω_iᵀ A Q
    d = (Om * Y).sum(0)  # ω_iᵀ A ω_i
    if S is None:
        # Rank-deficient sketch: Q spans A's range, no leave-one-out downdate exists (or is needed); the
        # deflated Hutchinson terms below measure what the basis misses.
        low = torch.trace(H).expand(n)
        a = -W
    else:
        low = torch.trace(H) - ((S * (H @ S)).sum(0))
        a = -W + S * (S * W).sum(0)  # column i: coordinates in Q of u_i - ω_i
    # u_i = ω_i + Q a_i and A u_i = Y_i + Z a_i, so u_iᵀ A u_i in n-dimensional terms:
    quad = d + (M.T * a).sum(0) + (a * R).sum(0) + (a * (H @ a)).sum(0)
    return _mean_estimate(low + quad, operand)
