r"""EK-FAC: K-FAC's eigenbasis with the eigenvalues fitted to the data (George et al. 2018, NeurIPS).

K-FAC's block :math:`G \otimes A = (Q_G \otimes Q_A)(\Lambda_G \otimes \Lambda_A)(Q_G \otimes Q_A)^\top` keeps the
Kronecker eigenbasis but replaces the eigenvalues :math:`\lambda^G_i \lambda^A_j` by the second moments of the
projected per-sample gradients,

.. math:: s_{ij} = c \sum_n \sum_c \big( Q_G^\top \, \textstyle\sum_r g_{ncr} a_{nr}^\top \, Q_A \big)_{ij}^2,

the exact diagonal of the curvature's block in that basis. Among all operators with this eigenbasis it is the
closest to the block in Frobenius norm, so it is never farther from it than K-FAC. The fit is a second pass over
the data after the factors: one forward pass and one backward pass per column, plus the projections.
"""

from __future__ import annotations

from typing import Any

import torch

from .blocks import KroneckerBlock, _rotate
from .kfac import KFACInverse, KFACOperator, kfac_block, per_sample_gradients
from .layers import Layer

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

    def compute(self) -> None:
        """Compute the factors, their eigenbases and the fitted eigenvalues (two passes over the data)."""
        self._sync_with_model()
        key = self._fingerprint()
        if self._blocks is not None and key == self._factors_key:
            return
        self._blocks = None
        stats = self._statistics()
        bases = [kfac_block(layer, A, G) for layer, A, G in zip(self.layers, stats["A"], stats["G"])]
        self._bases = bases
        try:
            scalings = self._statistics()["S"]
        finally:
            self._bases = None
        self._blocks = [KroneckerBlock(b.row, b.col, scaling=s, heuristic=False) for b, s in zip(bases, scalings)]
        self._factors_key = key

    _bases: list[KroneckerBlock] | None = None

    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        if self._bases is None:
            return super()._prepare(leaves, outputs, targets, index)
        calls = self._calls(self._recording)
        self._recording.clear()
        rows_in = [torch.cat([layer.input_rows(x) for x, _ in c], dim=1) for layer, c in zip(self.layers, calls)]
        stats = self._gradient_statistics(leaves, outputs, targets, index, rows_in, calls)
        return {"S": stats["S"], "rows": [0.0] * len(self.layers)}

    def _gradient_outer(self, g: torch.Tensor) -> torch.Tensor:
        if self._bases is not None:  # the correction pass needs no factors
            return g.new_zeros(())
        return super()._gradient_outer(g)

    def _extra_statistics(self, rows_in: list[torch.Tensor]) -> dict[str, list[Any]]:
        return {} if self._bases is None else {"S": [0.0] * len(self.layers)}

    def _accumulate_extra(self, extra: dict[str, list[Any]], rows_in: list[torch.Tensor],
                          g_rows: list[torch.Tensor], scale: float) -> None:
        if self._bases is None:
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

    def _block_from_state(self, layer: Layer, saved: dict[str, torch.Tensor]) -> KroneckerBlock:
        if "scaling" not in saved:
            raise ValueError(f"the saved block of {layer.name!r} has no fitted eigenvalues: it is a K-FAC state.")
        return KroneckerBlock(saved["row"], saved["col"], saved["scaling"], heuristic=False)


def projected_squares(layer: Layer, block: KroneckerBlock, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_n (Q_R^T P_n Q_C)^2`` over the batch's per-sample gradients ``P_n`` of one column."""
    _, qr, _, qc = block.eigen()
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
    a = a.to(g.dtype)
    if layer.kind == "norm":
        projected = _rotate(per_sample_gradients(layer, a, g), qr, qc, back=False)
        return projected.square().sum(0)
    # project the rows first, per group: (Q_R^T g)(Q_C^T a)^T summed over rows
    ga = g if qr is None else torch.einsum("nrgi,gia->nrga", g, qr)
    aa = a if qc is None else torch.einsum("nrgj,gjb->nrgb", a, qc)
    return torch.einsum("nrgi,nrgj->ngij", ga, aa).square().sum(0)
