"""Stochastic estimators of an operator's diagonal: Hutchinson's and XDiag."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_count
from ..sampling import check_distribution, resolve_generator
from ._operand import Operand
from .trace import Estimate, exact_diagonal, probe_blocks, xtrace_samples

__all__ = ["DIAGONAL_METHODS", "diagonal", "per_entry_estimate"]

DIAGONAL_METHODS = ("hutchinson", "xdiag", "exact")


def diagonal(
    op: Any,
    method: str = "hutchinson",
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
) -> Estimate:
    r"""Estimate the diagonal of ``A`` from products with ``A``.

    Methods, for ``m = num_matvecs`` products:

    - ``"hutchinson"`` (default; Bekas, Kokiopoulou & Saad 2007): :math:`\frac1m \sum_i \omega_i \odot
      A\omega_i`, unbiased for isotropic probes; with Rademacher probes the ``A_{jj}`` part of every term is
      exact and only the off-diagonal entries of row ``j`` add variance.
    - ``"xdiag"`` (Epperly, Tropp & Webber 2024, arXiv:2301.07825): ``n = m/2`` probes, ``Q R = A Ω``, and
      the mean over ``i`` of the leave-one-out estimates

      .. math::

          d_i = \operatorname{diag}(Q_{(i)} Q_{(i)}^\top A)
                + \omega_i \odot (I - Q_{(i)} Q_{(i)}^\top) A \omega_i,

      exact on the low-rank part that the other probes capture, Hutchinson on the rest. That form is unbiased
      for a symmetric ``A`` only: for a general one :math:`\operatorname{diag}(P A) \ne
      \operatorname{diag}(A P)`, and what the products give is :math:`\operatorname{diag}(A Q_{(i)}
      Q_{(i)}^\top)` (``diag(P A)`` needs products with ``Aᵀ``). For an operator known not to be symmetric
      (flagged ``is_symmetric=False``, or a dense tensor that is not symmetric to rounding) XDiag therefore
      takes :math:`d_i = \operatorname{diag}(A Q_{(i)} Q_{(i)}^\top) + \omega_i \odot A (I - Q_{(i)}
      Q_{(i)}^\top) \omega_i`, unbiased for any ``A`` (the same products, :math:`A (I - Q_{(i)}
      Q_{(i)}^\top) \omega_i = A\omega_i - A Q\, Q_{(i)}`-coordinates of :math:`\omega_i`). Much better than
      Hutchinson when the spectrum decays fast, much worse when it is flat and the diagonal dominates
      (``1000 I`` plus small off-diagonal noise: relative error 0.17 against Hutchinson's 1.5e-6 at 40
      products), where its low-rank part only adds noise; hence not the default.
    - ``"exact"``: for an operator that knows its diagonal from its structure (``op.has_exact_diagonal``: the
      GGN, Fisher, Monte-Carlo Fisher and empirical Fisher of a closed-form loss), ``op.diagonal()``:
      :math:`\operatorname{diag}(J^\top S S^\top J) = \sum_n \sum_k (J_n^\top s_{kn})^{\odot 2}`, one vectorized
      pullback per sample and output column, no products (``num_matvecs=0``; BackPACK's ``DiagGGNExact``). Otherwise
      ``e_jᵀ A e_j`` for every ``j``, ``P`` products: the Hessian's exact diagonal costs ``P`` Hessian-vector
      products (small models, references). XDiag switches to it when ``num_matvecs ≥ P``, as
      :func:`~curvature.trace` does.

    The standard error is per entry: the standard deviation of the per-probe estimates over ``√(number of
    estimates)``. For Hutchinson it is the usual sample standard error. XDiag's ``n`` leave-one-out estimates
    are dependent, so its standard error is a heuristic that runs low: about 20-30% with 20 probes on
    ``P = 400`` (``tests/test_diagonal.py``), more when ``n`` approaches ``P``.

    Args:
        op: A square operator with ``@``, ``.shape``, ``.dtype`` and ``.device``, symmetric or not (for an
            operator known not to be symmetric, XDiag uses the variant above).
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        num_matvecs: The product budget (at least 2 for Hutchinson, 4 for XDiag; ignored by ``"exact"``).
        generator: The source of the probes; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        distribution: ``"rademacher"`` (recommended) or ``"gaussian"`` probes.

    Returns:
        An :class:`~curvature.linalg.trace.Estimate` whose ``value`` and ``std_error`` are ``(P,)`` tensors in
        the operator's dtype and device.

    Raises:
        ValueError: If ``method`` or ``distribution`` is unknown or ``num_matvecs`` is too small.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> diagonal(A, method="hutchinson", num_matvecs=2, generator=torch.Generator().manual_seed(0)).value
        tensor([1., 2., 3., 4., 5.], dtype=torch.float64)
    """
    operand = Operand(op, deferred=True, symmetric=False)
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"method must be one of {DIAGONAL_METHODS}, got {method!r}.")
    check_distribution(distribution)
    generator = resolve_generator(generator)
    if method != "exact":
        check_count(num_matvecs, "num_matvecs", minimum=2 if method == "hutchinson" else 4)
    if method == "exact" and getattr(op, "has_exact_diagonal", False):
        return _structured(op)
    if method == "exact" or (method == "xdiag" and num_matvecs >= operand.size):
        return _exact(operand)
    if method == "hutchinson":
        # Sums in float64: in float32, sum(x²) - m·mean² cancels when the diagonal dominates the spread.
        total = torch.zeros(operand.size, dtype=torch.float64, device=operand.device)
        total_sq = torch.zeros_like(total)
        for Om in probe_blocks(operand, num_matvecs, distribution, generator):
            terms = (Om * (operand @ Om)).double()
            total += terms.sum(1)
            total_sq += terms.pow(2).sum(1)
        return per_entry_estimate(total, total_sq, num_matvecs, operand)
    return _xdiag(operand, num_matvecs, distribution, generator)


def per_entry_estimate(total: torch.Tensor, total_sq: torch.Tensor, count: int, operand: Operand) -> Estimate:
    r"""Mean and standard error per entry from float64 sums of ``count`` estimates and of their squares.

    :math:`\hat\mu = S_1 / n` and :math:`\widehat{\mathrm{se}} = \sqrt{\max(S_2 - n \hat\mu^2, 0) / (n (n - 1))}`
    for :math:`S_1 = \sum_i x_i`, :math:`S_2 = \sum_i x_i^2`, ``n = count``, in the operator's dtype on its device;
    the one host read is the check that every product through ``operand`` was finite (``ValueError`` if not).
    """
    operand.check()
    mean = total / count
    variance = ((total_sq - count * mean.pow(2)) / (count - 1)).clamp_min(0)
    return Estimate(
        value=mean.to(operand.dtype), std_error=(variance.sqrt() / math.sqrt(count)).to(operand.dtype),
        num_matvecs=operand.num_matvecs,
    )


_per_entry = per_entry_estimate  # the former private name


def _exact(operand: Operand) -> Estimate:
    value = exact_diagonal(operand).to(operand.dtype)
    operand.check()
    return Estimate(value=value, std_error=torch.zeros_like(value), num_matvecs=operand.num_matvecs)


def _structured(op: Any) -> Estimate:
    """The exact diagonal an operator computes from its structure (``op.diagonal()``), without products."""
    value = op.diagonal()
    if not bool(torch.isfinite(value).all()):
        raise ValueError("the diagonal is not finite: the loss or its derivatives are not finite at these parameters.")
    return Estimate(value=value, std_error=torch.zeros_like(value), num_matvecs=0)


def _xdiag(operand: Operand, m: int, distribution: str, generator: torch.Generator | None) -> Estimate:
    n = min(m // 2, operand.size)
    parts = xtrace_samples(operand, n, distribution, generator)
    Om, Y, Q, R, Z, S = (parts[key] for key in ("Om", "Y", "Q", "R", "Z", "S"))
    low = (Q * Z).sum(1)  # diag(A Q Qᵀ), which equals diag(Q Qᵀ A) when A is symmetric
    if S is None:
        # Rank-deficient sketch: Q spans A's range, so (I - QQᵀ) A ω_i measures what the basis misses.
        terms = Om * (Y - Q @ R) if operand.is_symmetric else Om * (Y - Z @ (Q.T @ Om))
    elif operand.is_symmetric:
        QS = Q @ S
        # diag(Q_(i) Q_(i)ᵀ A) = diag(QQᵀA) - q_i ⊙ A q_i with q_i = Q S_i, and
        # (I - Q_(i) Q_(i)ᵀ) A ω_i = q_i (S_iᵀ R_i) because A ω_i = Q R_i lies in range(Q).
        terms = Om * QS * (S * R).sum(0) - QS * (Z @ S)
    else:
        # Any square A: diag(A Q_(i) Q_(i)ᵀ) = diag(A QQᵀ) - (A q_i) ⊙ q_i (what `low` and the second term
        # give), and A (I - Q_(i) Q_(i)ᵀ) ω_i = Y_i + Z a_i with a_i = -Qᵀω_i + S_i (S_iᵀ Qᵀ ω_i), the
        # coordinates in Q of (I - Q_(i) Q_(i)ᵀ) ω_i - ω_i (as in XTrace).
        W = Q.T @ Om
        a = -W + S * (S * W).sum(0)
        terms = Om * (Y + Z @ a) - (Q @ S) * (Z @ S)
    estimates = (low.unsqueeze(1) + terms).double()  # column i: the leave-one-out estimate d_i
    return per_entry_estimate(estimates.sum(1), estimates.pow(2).sum(1), n, operand)
