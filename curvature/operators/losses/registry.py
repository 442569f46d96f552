"""The supported losses, and the loss object for a ``loss_fn``.

:data:`LOSSES` lists one :class:`~curvature.operators.losses.base.Loss` subclass per loss in closed form; any
other callable is a :class:`~curvature.operators.losses.generic.CallableLoss`. The functions that take a kind
name (``"mse"``, ``"ce"``, ``"bce"``, ``"other"``) and the loss are the string interface the operators used
before the loss objects; each forwards to the object of that kind.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import Loss, OutputMatrix, Reduction
from .bce import BCEWithLogits
from .cross_entropy import CrossEntropy
from .generic import CallableLoss
from .mse import MSE

__all__ = [
    "LOSSES",
    "check_targets",
    "loss_for",
    "loss_kind",
    "mean_count",
    "output_hessian",
    "per_sample_losses",
    "sampled_output_gradients",
]

#: The losses in closed form, matched in this order; a new one is a module with a :class:`Loss` subclass and an
#: entry here.
LOSSES: tuple[type[Loss], ...] = (MSE, CrossEntropy, BCEWithLogits)

_BY_KIND: dict[str, type[Loss]] = {cls.kind: cls for cls in (*LOSSES, CallableLoss)}


def loss_for(loss_fn: Callable[..., torch.Tensor], kind: str | None = None) -> Loss:
    """The loss object for ``loss_fn``: of the first registered kind it matches, else a :class:`CallableLoss`.

    Args:
        loss_fn: The loss.
        kind: A kind name to use instead of matching (as the operators stored it).

    Returns:
        The :class:`Loss` wrapping ``loss_fn``.

    Raises:
        ValueError: If ``kind`` is not a registered kind.

    Example:
        >>> loss_for(torch.nn.BCEWithLogitsLoss()).kind, loss_for(lambda z, y: (z - y).abs().sum()).kind
        ('bce', 'other')
    """
    if kind is not None:
        if kind not in _BY_KIND:
            raise ValueError(f"kind must be one of {sorted(_BY_KIND)}, got {kind!r}.")
        return _BY_KIND[kind](loss_fn)
    cls = next((cls for cls in LOSSES if cls.matches(loss_fn)), CallableLoss)
    return cls(loss_fn)


def loss_kind(loss_fn: Callable[..., torch.Tensor]) -> str:
    """Classify ``loss_fn``: ``"mse"``, ``"ce"``, ``"bce"`` (:data:`LOSSES`), or ``"other"`` for any other callable.

    Args:
        loss_fn: The loss.

    Returns:
        The kind name of :func:`loss_for`'s object.
    """
    return loss_for(loss_fn).kind


def check_targets(kind: str, loss_fn: Any, outputs: torch.Tensor, targets: Any) -> None:
    """:meth:`Loss.check_targets` of the loss of ``kind``: refuse targets that do not match the outputs."""
    loss_for(loss_fn, kind).check_targets(outputs, targets)


def mean_count(kind: str, loss_fn: Any, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
    """:meth:`Loss.mean_count` of the loss of ``kind``: what ``reduction="mean"`` divides the batch's sum by."""
    return loss_for(loss_fn, kind).mean_count(targets, inputs, outputs)


def output_hessian(kind: str, loss_fn: Any, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
    r""":meth:`Loss.output_hessian` of the loss of ``kind``: :math:`U \mapsto \nabla^2_z L\, U`."""
    return loss_for(loss_fn, kind).output_hessian(outputs, targets, reduction)


def sampled_output_gradients(
    kind: str, loss_fn: Any, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """:meth:`Loss.sampled_output_gradients` of the loss of ``kind``: gradients at sampled targets."""
    return loss_for(loss_fn, kind).sampled_output_gradients(outputs, targets, num_samples, generator)


def per_sample_losses(
    kind: str, loss_fn: Any, outputs: torch.Tensor, targets: Any, reduction: Reduction
) -> torch.Tensor:
    """:meth:`Loss.per_sample_losses` of the loss of ``kind``: each sample's loss, shape ``(N,)``."""
    return loss_for(loss_fn, kind).per_sample_losses(outputs, targets, reduction)
