r"""How a loss weights the batches: its reduction, read or inferred, and a check that the weighting is the loss's.

The operators add batch curvatures with weights :math:`w_b`: the count a mean divides by (each
:class:`~curvature.operators.losses.base.Loss`'s ``mean_count``), or 1 for a sum. That is exact when the loss of
a union of batches is :math:`L_{a \cup b} = (w_a L_a + w_b L_b) / (w_a + w_b)` (for a sum, :math:`L_a + L_b`);
for a callable loss :func:`check_additive` tests it on a batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..._modes import autograd_enabled, recordable
from ..data import split_batch
from .base import Reduction
from .generic import CallableLoss, callable_per_sample_losses
from .normalized import has_normalizer

__all__ = ["check_additive", "infer_reduction", "resolve_reduction"]


def resolve_reduction(loss_fn: Callable[..., torch.Tensor], reduction: str | None) -> Reduction | None:
    """Return the loss's batch reduction: the explicit argument, else ``loss_fn.reduction``, else None.

    Args:
        loss_fn: The loss.
        reduction: What the user passed (None to infer).

    Returns:
        ``"mean"``, ``"sum"``, or None when it has to be inferred from data.

    Raises:
        ValueError: If the reduction is not ``"mean"`` or ``"sum"``, or contradicts ``loss_fn.reduction``.
    """
    attribute = getattr(loss_fn, "reduction", None)
    if attribute == "batchmean":  # KLDivLoss: the sum divided by the batch size, a mean over samples
        attribute = "mean"
    if attribute is None and has_normalizer(loss_fn):  # a loss that reports its mean's count is a mean
        attribute = "mean"
    if reduction is None:
        reduction = attribute
    elif attribute is not None and attribute != reduction:
        raise ValueError(f"reduction={reduction!r} contradicts loss_fn.reduction={attribute!r}; drop the argument.")
    if reduction is None:
        return None
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"the loss must reduce the batch to a scalar with reduction 'mean' or 'sum', got {reduction!r}; "
            "e.g. use torch.nn.CrossEntropyLoss(reduction='mean')."
        )
    return reduction  # type: ignore[return-value]


def infer_reduction(loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any) -> Reduction | None:
    """Tell whether a generic ``loss_fn`` averages or sums over the batch, by comparing per-sample losses.

    Args:
        loss_fn: The loss.
        outputs: A batch's outputs.
        targets: Its targets.

    Returns:
        ``"mean"`` or ``"sum"``, or None when the batch has one sample (both agree).

    Raises:
        ValueError: If the batch loss is neither the mean nor the sum of the per-sample losses.
    """
    if outputs.shape[0] < 2:
        return None
    with torch.no_grad():
        total = loss_fn(outputs, targets)
        each = callable_per_sample_losses(loss_fn, outputs, targets)
    tol = dict(rtol=1e-4, atol=1e-6)
    if torch.allclose(total, each.mean(), **tol):
        return "mean"
    if torch.allclose(total, each.sum(), **tol):
        return "sum"
    raise ValueError(
        "cannot tell how loss_fn reduces over the batch (its value is neither the mean nor the sum of the "
        "per-sample losses); pass reduction='mean' or reduction='sum' to the operator. A loss that averages over "
        "something other than samples (tokens that are not padding, say) must report that count: "
        "curvature.NormalizedLoss(loss_fn, normalizer=lambda outputs, targets: ...)."
    )


def check_additive(
    loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any, inputs: Any, reduction: Reduction,
    where: str,
) -> None:
    r"""Check on one batch that the operator weights the loss as the loss itself does.

    The operators add batch curvatures with weights :math:`w_b` (for a mean: the count the loss divides by,
    ``mean_count``; for a sum: 1), which is exact when the loss of a union of batches is
    :math:`L_{a \cup b} = (w_a L_a + w_b L_b) / (w_a + w_b)` (for a sum: :math:`L_a + L_b`). Splitting one
    batch in two halves tests that identity, through the gradients in the outputs, which the curvature is made
    of: :math:`w_{a \cup b} \nabla_{z_a} L_{a \cup b} = w_a \nabla_{z_a} L_a` for each half. A callable that
    averages over tokens that are not padding, weighted by sample counts, fails it as soon as the halves hold
    different numbers of tokens, by the ratio of the counts (whatever the loss values: near initialization
    every token's loss is about the same, and a test on loss values alone passed a 15% error in float32); so
    does a loss that couples the samples of a batch (contrastive losses). Batches that cannot be split by
    samples, or a loss that cannot take half a batch, are not checked (their weighting is then assumed).

    Args:
        loss_fn: The callable loss.
        outputs: The batch's outputs (detached).
        targets: The batch's targets.
        inputs: The batch's inputs.
        reduction: The loss's batch reduction.
        where: Which batch, for the message (e.g. "batch 2 of data").

    Raises:
        ValueError: If the identity fails beyond the rounding of the outputs' dtype.
    """
    n = outputs.shape[0] if outputs.ndim else 0
    if n < 2 or not outputs.is_floating_point():
        return
    half = n // 2
    split = [(split_batch(targets, a, b, n), split_batch(inputs, a, b, n)) for a, b in ((0, half), (half, n))]
    if not all(y_ok and x_ok for (y_ok, _), (x_ok, _) in split):
        return
    parts = [(outputs, targets, inputs), (outputs[:half], split[0][0][1], split[0][1][1]),
             (outputs[half:], split[1][0][1], split[1][1][1])]

    def weight(z: torch.Tensor, y: Any, x: Any) -> float:  # the operator's own weighting (mean_count)
        return 1.0 if reduction == "sum" else CallableLoss(loss_fn).mean_count(y, x, z)

    weights = [weight(*part) for part in parts]
    grads = []
    with autograd_enabled():  # under inference mode too (the operator may be built there)
        for (z, y, _), w in zip(parts, weights):
            leaf = recordable(z.detach()).clone().requires_grad_(True)
            try:
                value = loss_fn(leaf, y)
                (g,) = torch.autograd.grad(value, leaf, allow_unused=True)
            except Exception:  # a loss that cannot take half a batch: nothing to compare
                return
            if g is None:
                return
            grads.append(torch.zeros_like(leaf) if w == 0 else g.detach() * w)  # a count of 0 adds nothing
    whole = grads[0]
    differs = float((whole[:half] - grads[1]).norm() + (whole[half:] - grads[2]).norm())
    scale = float(grads[1].norm() + grads[2].norm())
    if not math.isfinite(differs) or differs <= math.sqrt(torch.finfo(outputs.dtype).eps) * scale + 1e-300:
        return
    if reduction == "sum":
        detail = (f"{where}: the batch's loss is not the sum of the losses of its two halves (their gradients in the "
                  "outputs differ), as reduction='sum' says")
    else:
        counted = "loss_fn.normalizer's counts" if has_normalizer(loss_fn) else "their numbers of samples"
        detail = (f"{where}: the batch's loss is not the mean of the losses of its two halves weighted by {counted} "
                  f"({weights[1]:g} and {weights[2]:g}; their gradients in the outputs differ by "
                  f"{differs / max(scale, 1e-300):.2g} relative)")
    raise ValueError(
        f"{detail}, so the operator would weight batches of different composition wrongly (any batching must "
        "give the same curvature). A loss that averages over something other than samples (tokens that are not "
        "padding, a mask) must report that count: curvature.NormalizedLoss(loss_fn, normalizer=lambda outputs, "
        "targets: (targets != -100).sum()), or a normalizer(outputs, targets) method. A loss that couples the "
        "samples of a batch has no per-batch decomposition: pass the data as one (inputs, targets) batch."
    )
