r"""``torch.nn.BCEWithLogitsLoss``: a Bernoulli likelihood at every entry, Hessian :math:`\sigma(z)(1 - \sigma(z))`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Loss, OutputMatrix, Reduction, require_tensor_targets
from .generic import entry_count

__all__ = ["BCEWithLogits"]


class BCEWithLogits(Loss):
    r"""Binary cross-entropy on logits, entry by entry, for outputs ``(N,)``, ``(N, C)`` or ``(N, C, d1, ...)``.

    Per entry, with weight :math:`w` (``weight=``, 1 by default) and positive weight :math:`a` (``pos_weight=``,
    1 by default), :math:`\ell = -w\,[a\,y \log\sigma(z) + (1 - y)\log(1 - \sigma(z))]`, whose second derivative

    .. math:: \ell''(z) = w\,(1 + (a - 1)\,y)\;\sigma(z)\,(1 - \sigma(z))

    is the output Hessian, diagonal, entry by entry (times :math:`c = 1/\text{entries}` for a mean). Without
    ``weight`` and ``pos_weight`` it does not depend on :math:`y`, and the loss is the negative log-likelihood of
    :math:`\hat y \sim \text{Bernoulli}(\sigma(z))` at every entry, whose Fisher :math:`\mathbb E[(\sigma(z) -
    \hat y)^2] = \sigma(z)(1 - \sigma(z))` equals this GGN (Martens 2020, arXiv:1412.1193, Sec. 9); curvlinops
    and BackPACK sample the same Monte-Carlo Fisher.

    Example:
        >>> loss = BCEWithLogits(torch.nn.BCEWithLogitsLoss(reduction="sum"))
        >>> z, y = torch.zeros(2), torch.tensor([0.0, 1.0])
        >>> loss.output_hessian(z, y, "sum")(torch.ones(1, 2))
        tensor([[0.2500, 0.2500]])
    """

    kind = "bce"
    modules = (nn.BCEWithLogitsLoss,)

    def check_targets(self, outputs: torch.Tensor, targets: Any) -> None:
        """Batched logits, targets of their shape and dtype, ``weight`` broadcasting to their shape.

        Raises:
            ValueError: On unbatched outputs, a shape mismatch or a ``weight`` that would enlarge the loss.
            TypeError: On targets that are not a floating tensor of the outputs' dtype.
        """
        require_tensor_targets(self.loss_fn, targets)
        if outputs.ndim < 1:
            raise ValueError(
                "BCEWithLogitsLoss outputs must be batched logits (N,), (N, C) or (N, C, d1, ...), got a scalar; "
                "add a batch dimension with unsqueeze(0)."
            )
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(outputs.shape)}; "
                "BCEWithLogitsLoss needs one target per logit (e.g. y.float().view_as(outputs))."
            )
        if targets.dtype != outputs.dtype:
            raise TypeError(
                f"targets have dtype {targets.dtype} but logits {outputs.dtype}; BCEWithLogitsLoss needs "
                f"probabilities of the logits' dtype: use targets.to({outputs.dtype})."
            )
        for name in ("weight", "pos_weight"):
            value = getattr(self.loss_fn, name)
            if value is not None and not _broadcasts_to(value.shape, outputs.shape):
                raise ValueError(
                    f"BCEWithLogitsLoss's {name} of shape {tuple(value.shape)} does not broadcast to logits of "
                    f"shape {tuple(outputs.shape)}; give it the logits' trailing shape (one value per class)."
                )

    def mean_count(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """The number of entries (``weight`` does not change what the mean divides by)."""
        return entry_count(targets, outputs)

    def _curvature(self, z: torch.Tensor, targets: torch.Tensor, reduction: Reduction) -> torch.Tensor:
        r""":math:`c\,w\,(1 + (a - 1)y)\,\sigma(z)\sigma(-z)` per entry, of ``z``'s shape."""
        h = torch.sigmoid(z) * torch.sigmoid(-z)  # sigma(z)(1 - sigma(z)) without cancellation for large z
        if self.loss_fn.pos_weight is not None:
            h = h * (1 + (self.loss_fn.pos_weight.to(z.dtype) - 1) * targets.to(z.dtype))
        if self.loss_fn.weight is not None:
            h = h * self.loss_fn.weight.to(z.dtype)
        count = self.mean_count(targets, None, z)
        if reduction == "mean" and count > 0:
            h = h / count
        return h

    def output_hessian(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
        r""":math:`U \mapsto h \odot U`, :math:`h` the per-entry second derivative (times :math:`c`)."""
        h = self._curvature(outputs.detach(), targets, reduction)
        return lambda U: h * U

    def output_hessian_sqrt(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        r""":math:`\sqrt h` at every entry: shape ``(1, *z.shape)``, one unit per entry.

        Raises:
            ValueError: If an entry's curvature is negative (a negative ``weight`` or ``pos_weight``).
        """
        h = self._curvature(outputs.detach(), targets, reduction)
        if bool((h < 0).any()):
            raise ValueError("the output Hessian has no real square root where it is negative; use non-negative "
                             "weight= and pos_weight= (and targets in [0, 1]).")
        return h.sqrt().unsqueeze(0)

    def ggn_is_psd(self) -> bool:
        """True unless ``weight`` or ``pos_weight`` has a negative entry (for targets in [0, 1], as the loss means)."""
        return all(value is None or bool((value >= 0).all())
                   for value in (self.loss_fn.weight, self.loss_fn.pos_weight))

    def check_fisher(self) -> None:
        """Refuse ``weight`` and ``pos_weight``: a reweighted loss is not a likelihood.

        Raises:
            ValueError: For either.
        """
        for name in ("weight", "pos_weight"):
            if getattr(self.loss_fn, name) is not None:
                raise ValueError(
                    f"BCEWithLogitsLoss with {name}= is not a likelihood, so it has no Fisher; use GGNOperator."
                )

    def sampled_output_gradients(
        self, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        r""":math:`g = \sigma(z) - \hat y`, :math:`\hat y \sim \text{Bernoulli}(\sigma(z))` at every entry."""
        z = outputs.detach()
        p = torch.sigmoid(z)
        uniform = torch.rand((num_samples, *z.shape), generator=generator, dtype=z.dtype, device=generator.device)
        return p - (uniform.to(z.device) < p).to(z.dtype)

    def per_sample_losses(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        """The mean (or sum) of each sample's entries."""
        entries = F.binary_cross_entropy_with_logits(
            outputs, targets, weight=self.loss_fn.weight, pos_weight=self.loss_fn.pos_weight, reduction="none"
        ).reshape(outputs.shape[0], -1)
        return entries.mean(1) if reduction == "mean" else entries.sum(1)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False
