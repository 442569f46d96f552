r"""The blocks of a Kronecker-factored operator: products, eigendecompositions, damped inverses, log-determinants.

A block acts on one layer's parameters, arranged as matrices :math:`X_\gamma` (one per group :math:`\gamma`) by
:class:`~curvature.operators.kronecker.layers.Layer`:

.. math:: X_\gamma \mapsto R_\gamma\, X_\gamma\, C_\gamma,
    \qquad \text{i.e.}\quad \operatorname{vec}(X) \mapsto (R \otimes C) \operatorname{vec}(X)

with symmetric PSD factors :math:`R` (the row side: output gradients, or token frequencies for an embedding) and
:math:`C` (the column side: inputs). A factor is a dense ``(groups, n, n)`` tensor or the diagonal ``(groups, n)``
of one. With the eigendecompositions :math:`R = Q_R \Lambda_R Q_R^\top`, :math:`C = Q_C \Lambda_C Q_C^\top` the
block is :math:`(Q_R \otimes Q_C)\, \operatorname{diag}(s)\, (Q_R \otimes Q_C)^\top` with
:math:`s_{ij} = \lambda^R_i \lambda^C_j` (K-FAC), or with :math:`s` fitted to the data (EK-FAC, George et al. 2018),
which makes damped inverses, log-determinants and traces cost a few small matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["BlockEigen", "KroneckerBlock"]


@dataclass(frozen=True)
class BlockEigen:
    r"""The eigendecomposition of one block: :math:`(Q_R \otimes Q_C)\operatorname{diag}(s)(Q_R\otimes Q_C)^\top`.

    Attributes:
        layer: The module's name.
        params: The names of the block's parameters.
        eigenvalues: :math:`s`, shape ``(groups, rows, cols)``: the block's eigenvalues, entry ``[γ, i, j]`` belonging
            to the eigenvector :math:`q^R_{\gamma i} \otimes q^C_{\gamma j}`.
        row_eigenvectors: :math:`Q_R`, ``(groups, rows, rows)`` (None: the identity, for a diagonal factor).
        col_eigenvectors: :math:`Q_C`, ``(groups, cols, cols)`` (None: the identity).
    """

    layer: str
    params: tuple[str, ...]
    eigenvalues: torch.Tensor
    row_eigenvectors: torch.Tensor | None
    col_eigenvectors: torch.Tensor | None


def _eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (clamped at 0: the factors are PSD, negatives are rounding) and eigenvectors of a factor."""
    if factor.ndim == 2:  # diagonal
        return factor.clamp_min(0), None
    values, vectors = torch.linalg.eigh(factor)
    return values.clamp_min(0), vectors


