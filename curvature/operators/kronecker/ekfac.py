r"""EK-FAC: K-FAC's eigenbasis with the eigenvalues fitted to the data (George et al. 2018, NeurIPS).

K-FAC's block :math:`G \otimes A = (Q_G \otimes Q_A)(\Lambda_G \otimes \Lambda_A)(Q_G \otimes Q_A)^\top` keeps the
Kronecker eigenbasis but replaces the eigenvalues :math:`\lambda^G_i \lambda^A_j` by the second moments of the
projected per-sample gradients,

.. math:: s_{ij} = c \sum_n \sum_c \big( Q_G^\top \, \textstyle\sum_r g_{ncr} a_{nr}^\top \, Q_A \big)_{ij}^2,

the exact diagonal of the curvature's block in that basis. Among all operators with this eigenbasis it is the
closest to the block in Frobenius norm, so it is never farther from it than K-FAC. The fit comes after the
factors: for a single batch from the rows of the factors' pass, else a second pass over the data (one forward pass
and one backward pass per column), plus the eigendecompositions and the projections.
"""

from __future__ import annotations

from typing import Any

import torch

from .blocks import KroneckerBlock, _rotate
from .kfac import KFACInverse, KFACOperator, diagonal_block, kfac_block
from .layers import Layer
from .statistics import per_sample_gradients

__all__ = ["EKFACOperator"]


class EKFACOperator(KFACOperator):
    r"""The eigenvalue-corrected K-FAC (EK-FAC): K-FAC's eigenvectors, eigenvalues fitted per layer.

    Same arguments, layers and methods as :class:`~curvature.operators.kronecker.kfac.KFACOperator`. The scalings are
    fitted to the per-sample gradients of the same columns as the factors (``fisher_type``): per data point for
    ``"empirical"``, per sample and output column for ``"ggn"``, per sample and draw for ``"mc"``; for layers with
    weight sharing the per-sample gradient sums over the rows, whatever ``kfac_approx`` (which only shapes the
    eigenbasis). :meth:`inverse` damps the fitted eigenvalues exactly (the heuristic factored damping does not apply).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> E = EKFACOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> E.shape
        (26, 26)
    """

    name = "ekfac"
    title = "EK-FAC"

    def _compute_blocks(self) -> list[KroneckerBlock]:
        """The factors, their eigenbases and the fitted eigenvalues.

        Two passes over the data: the factors', then the fit's in their eigenbasis. For a single batch the fit reuses
        the rows of the first pass instead (while they take at most :attr:`keep_rows_limit` bytes).
        """
        # One batch in one process: the rows of the factors' pass are kept (within a memory bound) and fitted
        # after it, instead of a second forward and backward pass.
        self._kept = [] if self._data.single and self._shards is None else None
        try:
            stats = self._statistics()
            bases = [kfac_block(layer, A, G) for layer, A, G in zip(self.layers, stats["A"], stats["G"])]
            kept, self._kept = self._kept, None
            if kept is not None:
                scalings = [sum(scale * projected_squares(layer, basis, rows_in[i], g_rows[i])
                                for rows_in, g_rows, scale in kept)
                            for i, (layer, basis) in enumerate(zip(self.layers, bases))]
                del kept
            else:
                self._bases = bases
                try:
                    scalings = self._statistics()["S"]
                finally:
                    self._bases = None
        finally:
            self._kept = None
        blocks = [KroneckerBlock(b.row, b.col, scaling=s, heuristic=False) for b, s in zip(bases, scalings)]
        if self.diagonal is not None:  # the exact diagonal is its own best scaling
            blocks.append(diagonal_block(stats["D"][0]))
        return blocks

    _bases: list[KroneckerBlock] | None = None
    _kept: list[tuple[list[torch.Tensor], list[torch.Tensor], float]] | None = None
    #: The most bytes of rows kept from the factors' pass for the fit (beyond it, a second pass over the data).
    keep_rows_limit = 2**28

    def _diagonal_wanted(self) -> bool:
        return self._bases is None

    def _statistic_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        if self._bases is None:
            return super()._statistic_shapes()
        return {"S": [layer.sizes() for layer in self.layers]}

    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        if self._bases is None:
            return super()._prepare(leaves, outputs, targets, index)
        calls, rows_in = self._batch_rows()
        stats = self._gradient_statistics(leaves, outputs, targets, index, rows_in, calls)
        return {"S": stats["S"]}

    def _gradient_outer(self, g: torch.Tensor) -> torch.Tensor:
        if self._bases is not None:  # the correction pass needs no factors
            return g.new_zeros(())
        return super()._gradient_outer(g)

    def _extra_statistics(self, rows_in: list[torch.Tensor]) -> dict[str, list[Any]]:
        return {} if self._bases is None else {"S": [0.0] * len(self.layers)}

    def _accumulate_extra(self, extra: dict[str, list[Any]], rows_in: list[torch.Tensor],
                          g_rows: list[torch.Tensor], scale: float) -> None:
        if self._bases is None:
            if self._kept is not None:  # the factors' pass of a single batch: keep its rows for the fit
                size = sum(t.numel() * t.element_size() for t in g_rows) + sum(
                    t.numel() * t.element_size() for _, g, _ in self._kept for t in g)
                if size > self.keep_rows_limit:
                    self._kept = None  # too large: the fit makes its own pass
                else:
                    self._kept.append((rows_in, g_rows, scale))
            return
        for i, (layer, block, a, g) in enumerate(zip(self.layers, self._bases, rows_in, g_rows)):
            extra["S"][i] = extra["S"][i] + scale * projected_squares(layer, block, a, g)

    def inverse(self, damping: float = 0.0, heuristic_damping: bool = False) -> KFACInverse:
        r"""The inverse of the damped operator, block by block, as an operator.

        :math:`(E + \delta I)^{-1} = (Q_G \otimes Q_A)(\operatorname{diag}(s) + \delta I)^{-1}(Q_G \otimes
        Q_A)^\top`.

        Raises:
            ValueError: For ``heuristic_damping=True`` (EK-FAC has no factored damping), a negative or (for a singular
                operator) zero damping.
        """
        if heuristic_damping:
            raise ValueError("EK-FAC's eigenvalues are not a Kronecker product, so the factored (heuristic) damping "
                             "does not apply; use heuristic_damping=False (exact damping).")
        return super().inverse(damping, False)

    def _block_from_state(self, layer: Any, saved: dict[str, torch.Tensor]) -> KroneckerBlock:
        if layer.kind == "diagonal":
            return diagonal_block(saved["col"].reshape(-1))
        if "scaling" not in saved:
            raise ValueError(f"the saved block of {layer.name!r} has no fitted eigenvalues: it is a K-FAC state.")
        return KroneckerBlock(saved["row"], saved["col"], saved["scaling"], heuristic=False)


