r"""Optimal Brain Surgeon with a Kronecker-factored curvature: saliencies and the compensating update, layer-wise.

Optimal Brain Surgeon (Hassibi & Stork 1993) removes the weights :math:`w_Q` that raise the quadratic model
:math:`\tfrac12\,\delta^\top B\,\delta` of the loss least once the remaining weights are moved to compensate:

.. math::
    \Delta L_Q = \tfrac12\, w_Q^\top \big([B^{-1}]_{QQ}\big)^{-1} w_Q, \qquad
    \delta = -B^{-1} E_Q \big([B^{-1}]_{QQ}\big)^{-1} w_Q,

with :math:`E_Q` the columns of the identity at :math:`Q`; for one weight :math:`q` this is :math:`w_q^2 /
(2 [B^{-1}]_{qq})` and :math:`\delta = -w_q B^{-1} e_q / [B^{-1}]_{qq}`. Here :math:`B = K + \gamma I` is the
damped K-FAC (or EK-FAC) curvature, block diagonal over layers, so OBS is layer-wise (Frantar & Alistarh 2022,
"Optimal Brain Compression", NeurIPS) and each layer's inverse is read off K-FAC's eigendecomposition
(:meth:`curvature.KFACOperator.eigh`):

.. math::
    B^{-1} = (Q_R \otimes Q_C)\, \operatorname{diag}(d)\, (Q_R \otimes Q_C)^\top, \qquad d_{ab} = 1/(s_{ab} + \gamma),

on the layer's parameters arranged as a matrix :math:`X` (rows: output channels; columns: the filter's entries,
then the bias), with :math:`s_{ab} = \lambda^G_a \lambda^A_b` (K-FAC) or the fitted eigenvalues (EK-FAC). Then

* one weight :math:`(i, j)`: :math:`[B^{-1}]_{(ij)(ij)} = \big((Q_R \odot Q_R)\, d\, (Q_C \odot Q_C)^\top\big)_{ij}`;
  undamped K-FAC gives :math:`[G^{-1}]_{ii} [A^{-1}]_{jj}`, Wang et al. (2019)'s Kronecker-factored OBS;
* one output channel (row :math:`i` with its bias): :math:`[B^{-1}]_{SS} = Q_C \operatorname{diag}(c_i) Q_C^\top`
  with :math:`c_{ib} = \sum_a (Q_R)_{ia}^2 d_{ab}`, so :math:`\Delta L_S = \tfrac12 \sum_b (X Q_C)_{ib}^2 / c_{ib}`
  without any inverse (EigenDamage's "C-OBS", Wang, Zhang, Wang, Grosse 2019, ICML, in its exactly damped form);
* a whole layer: :math:`\Delta L = \tfrac12\, w^\top B\, w = \tfrac12 \sum_{ab} (Q_R^\top X Q_C)_{ab}^2 / d_{ab}`.

The update for a set of weights removed together solves one system per layer: for whole rows :math:`P`, one
:math:`|P| \times |P|` system per column eigenvector of :math:`C` (the rotation by :math:`Q_C` decouples the
columns); for single weights, the :math:`k \times k` system of :math:`[B^{-1}]_{QQ}` or of :math:`B_{RR}` (the
remaining weights :math:`R`), whichever is smaller, :math:`k = \min(|Q|, |R|)`, at :math:`O(k^2 mn + k^3)` per
layer of :math:`mn` parameters (WoodFisher, Singh & Alistarh 2020, NeurIPS, does the same with a Woodbury-built
inverse of the empirical Fisher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._checks import check_scalar
from ..operators import EKFACOperator, KFACOperator
from ..operators.kronecker import BlockEigen

__all__ = ["OBS_METHODS", "RELATIVE_DAMPING", "InverseBlock", "inverse_blocks", "obs_scores", "obs_update"]

#: The Optimal Brain Surgeon methods of :func:`curvature.pruning.sensitivity`, by the curvature they invert.
OBS_METHODS: dict[str, type[KFACOperator]] = {"obs_kfac": KFACOperator, "obs_ekfac": EKFACOperator}
#: With ``damping=None``: :math:`\gamma = 0.01 \operatorname{tr}(K_\ell) / P_\ell` per layer, 1% of the block's mean
#: eigenvalue (the relative damping of Optimal Brain Compression and GPTQ, Frantar & Alistarh 2022, 2023).
RELATIVE_DAMPING = 1e-2
_FACTORED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True, eq=False)
class InverseBlock:
    r"""One layer's damped K-FAC inverse in the eigenbasis of its factors, per group of a grouped convolution.

    :math:`(K_\ell + \gamma I)^{-1} = (Q_R \otimes Q_C)\operatorname{diag}(d)(Q_R \otimes Q_C)^\top`.

    The layer's weight ``(out, in/groups, *kernel)`` and bias ``(out,)`` are arranged as matrices ``(groups, rows,
    cols)``: row ``i`` of group ``g`` is output channel ``g * rows + i``, its columns the filter's entries (input
    channel slowest) followed by the bias, as K-FAC lays them out.

    Attributes:
        layer: The module's name.
        row_eigenvectors: :math:`Q_R` (of the output-gradient factor :math:`G`), ``(groups, rows, rows)``.
        col_eigenvectors: :math:`Q_C` (of the input factor :math:`A`), ``(groups, cols, cols)``.
        inverse_eigenvalues: :math:`d = 1/(s + \gamma)`, ``(groups, rows, cols)``.
        damping: :math:`\gamma`.
        bias: Whether the last column is the bias.
    """

    layer: str
    row_eigenvectors: torch.Tensor
    col_eigenvectors: torch.Tensor
    inverse_eigenvalues: torch.Tensor
    damping: float
    bias: bool

    def matrix(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's weight (and bias) as the ``(groups, rows, cols)`` matrices the block acts on."""
        groups = self.inverse_eigenvalues.shape[0]
        X = weight.reshape(groups, weight.shape[0] // groups, -1)
        if self.bias:
            X = torch.cat([X, bias.reshape(groups, -1, 1)], dim=-1)
        return X.to(self.inverse_eigenvalues.dtype)

    def tensors(self, X: torch.Tensor, weight_shape: torch.Size) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The inverse of :meth:`matrix`: the weight-shaped and the bias-shaped parts (None without a bias)."""
        if not self.bias:
            return X.reshape(weight_shape), None
        return X[..., :-1].reshape(weight_shape), X[..., -1].reshape(-1)

    def diagonal(self) -> torch.Tensor:
        r"""The diagonal of the inverse ``(groups, rows, cols)``: :math:`(Q_R^{\odot 2} d\, Q_C^{\odot 2\top})_{ij}`."""
        qr, qc = self.row_eigenvectors, self.col_eigenvectors
        return qr.square() @ self.inverse_eigenvalues @ qc.square().transpose(-1, -2)


def inverse_blocks(model: nn.Module, loss_fn: Any, data: Any, method: str, chosen: dict[str, nn.Module],
                   damping: Optional[float], generator: torch.Generator,
                   operator_kwargs: dict[str, Any]) -> dict[str, InverseBlock]:
    r"""Build the K-FAC (or EK-FAC) operator over the chosen layers and return each layer's damped inverse.

    Args:
        model: The model (a model that ``torch.nn.utils.prune`` masked is measured through a copy without the
            masks, at its effective weights; the model itself is left unchanged).
        loss_fn: The loss.
        data: One batch or an iterable of batches.
        method: ``"obs_kfac"`` or ``"obs_ekfac"``.
        chosen: The candidate layers by module name (:func:`~curvature.pruning.prunable_layers`).
        damping: :math:`\gamma \ge 0`, or None for :data:`RELATIVE_DAMPING` times each block's mean eigenvalue.
        generator: Seeds the draws of ``fisher_type="mc"``.
        operator_kwargs: Passed to the operator (``fisher_type=``, ``kfac_approx=``, ``reduction=``, ...).

    Returns:
        ``"<module>.weight"`` to the layer's :class:`InverseBlock`.

    Raises:
        ValueError: For a layer K-FAC does not factor (``nn.Conv3d``), a negative damping, or a singular damped
            block (``damping=0``, or a block that is zero).
    """
    if damping is not None:
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative (or None for the relative damping), got {damping}.")
    for name, module in chosen.items():
        if not isinstance(module, _FACTORED):
            raise ValueError(
                f"method {method!r} needs K-FAC's factors, which exist for nn.Linear, nn.Conv1d and nn.Conv2d; "
                f"layer {name!r} is a {type(module).__name__}: leave it out of layers, or use 'hap' or 'obd'."
            )
    if any(hasattr(m, "weight_orig") or hasattr(m, "bias_orig") for m in chosen.values()):
        model = _without_masks(model)
        chosen = {name: model.get_submodule(name) for name in chosen}
    params = [p for m in chosen.values() for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    kwargs = {"generator": generator, **operator_kwargs}
    op = OBS_METHODS[method](model, loss_fn, data, params=params, **kwargs)
    names = {module: name for name, module in chosen.items()}
    blocks = {}
    for layer, eigen in zip(op.layers, op.eigh()):
        name = names[layer.module]
        blocks[f"{name}.weight"] = _inverse_block(name, eigen, layer.bias is not None, damping)
    return blocks


def _without_masks(model: nn.Module) -> nn.Module:
    """A copy of the model with every ``torch.nn.utils.prune`` mask made permanent (its effective weights).

    A masked tensor (``weight = weight_orig * weight_mask``) is no graph leaf, which ``copy.deepcopy`` refuses; the
    copy takes it detached, and ``prune.remove`` then makes it the copy's parameter.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for kind in ("weight", "bias"):
            if hasattr(module, f"{kind}_orig"):
                tensor = getattr(module, kind)
                memo[id(tensor)] = tensor.detach()
    copied = copy.deepcopy(model, memo)
    for module in copied.modules():
        for kind in ("weight", "bias"):
            if hasattr(module, f"{kind}_orig"):
                torch_prune.remove(module, kind)
    return copied


def _inverse_block(name: str, eigen: BlockEigen, bias: bool, damping: Optional[float]) -> InverseBlock:
    """The damped inverse of one block from its eigendecomposition."""
    s = eigen.eigenvalues
    gamma = RELATIVE_DAMPING * float(s.mean()) if damping is None else damping
    if float((s + gamma).min()) <= 0:
        raise ValueError(
            f"the damped K-FAC block of layer {name!r} is singular (damping={gamma}"
            + (", 1% of a zero block: the layer gets no curvature from this data" if damping is None else "")
            + "); pass damping > 0."
        )
    return InverseBlock(name, _basis(eigen.row_eigenvectors, s, -2), _basis(eigen.col_eigenvectors, s, -1),
                        1.0 / (s + gamma), gamma, bias)


def _basis(vectors: Optional[torch.Tensor], s: torch.Tensor, dim: int) -> torch.Tensor:
    """A factor's eigenvectors; the identity for a diagonal factor (its own eigenbasis; never Linear's or Conv's)."""
    if vectors is not None:
        return vectors.to(s)
    size = s.shape[dim]
    return torch.eye(size, dtype=s.dtype, device=s.device).expand(s.shape[0], size, size)


def obs_scores(block: InverseBlock, weight: torch.Tensor, bias: Optional[torch.Tensor],
               granularity: str) -> torch.Tensor:
    r"""The OBS saliency :math:`\tfrac12 w_S^\top ([B^{-1}]_{SS})^{-1} w_S` of every weight, output channel or layer.

    Args:
        block: The layer's damped inverse.
        weight: The layer's (effective) weight.
        bias: Its bias (None if the block has none).
        granularity: ``"weight"`` (the weight's shape), ``"channel"`` (``(out,)``) or ``"layer"`` (0-d).

    Returns:
        The saliencies, in the weight's dtype.
    """
    X = block.matrix(weight, bias)
    qr, qc, d = block.row_eigenvectors, block.col_eigenvectors, block.inverse_eigenvalues
    if granularity == "weight":
        scores = X.square() / (2 * block.diagonal())
        return block.tensors(scores, weight.shape)[0].to(weight.dtype)
    if granularity == "channel":
        c = qr.square() @ d
        return (0.5 * ((X @ qc).square() / c).sum(-1)).reshape(-1).to(weight.dtype)
    rotated = qr.transpose(-1, -2) @ X @ qc
    return (0.5 * (rotated.square() / d).sum()).to(weight.dtype)


def obs_update(block: InverseBlock, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_mask: torch.Tensor,
               bias_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""The OBS update :math:`\delta = -B^{-1} E_Q ([B^{-1}]_{QQ})^{-1} w_Q` of a layer whose masked weights go.

    :math:`Q` holds every entry the masks zero (also those an earlier mask removed: their weights are zero, and
    the update keeps them there); :math:`\delta_Q = -w_Q` and :math:`\delta` on the remaining entries is the
    compensation.

    Args:
        block: The layer's damped inverse.
        weight: The layer's effective weight before the masks.
        bias: Its bias (None if the block has none).
        weight_mask: 1 for the weights kept, 0 for those removed (the weight's shape).
        bias_mask: The same for the bias (None: kept).

    Returns:
        :math:`\delta` as ``(weight-shaped, bias-shaped or None)``, in the weight's dtype.
    """
    work = torch.float64 if weight.device.type != "mps" else torch.float32
    X = block.matrix(weight, bias).to(work)
    if block.bias and bias_mask is None:
        bias_mask = weight.new_ones(weight.shape[0])
    keep = block.matrix(weight_mask, bias_mask).to(work) != 0
    qr, qc, d = (t.to(work) for t in (block.row_eigenvectors, block.col_eigenvectors, block.inverse_eigenvalues))
    delta = torch.zeros_like(X)
    for g in range(X.shape[0]):
        removed = ~keep[g]
        if not bool(removed.any()) or bool(removed.all()):
            delta[g] = -X[g] * removed
            continue
        rows = removed.all(-1)
        if bool((removed == rows.unsqueeze(-1)).all()):  # whole rows: the column rotation decouples them
            delta[g] = _rows_update(X[g], rows, qr[g], qc[g], d[g])
        else:
            delta[g] = _entries_update(X[g], removed, qr[g], qc[g], d[g])
        delta[g][removed] = -X[g][removed]  # exactly
    dw, db = block.tensors(delta, weight.shape)
    return dw.to(weight.dtype), None if db is None else db.to(weight.dtype)


def _rows_update(X: torch.Tensor, rows: torch.Tensor, qr: torch.Tensor, qc: torch.Tensor,
                 d: torch.Tensor) -> torch.Tensor:
    r"""OBS for whole rows :math:`P`, one small system per column eigenvector :math:`b` of the input factor.

    :math:`M_b = Q_R[P] \operatorname{diag}(d_{:b}) Q_R[P]^\top` and :math:`\hat\delta_{:b} = -Q_R (d_{:b} \odot
    Q_R[P]^\top M_b^{-1} (X Q_C)_{Pb})`, then :math:`\delta = \hat\delta Q_C^\top`.
    """
    qp = qr[rows]                                        # (p, m)
    M = torch.einsum("pa,ab,qa->bpq", qp, d, qp)         # (n, p, p)
    y = torch.linalg.solve(M, (X[rows] @ qc).T.unsqueeze(-1)).squeeze(-1)  # (n, p)
    return -(qr @ (d * (qp.T @ y.T))) @ qc.T


def _entries_update(X: torch.Tensor, removed: torch.Tensor, qr: torch.Tensor, qc: torch.Tensor,
                    d: torch.Tensor) -> torch.Tensor:
    r"""OBS for single entries: the system of :math:`[B^{-1}]_{QQ}` or of :math:`B_{RR}`, whichever is smaller."""
    q_idx, r_idx = removed.nonzero(as_tuple=True), (~removed).nonzero(as_tuple=True)
    if len(q_idx[0]) <= len(r_idx[0]):
        U = (qr[q_idx[0]].unsqueeze(-1) * qc[q_idx[1]].unsqueeze(-2)).flatten(1)  # rows Q of Q_R ⊗ Q_C
        S = (U * d.reshape(-1)) @ U.T
        y = torch.linalg.solve(S, X[removed])
        return -qr @ (d * (U.T @ y).reshape(d.shape)) @ qc.T
    U = (qr[r_idx[0]].unsqueeze(-1) * qc[r_idx[1]].unsqueeze(-2)).flatten(1)      # rows R
    S = (U / d.reshape(-1)) @ U.T                                                  # B_RR
    coupled = (qr.T @ (X * removed) @ qc) / d                                      # B x_Q in the eigenbasis
    delta = torch.zeros_like(X)
    delta[~removed] = torch.linalg.solve(S, (qr @ coupled @ qc.T)[~removed])
    return delta
