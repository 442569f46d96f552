"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._checks import check_count, check_scalar
from ..sampling import check_distribution, resolve_generator
from ._operand import Operand
from .lanczos import _tridiagonal, lanczos_many
from .trace import Estimate

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass(frozen=True)
class SpectralDensity:
    r"""The SLQ approximation of an operator's spectral density.

    The density :math:`\phi(t) = \frac1P \sum_j \delta(t - \lambda_j)` is approximated by the quadrature
    :math:`\sum_l w_l \delta(t - \theta_l)`: for each probe ``v``, the Gauss quadrature of the measure
    :math:`\sum_j (v^\top u_j)^2 / \|v\|^2 \, \delta(t - \lambda_j)` from the Lanczos tridiagonal ``T`` started
    at ``v``, with nodes the eigenvalues of ``T`` and weights the squared first components of its
    eigenvectors, divided by the number of probes.

    Attributes:
        nodes: All quadrature nodes, float64, shape ``(N,)``.
        weights: Their weights, float64, ``(N,)``; those of all probes together sum to 1, each probe's to
            ``1 / num_probes``.
        probe: The probe each node comes from, ``(N,)`` long.
        size: The operator's size ``P`` (moments of the density are ``tr(Aᵏ) / P``).
        num_probes: The number of probes.
        num_matvecs: Products that entered the quadrature (the steps of all probes).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    probe: torch.Tensor
    size: int
    num_probes: int
    num_matvecs: int

    def moment(self, order: int) -> float:
        r"""Return :math:`\sum_l w_l \theta_l^k`, an estimate of :math:`\operatorname{tr}(A^k) / P`.

        Gauss quadrature with ``m`` nodes is exact for polynomials of degree ``2m − 1``, so for ``k < 2m``
        this equals the Hutchinson estimate :math:`\frac1{n_v}\sum_v v^\top A^k v / v^\top v` from the same
        probes; ``moment(1)`` is the mean of ``vᵀ A v / vᵀ v``.

        Args:
            order: The power ``k ≥ 0``.

        Returns:
            The moment.
        """
        return float((self.weights * self.nodes.pow(order)).sum())

    def trace_estimate(self) -> Estimate:
        """Return the trace estimate ``P · moment(1)`` with its standard error over the probes.

        Returns:
            An :class:`~curvature.linalg.trace.Estimate` (the standard error is infinite for one probe).
        """
        per_probe = torch.zeros(self.num_probes, dtype=torch.float64).index_add_(
            0, self.probe, self.weights * self.nodes
        ) * self.num_probes
        value = self.size * float(per_probe.mean())
        if self.num_probes > 1:
            std_error = self.size * float(per_probe.std(correction=1)) / math.sqrt(self.num_probes)
        else:
            std_error = math.inf
        return Estimate(value=value, std_error=std_error, num_matvecs=self.num_matvecs)

    def per_probe(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return ``(nodes, weights)`` of each probe, with each probe's weights summing to 1."""
        return [
            (self.nodes[self.probe == p], self.weights[self.probe == p] * self.num_probes)
            for p in range(self.num_probes)
        ]

    def default_grid(self, num_points: int = 1000) -> torch.Tensor:
        """A grid over the nodes' range padded by 5% on each side."""
        low, high = float(self.nodes.min()), float(self.nodes.max())
        pad = 0.05 * max(high - low, abs(high), 1e-12)
        return torch.linspace(low - pad, high + pad, num_points, dtype=torch.float64)

    def default_sigma(self) -> float:
        """The default Gaussian width: 1% of the nodes' range (never 0)."""
        low, high = float(self.nodes.min()), float(self.nodes.max())
        return 0.01 * max(high - low, abs(high), 1e-12)

    def evaluate(self, grid: torch.Tensor | None = None, sigma: float | None = None) -> torch.Tensor:
        r"""Evaluate the Gaussian-broadened density on a grid.

        .. math:: \hat\phi(t) = \sum_l \frac{w_l}{\sigma\sqrt{2\pi}}
                  \exp\!\Big(-\frac{(t - \theta_l)^2}{2\sigma^2}\Big)

        (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019, arXiv:1901.10159). It integrates to 1.

        Args:
            grid: Points ``t`` (1-D); default :meth:`default_grid`.
            sigma: The Gaussian width; default :meth:`default_sigma`.

        Returns:
            The density on the grid, float64.
        """
        grid = self.default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).cpu()
        sigma = self.default_sigma() if sigma is None else check_scalar(sigma, "sigma")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        z = (grid.reshape(-1, 1) - self.nodes.reshape(1, -1)) / sigma
        return (torch.exp(-0.5 * z * z) * self.weights).sum(1) / (sigma * math.sqrt(2 * math.pi))

    def plot(self, path: str | Path, grid: torch.Tensor | None = None, sigma: float | None = None,
             log_scale: bool = True, title: str | None = None) -> Path:
        """Write the broadened density to an image file (PNG by suffix); needs matplotlib (extra ``plot``).

        Args:
            path: The output file.
            grid: Evaluation points; default :meth:`default_grid`.
            sigma: The Gaussian width; default :meth:`default_sigma`.
            log_scale: Plot the density on a log axis, where the bulk and the outliers are both visible.
            title: The figure title.

        Returns:
            The path written.
        """
        from ..plot import plot_density

        grid = self.default_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).cpu()
        return plot_density(grid, self.evaluate(grid, sigma), self.nodes, path, log_scale=log_scale, title=title)