def projected_squares(layer: Layer, block: KroneckerBlock, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_{k,n} (Q_R^T P_{kn} Q_C)^2`` over the per-sample gradients ``P_{kn}`` of the columns ``k``.

    ``g`` holds the output-gradient rows of every column: ``(columns, N, R, groups, width)``.
    """
    _, qr, _, qc = block.eigen()
    if layer.kind == "embedding" or layer.kind == "norm":
        return sum(_projected_squares(layer, qr, qc, a, g_k) for g_k in g)
    a = a.to(g.dtype)
    ga = g if qr is None else torch.einsum("knrgi,gij->knrgj", g, qr)
    aa = a if qc is None else torch.einsum("nrgi,gij->nrgj", a, qc)
    if ga.shape[2] == 1:  # one row per sample: (g_i a_j)^2 = g_i^2 a_j^2, a matrix product over the samples
        return torch.einsum("ngi,ngj->gij", ga[:, :, 0].square().sum(0), aa[:, 0].square())
    return sum(torch.einsum("nrgi,nrgj->ngij", g_k, aa).square().sum(0) for g_k in ga)


def _projected_squares(layer: Layer, qr: torch.Tensor | None, qc: torch.Tensor | None, a: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
    """:func:`projected_squares` of one column, for embeddings and normalization layers."""
    if layer.kind == "embedding":  # per-sample sums by token without an (N, vocab, dim) tensor
        n, rows = a.shape
        vocab = layer.module.num_embeddings
        keys = (torch.arange(n, device=a.device).unsqueeze(1) * vocab + a).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(unique.numel(), g.shape[-1]).index_add_(0, inverse, g.reshape(n * rows, -1))
        if qc is not None:
            sums = sums @ qc.squeeze(0)
        out = g.new_zeros(vocab, g.shape[-1]).index_add_(0, unique % vocab, sums.square())
        if layer.module.padding_idx is not None:
            out[layer.module.padding_idx] = 0
        return out.unsqueeze(0)
    projected = _rotate(per_sample_gradients(layer, a.to(g.dtype), g), qr, qc, back=False)
    return projected.square().sum(0)
