r"""How far an approximation is from a reference operator: distance, top eigenspaces, trace and λ_max.

:func:`compare` is how a user checks an approximate curvature (K-FAC, a Monte-Carlo Fisher, the empirical
Fisher, the GGN in place of the Hessian) against the exact one. Like every estimator here it only needs ``@``:
two operators of the same shape, dtype and device, the second the reference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .._checks import check_count, check_scalar
from ..sampling import check_distribution, resolve_generator
from ._operand import Operand
from .eigen import EigenResult, eigenvalues
from .subspace import principal_angles, subspace_overlap
from .trace import probe_blocks

__all__ = ["Comparison", "compare"]

EXACT_BLOCK = 256  # identity columns per product when every probe is a coordinate vector
# The largest relative standard error of a ratio's denominator at which the delta method's standard error is
# trusted (measured: see compare's docstring); above it compare warns.
RELIABLE = 0.2


@dataclass(frozen=True)
class Comparison:
    r"""The comparison of an operator ``A`` with a reference ``B`` made by :func:`compare`.

    Ratios and the distance are relative to ``B``, the reference ("exact") operator.

    Attributes:
        distance: The relative Frobenius distance ``‖A − B‖_F / ‖B‖_F``: 0 when ``A = B``.
        distance_std_error: Its standard error (delta method, see :func:`compare`); 0 when computed exactly.
        trace_ratio: ``tr(A) / tr(B)``.
        trace_ratio_std_error: Its standard error; 0 when computed exactly.
        lambda_max_ratio: ``λ_max(A) / λ_max(B)``, from the largest eigenvalue of each (``eigen_a.values[0] /
            eigen_b.values[0]``); its relative error is at most about ``tol`` for each eigenvalue.
        overlap: The overlap of the two top-``k`` eigenspaces, :math:`\|U_A^\top U_B\|_F^2 / k =
            \frac1k \sum_i \cos^2 \theta_i \in [0, 1]` (:func:`~curvature.subspace_overlap`
            with ``reduce="subspace"``): 1 when they coincide, ``k / P`` for random subspaces.
        angles: The ``k`` principal angles between the two top-``k`` eigenspaces, ascending, in radians
            (float64, on the CPU), :func:`~curvature.principal_angles`.
        eigen_a: The top ``k`` eigenpairs of ``A`` (``which="largest"``), an
            :class:`~curvature.EigenResult` with its error bounds.
        eigen_b: The top ``k`` eigenpairs of ``B``.
        num_probes: The probes shared by the two operators for the distance and the trace ratio: ``num_matvecs``,
            or ``P`` when they were the identity columns (exact).
        num_matvecs_a: Products with ``A``: ``num_probes`` plus those of its eigenvalue run.
        num_matvecs_b: Products with ``B``: ``num_probes`` plus those of its eigenvalue run.
    """

    distance: float
    distance_std_error: float
    trace_ratio: float
    trace_ratio_std_error: float
    lambda_max_ratio: float
    overlap: float
    angles: torch.Tensor
    eigen_a: EigenResult
    eigen_b: EigenResult
    num_probes: int
    num_matvecs_a: int
    num_matvecs_b: int

    @property
    def converged(self) -> bool:
        """Whether both eigenvalue runs met ``tol`` (``eigen_a.converged and eigen_b.converged``)."""
        return bool(self.eigen_a.converged and self.eigen_b.converged)


def compare(
    op_a: Any,
    op_b: Any,
    *,
    k: int = 1,
    num_matvecs: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    max_matvecs: int | None = None,
    distribution: str = "rademacher",
) -> Comparison:
    r"""Compare a symmetric operator ``A`` (``op_a``) with a reference ``B`` (``op_b``), from products only.

    ``B`` is the reference, the "exact" operator by convention: the distance is relative to it and the ratios
    divide by it. Checking an approximation is ``compare(approximation, exact)``: K-FAC or EK-FAC against the
    GGN or Fisher it approximates (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML; George et al. 2018, "Fast approximate natural gradient descent in a Kronecker
    factored eigenbasis", NeurIPS), a Monte-Carlo or empirical Fisher against the Fisher (Kunstner, Balles &
    Hennig 2019, "Limitations of the empirical Fisher approximation for natural gradient descent", NeurIPS,
    arXiv:1905.12558), the GGN against the Hessian.

    **Distance and trace ratio, with shared probes.** The same ``m`` probes ``Ω = [ω_1 … ω_m]``
    (``E ωωᵀ = I``) are multiplied by both operators, and per probe

    .. math::

        d_i = \|(A - B)\,\omega_i\|^2,\quad b_i = \|B\omega_i\|^2,\quad
        s_i = \omega_i^\top A \omega_i,\quad t_i = \omega_i^\top B \omega_i,

    unbiased for ``‖A − B‖_F² = tr((A − B)ᵀ(A − B))``, ``‖B‖_F²``, ``tr(A)`` and ``tr(B)`` (Hutchinson's
    estimator, as in :func:`~curvature.frobenius_norm` and :func:`~curvature.trace`).
    The estimates are ratios of means,

    .. math::

        \widehat{D} = \sqrt{\bar d / \bar b}, \qquad \widehat{T} = \bar s / \bar t,

    consistent, with a bias of order ``1/m`` that is small next to their standard errors. Because both means
    come from the same probes, their errors are correlated and largely cancel in the ratio (``A = B`` gives
    exactly 0 and 1, with standard error 0): the standard error of a ratio of means ``R = x̄ / ȳ`` is that
    of the linearized sample ``x_i − R y_i`` (the delta method; Cochran 1977, *Sampling Techniques*, §6.3),

    .. math::

        \operatorname{se}(R) = \frac{\operatorname{std}(x_i - R\, y_i)}{\sqrt{m}\ |\bar y|},
        \qquad \operatorname{se}(\widehat D) = \frac{\operatorname{se}(\widehat D^2)}{2 \widehat D}.

    **How far the standard errors can be trusted.** The delta method assumes well-determined denominators. Over
    the case registry (GGN against Hessian, empirical Fisher against GGN; 22 models, 3 seeds, 30 probes), in
    the 252 of 264 draws whose reference mean is known to ±20% or better, ``|z| = |estimate − exact| /
    std_error`` exceeded 3 in 0.4% (spread of z 1.05). A trace small next to the Frobenius norm (an indefinite
    Hessian as the reference; relative standard errors of 0.25 to 0.67 in the other 12 draws) is not: the
    estimate and its standard error then come out small together, and z reached 4.7. So :func:`compare` warns
    when the estimated relative standard error of a denominator exceeds 20% (``RELIABLE``), with the number of
    probes that would bring it to 10%; it did in 10 of those 12 draws and in 3% of the others. Independently,
    a difference ``A − B`` concentrated in a few directions makes the samples heavy-tailed, and their sample
    standard deviation, as for any Hutchinson estimate, runs low with few probes: on a ``60 × 60`` pair whose
    difference is mostly one direction, ``|z| > 3`` in 5% of 300 draws with 30 probes and 10% with 10
    (0-0.7% for diffuse differences with 30 probes, 1-2% with 10).

    With ``num_matvecs ≥ P`` the probes are the ``P`` identity columns instead: then ``Σ d_i = ‖A − B‖_F²``
    and ``Σ s_i = tr(A)`` exactly, and the standard errors are 0 (it costs no more). The distance cannot be
    resolved below the rounding of the products, about ``u ‖A‖`` per entry for the unit roundoff ``u`` of the
    operators' dtype, which the standard error (statistical only) does not include.

    **Top eigenspaces.** :func:`~curvature.eigenvalues` finds the ``k`` largest eigenpairs of
    each to the relative eigenvalue error ``tol``, both from the same random start vector (so that ``A = B``
    gives the same vectors). From the eigenvectors ``U_A, U_B``:
    ``overlap = ‖U_Aᵀ U_B‖_F² / k = (1/k) Σ cos² θ_i`` and the principal angles ``θ_i`` (Björck & Golub 1973),
    the measurements with which Gur-Ari, Roberts & Dyer 2018 (arXiv:1812.04754) track the top Hessian
    eigenspace. An eigenvector is only as accurate as its residual over the gap to the rest of the spectrum
    (about :math:`\sqrt{\mathrm{tol}\ \lambda / \delta}` in angle for an eigenvalue converged to ``tol``): a
    top-``k`` space whose ``k``-th eigenvalue is close to the ``(k+1)``-th is ill-defined, and its overlap
    is too; choose ``k`` at a gap (Gur-Ari et al. take the number of classes). ``λ_max(A) / λ_max(B)`` is read
    off the same runs.

    **Cost.** ``num_matvecs`` products with each operator (``P`` when ``num_matvecs ≥ P``), shared by the
    distance and the trace ratio, plus each eigenvalue run (tens to a few hundred products, more for a small
    ``tol`` or a large ``k``); ``num_matvecs_a`` and ``num_matvecs_b`` report them.

    Args:
        op_a: The operator to check (the approximation): symmetric, with ``@``, ``.shape``, ``.dtype`` and
            ``.device`` (a curvature operator, a :class:`~curvature.LinearOperator` or a dense tensor).
        op_b: The reference operator, of the same shape, dtype and device.
        k: The dimension of the top eigenspaces compared (at most ``P``).
        num_matvecs: The shared probes ``m`` (at least 2, for a standard error).
        tol: The relative error of each eigenvalue (:func:`~curvature.eigenvalues`).
        generator: The source of the probes and of the start vector; None draws from a copy of torch's global
            generator without advancing it (:func:`curvature.sampling.resolve_generator`).
        max_matvecs: The product budget of each eigenvalue run (default that of
            :func:`~curvature.eigenvalues`).
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.

    Returns:
        A :class:`Comparison`. A ratio whose denominator is zero (``B = 0``, ``tr(B) = 0``) is ``±inf``, or NaN
        for ``0/0``.

    Raises:
        TypeError: If an operator lacks ``@``, a shape, a floating dtype or a device, the dtypes differ, or an
            argument has the wrong type.
        ValueError: If an operator is not square or not symmetric, the shapes or devices differ, ``k`` exceeds
            ``P``, ``num_matvecs < 2``, ``tol ≤ 0``, or ``distribution`` is unknown: all before any product.

    Warns:
        RuntimeWarning: When a ratio's denominator (``‖B‖_F²`` or ``tr(B)``) is estimated to worse than ±20%,
            so that the ratio's standard error is unreliable (above), or when an eigenvalue run does not reach
            ``tol`` (from :func:`~curvature.eigenvalues`; ``converged`` is then False).

    Example:
        A diagonal matrix against a perturbation of it: with ``num_matvecs ≥ P`` everything is exact.

        >>> B = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> A = B.clone()
        >>> A[0, 0] = 3.0  # ‖A − B‖_F = 2, ‖B‖_F = √385
        >>> c = compare(A, B, k=2, num_matvecs=10, tol=1e-10, generator=torch.Generator().manual_seed(0))
        >>> round(c.distance * math.sqrt(385), 10), c.distance_std_error, round(c.trace_ratio, 10)
        (2.0, 0.0, 1.0363636364)
        >>> round(c.overlap, 10), round(c.lambda_max_ratio, 10)
        (1.0, 1.0)
    """
    a = Operand(op_a, "op_a", deferred=True)
    b = Operand(op_b, "op_b", deferred=True)
    tol = _checked_arguments(a, b, k, num_matvecs, tol, max_matvecs, distribution)
    generator = resolve_generator(generator)
    exact = num_matvecs >= a.size
    blocks = _identity_blocks(a) if exact else probe_blocks(a, num_matvecs, distribution, generator)
    distance, distance_se, trace_ratio, trace_ratio_se, relative = _shared_estimates(a, b, blocks, exact)
    _warn_unreliable(relative, num_matvecs, a.size)
    v0 = a.probes("gaussian", a.size, generator).to(a.dtype)  # eigenvalues' own draw, shared by both runs
    eigen_a = eigenvalues(op_a, k, "largest", tol, max_matvecs, generator, v0=v0)
    eigen_b = eigenvalues(op_b, k, "largest", tol, max_matvecs, generator, v0=v0)
    return Comparison(
        distance=distance,
        distance_std_error=distance_se,
        trace_ratio=trace_ratio,
        trace_ratio_std_error=trace_ratio_se,
        lambda_max_ratio=float(eigen_a.values[0] / eigen_b.values[0]),
        overlap=float(subspace_overlap(eigen_a.vectors, eigen_b.vectors, reduce="subspace")),
        angles=principal_angles(eigen_a.vectors, eigen_b.vectors).cpu(),
        eigen_a=eigen_a,
        eigen_b=eigen_b,
        num_probes=a.size if exact else num_matvecs,
        num_matvecs_a=a.num_matvecs + eigen_a.num_matvecs,
        num_matvecs_b=b.num_matvecs + eigen_b.num_matvecs,
    )


def _checked_arguments(a: Operand, b: Operand, k: int, num_matvecs: int, tol: float, max_matvecs: int | None,
                       distribution: str) -> float:
    """:func:`compare`'s arguments checked before any product; returns ``tol`` as a float."""
    if a.size != b.size:
        raise ValueError(f"op_a and op_b must have the same shape, got {tuple(a.op.shape)} and {tuple(b.op.shape)}; "
                         "compare two operators over the same parameters (the same params=).")
    if a.dtype != b.dtype:
        raise TypeError(f"op_a has dtype {a.dtype} but op_b has dtype {b.dtype}; build both in one dtype, e.g. "
                        "from the same model, or convert a dense tensor with .to().")
    if a.device != b.device:
        raise ValueError(f"op_a is on {a.device} but op_b is on {b.device}; build both on one device.")
    check_count(k, "k")
    if k > a.size:
        raise ValueError(f"k={k} exceeds the operators' size {a.size}; compare at most {a.size} eigenpairs.")
    check_count(num_matvecs, "num_matvecs", minimum=2)
    tol = check_scalar(tol, "tol")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}; for machine precision use e.g. 1e-12.")
    if max_matvecs is not None:
        check_count(max_matvecs, "max_matvecs", minimum=k)
    check_distribution(distribution)
    return tol


