r"""``torch.nn.CrossEntropyLoss``: a categorical at every position, Hessian :math:`\operatorname{diag} p - pp^\top`."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Loss, OutputMatrix, Reduction, require_tensor_targets

__all__ = ["CrossEntropy", "position_weights"]


def position_weights(
    loss_fn: nn.CrossEntropyLoss | nn.NLLLoss, targets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    r"""Per-position factor ``w_u`` of the cross-entropy Hessian, shape ``(N, d1, ...)``.

    For the loss :math:`-\sum_c w_c q_c \log p_c` with target distribution :math:`q` (after label
    smoothing) and class weights :math:`w` (ones by default) the Hessian in the logits is
    :math:`(\sum_c w_c q_c)(\operatorname{diag} p - p p^\top)`. For class indices without weights that
    factor is 1 (0 at ignored positions); for probability targets it is their (weighted) sum, which is
    not 1 for unnormalized or masked (all-zero) targets. ``NLLLoss`` (class indices only) shares the
    index path, which is also its mean normalizer.
    """
    if targets.is_floating_point():
        smoothing = loss_fn.label_smoothing
        q = targets.to(dtype)
        if smoothing > 0:
            q = q * (1 - smoothing) + smoothing / targets.shape[1]
        if loss_fn.weight is not None:
            q = q * loss_fn.weight.to(dtype).view([1, -1] + [1] * (targets.ndim - 2))
        return q.sum(1)
    mask = targets != loss_fn.ignore_index
    if loss_fn.weight is None:
        return mask.to(dtype)
    return loss_fn.weight.to(dtype)[targets.clamp(min=0)] * mask


class CrossEntropy(Loss):
    r"""Cross-entropy over the class dimension 1 of ``(N, C)`` or ``(N, C, d1, ...)`` logits, at every position.

    Class-index or probability targets, ``ignore_index``, ``weight`` and ``label_smoothing``. The output Hessian
    at position :math:`u` is :math:`c\,w_u(\operatorname{diag} p_u - p_u p_u^\top)`, :math:`p_u` the softmax over
    the classes and :math:`w_u` the weight of its target (:func:`position_weights`); without class weights the
    loss is the negative log-likelihood of a categorical, whose Fisher equals this GGN (Martens 2020,
    arXiv:1412.1193, Sec. 9).
    """

    kind = "ce"
    modules = (nn.CrossEntropyLoss,)
    unit_dims = (1,)

    def check_targets(self, outputs: torch.Tensor, targets: Any) -> None:
        """Batched logits; probability targets of the logits' shape, or int64 class indices in range.

        Raises:
            ValueError: On a shape mismatch or class index out of range.
            TypeError: On targets that are not a tensor, or class indices that are not int64.
        """
        require_tensor_targets(self.loss_fn, targets)
        if outputs.ndim < 2:
            raise ValueError(
                f"CrossEntropyLoss outputs must be batched logits (N, C) or (N, C, d1, ...), got shape "
                f"{tuple(outputs.shape)}; add a batch dimension with unsqueeze(0)."
            )
        if targets.is_floating_point():
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"class-probability targets of shape {tuple(targets.shape)} do not match logits of shape "
                    f"{tuple(outputs.shape)}."
                )
            return
        if targets.dtype != torch.long:
            raise TypeError(
                f"class-index targets must have dtype torch.int64, got {targets.dtype}; use targets.long()."
            )
        expected = (outputs.shape[0], *outputs.shape[2:])
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"class-index targets of shape {tuple(targets.shape)} do not match logits of shape "
                f"{tuple(outputs.shape)}; expected targets of shape {expected}."
            )
        valid = targets[targets != self.loss_fn.ignore_index]
        num_classes = outputs.shape[1]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            raise ValueError(
                f"class-index targets must lie in [0, {num_classes}), got values in "
                f"[{int(valid.min())}, {int(valid.max())}]."
            )

    def mean_count(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """The non-ignored positions, or their summed class weights with ``weight=`` (as PyTorch defines it).

        ``N * d1 * ...`` positions for probability targets.
        """
        if targets.is_floating_point():
            return float(targets.numel() // targets.shape[1])
        return float(position_weights(self.loss_fn, targets, torch.float64).sum())

    def _weights(self, z: torch.Tensor, targets: torch.Tensor, reduction: Reduction) -> torch.Tensor:
        r""":math:`c\,w_u` per position, shape ``(N, d1, ...)``."""
        weights = position_weights(self.loss_fn, targets, z.dtype)
        count = self.mean_count(targets, None)
        if reduction == "mean" and count > 0:  # a batch with every target ignored has zero curvature
            weights = weights / count
        return weights

    def output_hessian(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
        r"""Per position :math:`U_u \mapsto c\,w_u (p_u \odot U_u - p_u\, p_u^\top U_u)`."""
        z = outputs.detach()
        p = torch.softmax(z, dim=1).unsqueeze(0)
        w = self._weights(z, targets, reduction).unsqueeze(1).unsqueeze(0)

        def ce_hessian(U: torch.Tensor) -> torch.Tensor:
            pU = p * U
            return w * (pU - p * pU.sum(dim=2, keepdim=True))

        return ce_hessian

    def output_hessian_sqrt(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        r"""Column :math:`k` at position :math:`u`: :math:`\sqrt{c\,w_u}\,(\sqrt{p_{uk}}\, e_k - p_u \sqrt{p_{uk}})`.

        Since :math:`\sum_k p_k = 1`, :math:`(\operatorname{diag}\sqrt p - p \sqrt p^\top)(\cdot)^\top =
        \operatorname{diag} p - p p^\top`. Shape ``(C, *z.shape)``; the class dimension is the unit.

        Raises:
            ValueError: If a position's weight is negative (a negative class weight or probability target).
        """
        z = outputs.detach()
        weights = self._weights(z, targets, reduction)
        if bool((weights < 0).any()):
            raise ValueError("the output Hessian has no real square root where a target's weight is negative; "
                             "use non-negative class weights and probability targets.")
        p = torch.softmax(z, dim=1)
        root = p.sqrt()
        classes = p.shape[1]
        onehot = torch.eye(classes, dtype=z.dtype, device=z.device).view(classes, 1, classes, *[1] * (z.ndim - 2))
        columns = root.movedim(1, 0).unsqueeze(2) * (onehot - p.unsqueeze(0))  # (C, N, C, d1, ...)
        return weights.sqrt().unsqueeze(1).unsqueeze(0) * columns

    def check_ggn(self) -> None:
        """Refuse ``weight=`` with ``label_smoothing=`` (no closed form here).

        Raises:
            ValueError: For both at once.
        """
        if self.loss_fn.weight is not None and self.loss_fn.label_smoothing > 0:
            raise ValueError(
                "CrossEntropyLoss with both weight= and label_smoothing= has no closed-form Gauss-Newton "
                "here; use curvature.HessianOperator, or drop one of the two."
            )

    def check_fisher(self) -> None:
        """Refuse class weights: a class-weighted loss is not a likelihood.

        Raises:
            ValueError: For ``weight=``.
        """
        if self.loss_fn.weight is not None:
            raise ValueError(
                "CrossEntropyLoss with class weight= is not a likelihood, so it has no Fisher; use GGNOperator."
            )

    def sampled_output_gradients(
        self, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        r""":math:`g_u = p_u - e_{\hat y_u}`, :math:`\hat y_u \sim p_u` at every position, zero at ignored ones."""
        z = outputs.detach()
        probs = torch.softmax(z, dim=1).movedim(1, -1)  # (N, d1, ..., C)
        flat = probs.reshape(-1, probs.shape[-1])
        draws = torch.multinomial(flat.to(generator.device), num_samples, replacement=True, generator=generator)
        onehot = F.one_hot(draws.to(z.device).T, flat.shape[-1]).to(z.dtype)  # (M, N*d, C)
        grads = (flat.unsqueeze(0) - onehot).reshape(num_samples, *probs.shape).movedim(-1, 2)
        if not targets.is_floating_point():
            grads = grads * (targets != self.loss_fn.ignore_index).unsqueeze(1).unsqueeze(0).to(z.dtype)
        return grads

    def per_sample_losses(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        """The sum over a sample's positions, divided by their weight for a mean (a mean for probability targets)."""
        loss_fn = self.loss_fn
        entries = F.cross_entropy(
            outputs, targets, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction="none",
            label_smoothing=loss_fn.label_smoothing,
        )
        entries = entries.reshape(entries.shape[0], math.prod(entries.shape[1:]))
        if reduction == "sum":
            return entries.sum(1)
        if targets.is_floating_point():
            return entries.mean(1)
        counts = position_weights(loss_fn, targets, outputs.dtype).reshape(entries.shape).sum(1)
        return entries.sum(1) / counts.masked_fill(counts == 0, 1)  # a sample with every target ignored: 0
