"""Losses that report the count their mean divides by: :class:`NormalizedLoss` and the ``normalizer`` protocol."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = ["NormalizedLoss", "has_normalizer", "reported_count"]


class NormalizedLoss:
    r"""A mean loss that reports the count it divides by, so that any batching gives the same operator.

    The operators weight each batch's curvature by its share of the normalizer of a mean loss. For
    ``torch.nn`` losses that count is known (samples, output entries, non-ignored targets); for any other
    callable it is assumed to be the number of samples, which is wrong for a loss that averages over a count
    that varies between batches, such as a language-model cross-entropy over the tokens that are not padding:

    .. math:: L_b = \frac{1}{C_b} \sum_{t \in b} \ell_t, \qquad
              L = \frac{\sum_b C_b L_b}{\sum_b C_b} \quad (\text{not } \tfrac{\sum_b N_b L_b}{\sum_b N_b}).

    Wrapping the callable with its count ``C_b`` makes every batching exact. Any callable that has a
    ``normalizer(outputs, targets)`` method is read the same way; this class adds one to a plain function.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the mean of per-unit losses over the batch's units.
        normalizer: ``normalizer(outputs, targets)``, the number (or total weight) of units that ``loss_fn``
            divides by for that batch: a number or a 0-d tensor, non-negative.

    Example:
        >>> def lm_loss(logits, labels):  # shifted next-token cross-entropy, padding labelled -100
        ...     return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
        ...                                              ignore_index=-100)
        >>> loss_fn = NormalizedLoss(lm_loss, lambda logits, labels: (labels[:, 1:] != -100).sum())
        >>> labels = torch.tensor([[1, 2, -100], [0, 1, 2]])
        >>> float(loss_fn.normalizer(torch.zeros(2, 3, 4), labels))
        3.0
    """

    reduction = "mean"

    def __init__(self, loss_fn: Callable[..., torch.Tensor], normalizer: Callable[..., Any]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        if not callable(normalizer):
            raise TypeError(
                f"normalizer must be callable as normalizer(outputs, targets), got {type(normalizer).__name__}; "
                "e.g. lambda outputs, targets: (targets != -100).sum()."
            )
        self.loss_fn = loss_fn
        self._normalizer = normalizer

    def __call__(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The loss of the batch."""
        return self.loss_fn(outputs, targets)

    def normalizer(self, outputs: torch.Tensor, targets: Any) -> Any:
        """The count the batch's mean divides by."""
        return self._normalizer(outputs, targets)

    def __repr__(self) -> str:
        return f"NormalizedLoss({getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def has_normalizer(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` reports its mean's count through a ``normalizer(outputs, targets)`` method."""
    return callable(getattr(loss_fn, "normalizer", None))


def reported_count(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> float:
    """Call ``loss_fn.normalizer(outputs, targets)`` and check that it is a finite non-negative number.

    Raises:
        TypeError: If it returns something other than a real number or a one-element tensor.
        ValueError: If the count is negative or not finite.
    """
    value = loss_fn.normalizer(outputs, targets)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"loss_fn.normalizer must return one number, got a tensor of shape {tuple(value.shape)}.")
        value = value.detach().double().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"loss_fn.normalizer must return a number (the count its mean divides by), got "
                        f"{type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"loss_fn.normalizer returned {value}; the count a mean divides by is finite and >= 0.")
    return float(value)