def spectral_density(
    op: Any,
    num_probes: int = 1,
    num_steps: int = 100,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
) -> SpectralDensity:
    r"""Approximate the spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each of ``n_v`` probes ``v``, ``m = num_steps`` Lanczos steps with full reorthogonalization give
    ``T = U Θ Uᵀ``; the nodes are ``Θ`` and the weights :math:`(e_1^\top U)^2 / n_v` (Golub & Meurant 2010;
    Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(4); Ghorbani, Krishnan & Xiao 2019,
    arXiv:1901.10159). The probes run in lockstep, so each step is one ``op @ V`` with ``n_v`` columns.

    The first moment equals the Hutchinson estimate from the same probes,
    :math:`\sum_l w_l\theta_l = \frac{1}{n_v}\sum_v v^\top A v / v^\top v`, so ``P`` times it estimates
    ``tr(A)`` (:meth:`SpectralDensity.trace_estimate`).

    Cost: at most ``n_v · m`` products, ``P · n_v · m`` memory. No step reads a value on the host (the
    coefficients come over in one transfer at the end), so a probe whose Krylov space becomes invariant
    before ``m`` steps keeps multiplying a zero vector until the next check after step 8, 16, 32, ..., where
    the run stops once every probe is finished (at most twice the products a low-rank operator needs);
    ``num_matvecs`` counts the products that entered the quadrature, ``n_v`` times the steps each probe took.

    Precision: as in :func:`~curvature.lanczos`, the Lanczos vectors live in the working
    precision (at least float32) and a probe's Krylov space counts as invariant when ``β`` falls to the rounding
    level of the products (``8 u ‖T‖`` in float16 and bfloat16, ``100 ε ‖T‖`` otherwise).

    Args:
        op: A symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device`` (a dense tensor must be
            symmetric to rounding, ``check_symmetric``; an operator flagged
            ``is_symmetric=False`` is refused).
        num_probes: The number of probe vectors ``n_v``.
        num_steps: Lanczos steps per probe ``m`` (capped at ``P``).
        generator: The source of the probes; None draws from a copy of torch's global generator
            without advancing it (:func:`curvature.sampling.resolve_generator`).
        distribution: ``"rademacher"`` (PyHessian's choice) or ``"gaussian"`` probes.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        ValueError: If ``num_probes``, ``num_steps`` or ``distribution`` are invalid, or ``op`` is not symmetric.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
        >>> density = spectral_density(A, num_probes=2, num_steps=4, generator=torch.Generator().manual_seed(0))
        >>> round(float(density.weights.sum()), 12), round(density.moment(1), 12)
        (1.0, 2.0)
    """
    operand = Operand(op, deferred=True)
    check_count(num_probes, "num_probes")
    check_count(num_steps, "num_steps")
    check_distribution(distribution)
    generator = resolve_generator(generator)
    num_steps = min(num_steps, operand.size)
    V0 = operand.probes(distribution, (operand.size, num_probes), generator)
    run = lanczos_many(operand, V0, num_steps)
    nodes, weights, owner = [], [], []
    for p, m in enumerate(run.lengths):
        theta, U = torch.linalg.eigh(_tridiagonal(run.alpha[p, :m], run.beta[p, : m - 1]))
        nodes.append(theta)
        weights.append(U[0].pow(2) / num_probes)
        owner.append(torch.full((m,), p, dtype=torch.long))
    return SpectralDensity(
        nodes=torch.cat(nodes), weights=torch.cat(weights), probe=torch.cat(owner), size=operand.size,
        num_probes=num_probes, num_matvecs=run.num_matvecs,
    )