def _identity_blocks(operand: Operand) -> Iterator[torch.Tensor]:
    """The ``P`` identity columns, ``EXACT_BLOCK`` at a time, in the working dtype."""
    for start in range(0, operand.size, EXACT_BLOCK):
        stop = min(start + EXACT_BLOCK, operand.size)
        E = operand.zeros(operand.size, stop - start)
        rows = torch.arange(start, stop, device=operand.device)
        E[rows, rows - start] = 1
        yield E


def _shared_estimates(a: Operand, b: Operand, blocks: Iterator[torch.Tensor],
                      exact: bool) -> tuple[float, float, float, float, dict[str, float]]:
    """The distance, the trace ratio and their standard errors from the products of both operators with ``blocks``.

    Also returns the relative standard errors of the two denominators' means (by name, for ``_warn_unreliable``;
    empty when exact). Everything is reduced on the device and read in one transfer, with both operators'
    finiteness flags. A zero denominator gives ``±inf`` (NaN for ``0/0``) and a NaN standard error.
    """
    d, bb, s, t = [], [], [], []
    for Om in blocks:
        Ya, Yb, Om64 = (a @ Om).double(), (b @ Om).double(), Om.double()
        d.append((Ya - Yb).pow(2).sum(0))
        bb.append(Yb.pow(2).sum(0))
        s.append((Om64 * Ya).sum(0))
        t.append((Om64 * Yb).sum(0))
    d, bb, s, t = (torch.cat(x) for x in (d, bb, s, t))
    squared, trace_ratio = d.mean() / bb.mean(), s.mean() / t.mean()
    if exact:  # the identity columns: sums, not samples
        stats = [squared, trace_ratio, d.new_zeros(()), d.new_zeros(())]
    else:
        relative = [x.std(correction=1) / (math.sqrt(x.numel()) * x.mean().abs()) for x in (bb, t)]
        stats = [squared, trace_ratio, _ratio_se(d, bb, squared), _ratio_se(s, t, trace_ratio), *relative]
    squared, trace_ratio, squared_se, trace_ratio_se, *rest = a.fetch_floats(*stats, b.finite())
    if not rest.pop():
        raise ValueError("a product with op_b contains NaN or Inf; check the model, loss and data for NaN or overflow.")
    distance = math.sqrt(squared)
    distance_se = squared_se / (2 * distance) if distance > 0 else 0.0
    return distance, distance_se, trace_ratio, trace_ratio_se, dict(zip(_DENOMINATORS, rest))