def _left(factor: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``factor @ X`` for ``X`` of shape ``(k, groups, m, n)``."""
    return factor.unsqueeze(-1) * X if factor.ndim == 2 else factor @ X


def _right(X: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``X @ factor``."""
    return X * factor.unsqueeze(-2) if factor.ndim == 2 else X @ factor


def _rotate(X: torch.Tensor, q_row: torch.Tensor | None, q_col: torch.Tensor | None, back: bool) -> torch.Tensor:
    """``Q_R^T X Q_C`` (into the eigenbasis) or ``Q_R X Q_C^T`` (``back``)."""
    if q_row is not None:
        X = (q_row if back else q_row.transpose(-1, -2)) @ X
    if q_col is not None:
        X = X @ (q_col.transpose(-1, -2) if back else q_col)
    return X


def _trace(factor: torch.Tensor) -> torch.Tensor:
    return factor.sum(-1) if factor.ndim == 2 else factor.diagonal(dim1=-2, dim2=-1).sum(-1)


def _squared_norm(factor: torch.Tensor) -> torch.Tensor:
    return factor.square().sum(-1) if factor.ndim == 2 else factor.square().sum((-2, -1))


class KroneckerBlock:
    r"""One layer's block :math:`R \otimes C` (per group), or its eigenvalue-corrected form.

    Args:
        row: The row factor :math:`R`: ``(groups, m, m)`` or its diagonal ``(groups, m)``.
        col: The column factor :math:`C`: ``(groups, n, n)`` or ``(groups, n)``.
        scaling: None for K-FAC; for EK-FAC the fitted eigenvalues ``(groups, m, n)`` in the factors' eigenbasis.
        heuristic: Whether the π-corrected heuristic damping applies (blocks with two genuine factors; False for a
            normalization layer's block, whose row factor is the number 1).
    """

    def __init__(self, row: torch.Tensor, col: torch.Tensor, scaling: torch.Tensor | None = None,
                 heuristic: bool = True) -> None:
        self.row, self.col, self.scaling, self.heuristic = row, col, scaling, heuristic
        self._eigen: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(λ_R, Q_R, λ_C, Q_C)``, computed once."""
        if self._eigen is None:
            self._eigen = (*_eigh(self.row), *_eigh(self.col))
        return self._eigen

    def eigenvalues(self) -> torch.Tensor:
        """The block's eigenvalues ``(groups, m, n)``."""
        if self.scaling is not None:
            return self.scaling
        lr, _, lc, _ = self.eigen()
        return lr.unsqueeze(-1) * lc.unsqueeze(-2)

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """The block times ``X`` of shape ``(k, groups, m, n)``."""
        if self.scaling is None:
            return _right(_left(self.row, X), self.col)
        _, qr, _, qc = self.eigen()
        return _rotate(_rotate(X, qr, qc, back=False) * self.scaling, qr, qc, back=True)

    def solve(self, X: torch.Tensor, damping: float, heuristic: bool) -> torch.Tensor:
        r"""``(block + damping I)^{-1} X``, or the π-corrected heuristic damping.

        With ``heuristic``: :math:`(R + \frac{\sqrt\delta}{\pi} I)^{-1} \otimes (C + \pi\sqrt\delta I)^{-1}`
        (Martens & Grosse 2015, Sec. 6.3).
        """
        lr, qr, lc, qc = self.eigen()
        if heuristic and self.heuristic and self.scaling is None:
            pi = self.pi()
            root = math.sqrt(damping)
            denominator = (lr + root / pi).unsqueeze(-1) * (lc + root * pi).unsqueeze(-2)
        else:
            denominator = self.eigenvalues() + damping
        return _rotate(_rotate(X, qr, qc, back=False) / denominator, qr, qc, back=True)

    def pi(self) -> torch.Tensor:
        r""":math:`\pi = \sqrt{(\operatorname{tr} C / n) / (\operatorname{tr} R / m)}` per group (1 at a zero trace)."""
        tr_row = _trace(self.row) / self.row.shape[-1]
        tr_col = _trace(self.col) / self.col.shape[-1]
        ok = (tr_row > 0) & (tr_col > 0)
        pi = torch.where(ok, (tr_col / tr_row.where(ok, 1)).sqrt(), torch.ones_like(tr_row))
        return pi.unsqueeze(-1)

    def smallest_denominator(self, damping: float, heuristic: bool) -> float:
        """The smallest eigenvalue of the damped block (0: singular)."""
        lr, _, lc, _ = self.eigen()
        if heuristic and self.heuristic and self.scaling is None:
            root = math.sqrt(damping)
            return float(((lr + root / self.pi()).unsqueeze(-1) * (lc + root * self.pi()).unsqueeze(-2)).min())
        return float((self.eigenvalues() + damping).min())

    def logdet(self, damping: float) -> torch.Tensor:
        """``log det(block + damping I)``."""
        return torch.log(self.eigenvalues() + damping).sum()

    def trace(self) -> torch.Tensor:
        """The trace: ``tr R · tr C`` per group (the sum of the scalings for EK-FAC)."""
        if self.scaling is not None:
            return self.scaling.sum()
        return (_trace(self.row) * _trace(self.col)).sum()

    def squared_frobenius(self) -> torch.Tensor:
        """``‖block‖_F²``: ``‖R‖² ‖C‖²`` per group (the squared scalings for EK-FAC)."""
        if self.scaling is not None:
            return self.scaling.square().sum()
        return (_squared_norm(self.row) * _squared_norm(self.col)).sum()

    def state(self) -> dict[str, torch.Tensor]:
        """The block's tensors, for ``state_dict``."""
        out = {"row": self.row, "col": self.col}
        if self.scaling is not None:
            out["scaling"] = self.scaling
        return out
