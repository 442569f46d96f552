"""The error bounds of Ritz pairs and the decision to stop: what :func:`curvature.eigenvalues` certifies.

Each wanted Ritz value gets the residual-and-gap bound of Kato and Temple, with the gap trusted only when the
Krylov space has explored up to it (the neighbour that sets it, and the nearest Ritz value on each side, have
converged; the pair has settled between checks); the rounding of the products is added. The estimator's loop
(:mod:`curvature.linalg.eigen`) calls :func:`_verdict` at each check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._operand import WORK_NOISE, Operand

__all__: list[str] = []  # private to curvature.linalg: eigen.py's stopping rule

# The gap to a neighbouring Ritz value is used once that value has converged to this fraction of its distance.
# Over the registry (Hessian and GGN of every case; k = 1, 3; each `which`; tol = 1e-2, 1e-4, 1e-8), without this
# requirement the bound fell below the true error in 36 of 648 runs (by up to 134 times: an eigenvalue that the
# Krylov space had not yet found lay inside the gap), with 0.1 in 14, with 0.03 in 2, with 0.01 in none.
RESOLVED = 0.01


def _stall(operand: Operand, norm: torch.Tensor) -> torch.Tensor:
    """The residual below which more steps cannot lower a bound: ``max(u, 100 ε_w) ‖A‖``.

    In float32 and float64 it is the rounding level of the working arithmetic, where computed residuals stall
    (:meth:`~curvature.linalg._operand.Operand.noise`). With half-precision products the recurrence, in float32,
    keeps lowering its residual; once it is below ``u ‖A‖`` the bound ``ρ + η`` or ``ρ²/δ + η`` is within
    ``u ‖A‖`` of its limit, while stopping at ``8 u ‖A‖`` would leave it twice as high and the neighbouring
    Ritz values unconverged.
    """
    return max(operand.unit_roundoff, WORK_NOISE * torch.finfo(operand.work_dtype).eps) * norm


@dataclass
class _Verdict:
    """The bounds of the wanted pairs and what they allow: tensors on the host (no reads)."""

    bounds: torch.Tensor  # error bounds of the wanted pairs
    done: torch.Tensor  # every wanted pair met tol, or is zero to rounding (the method may stop: converged)
    stalled: torch.Tensor  # every wanted pair met tol or has its residual at rounding level (it may stop)
    achievable: torch.Tensor  # the relative error certified for the pairs that missed tol (0 where none)


def _verdict(
    theta: torch.Tensor,
    residuals: torch.Tensor,
    wanted: torch.Tensor,
    tol: float,
    eta: torch.Tensor,
    stall: torch.Tensor,
    outside: torch.Tensor | None = None,
    last: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Verdict:
    """Error bounds of the pairs ``wanted`` among all Ritz pairs ``(theta, residuals)``, and the decisions.

    ``ρ = r + η`` bounds each Ritz vector's residual against the exact operator. The gap of pair ``i`` is
    ``min_{j≠i} (|θ_j − θ_i| − ρ_j)``, attained at its neighbour ``j``; with ``outside`` (power iteration), the
    rest of the spectrum lies within ``outside = |θ_k| + ρ_k`` of zero, a neighbour at ``|θ_i| − outside``.
    The gap is resolved when it exceeds ``ρ_i``, the neighbour has converged, ``r_j ≤ RESOLVED |θ_j − θ_i|``,
    and the pair is consistent with the previous step: it moved by at most the bound reported there (``last``:
    the wanted values and their bounds at the previous step; None at the first step). The bound is then
    ``min(ρ, ρ² / gap + η)``, else ``ρ``. A residual below ``stall`` (:func:`_stall`) cannot improve the bound
    further.

    The last condition guards against eigenvalues the Krylov space has not found yet inside the estimated gap,
    which a converged neighbour does not exclude when it is far: on the GGN of one sample (rank 4, a null space
    at 0), the second step's Ritz values were 2.6e-5 (converged, residual 4e-3) and 1.079, with 1.054, 0.709 and
    0.586 unseen between them; the gap bound claimed 5.9e-4 for an error of 3.6e-3, and the next step moved the
    Ritz value by 2.8e-2. A Ritz value that moves by more than its previous bound shows that bound was wrong
    (an extreme Ritz value moves towards its eigenvalue, by less than its error when the bound holds); the gap
    is trusted again once consecutive steps agree with their bounds.
    """
    rho = residuals + eta
    values, rho_w = theta[wanted], rho[wanted]
    count = wanted.numel()
    distance = (theta.unsqueeze(0) - values.unsqueeze(1)).abs()  # (k, m): from each wanted value to each Ritz value
    distance[torch.arange(count), wanted] = math.inf
    gaps = distance - rho.unsqueeze(0)
    # The nearest Ritz value on each side of each wanted one must have converged too: an eigenvalue the Krylov
    # space has not found yet lies between two Ritz values, and one on the side of an unconverged neighbour can be
    # closer than the neighbour that sets the gap.
    sides = _sides_converged(theta, residuals, values, distance)
    if outside is not None:
        distance = torch.cat([distance, (values.abs() - outside + rho[-1]).unsqueeze(1)], 1)
        gaps = torch.cat([gaps, (values.abs() - outside).unsqueeze(1)], 1)
        residuals = torch.cat([residuals, residuals[-1:]])
    gap, near = gaps.min(1)
    # The neighbour's own residual, without the rounding: whether the Krylov space has explored up to it.
    converged = residuals[near] <= RESOLVED * distance.gather(1, near.unsqueeze(1)).squeeze(1)
    resolved = (gap > rho_w) & torch.isfinite(gap) & converged & sides
    gap_bound = rho_w.pow(2) / torch.where(resolved, gap, 1.0) + eta
    settled = torch.zeros_like(resolved) if last is None else (values - last[0]).abs() <= last[1]
    resolved = resolved & settled
    bounds = torch.where(resolved, torch.minimum(rho_w, gap_bound), rho_w)
    met = bounds <= tol * values.abs()
    at_rounding = residuals[wanted] <= stall  # more steps cannot lower the bound
    zero = at_rounding & (values.abs() <= bounds)
    missed = at_rounding & ~met & ~zero
    achievable = torch.where(missed, bounds / values.abs().clamp_min(1e-300), 0.0).max()
    return _Verdict(bounds, (met | zero).all(), (met | at_rounding).all(), achievable)


def _sides_converged(theta: torch.Tensor, residuals: torch.Tensor, values: torch.Tensor,
                     distance: torch.Tensor) -> torch.Tensor:
    """Whether the nearest Ritz value above and the nearest below each wanted value have converged.

    Converged means ``r_j ≤ RESOLVED |θ_j − θ_i|``; a side without a Ritz value counts as converged. Between two
    consecutive Ritz values lies at least one eigenvalue (interlacing), and an eigenvalue the Krylov space has not
    found yet hides next to an unconverged one: on the Hessian of the registry's weighted cross-entropy, the three
    smallest Ritz values after 25 products were −0.5486, −0.5239 and −0.4895 (residual 8e-4), with −0.5152 unseen
    (its eigenvector had a start component of 6e-4); the gap of −0.5239 was taken from the converged −0.5486 on the
    other side, 2.8 times the true one, and its bound came out 1.3 times below its error.

    Args:
        theta: All Ritz values ``(m,)``.
        residuals: Their residuals ``(m,)``.
        values: The wanted Ritz values ``(k,)``.
        distance: ``|θ_j − values_i|`` ``(k, m)``, infinite where ``j`` is ``i`` itself.

    Returns:
        ``(k,)`` booleans.
    """
    ok = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    for side in (theta.unsqueeze(0) > values.unsqueeze(1), theta.unsqueeze(0) < values.unsqueeze(1)):
        d = torch.where(side, distance, math.inf)
        nearest, j = d.min(1)
        ok = ok & (torch.isinf(nearest) | (residuals[j] <= RESOLVED * nearest))
    return ok