_DENOMINATORS = {"‖Bω‖²": "distance", "ωᵀBω": "trace ratio"}


def _ratio_se(x: torch.Tensor, y: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The delta-method standard error of ``R = x̄ / ȳ``: ``std(x_i − R y_i) / (√m |ȳ|)`` (a 0-d tensor)."""
    return (x - ratio * y).std(correction=1) / (math.sqrt(x.numel()) * y.mean().abs())


def _warn_unreliable(relative: dict[str, float], m: int, size: int) -> None:
    """Warn when a ratio's denominator is known only to worse than ``RELIABLE`` (the delta method's premise)."""
    loose = {name: value for name, value in relative.items() if not value <= RELIABLE and math.isfinite(value)}
    if not loose:
        return
    worst = max(loose.values())
    which = " and ".join(f"the mean of {name} to ±{value:.0%}" for name, value in loose.items())
    quantity = " and ".join(_DENOMINATORS[name] for name in loose)
    warnings.warn(
        f"compare: {m} probes estimate {which}; above ±{RELIABLE:.0%} the delta-method standard error of the "
        f"{quantity} is unreliable (it runs low where the estimate does). About "
        f"{math.ceil(m * (worst / (RELIABLE / 2)) ** 2)} probes bring it to ±{RELIABLE / 2:.0%}; num_matvecs ≥ P = "
        f"{size} gives exact values.",
        RuntimeWarning, stacklevel=3,
    )
