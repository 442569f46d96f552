"""Flat vectors over a list of parameters, and one tensor per parameter: the translation between the two.

Operators, estimators and optimizers work on flat ``(*batch, P)`` vectors, autograd on one tensor per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["flatten", "split"]


def flatten(tensors: Iterable[torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate tensors of shape ``(*batch, *p.shape)`` into ``(*batch, P)``; ``batch_dims`` leading dims.

    Example:
        >>> flatten([torch.ones(3, 2, 2), torch.zeros(3, 1)], batch_dims=1).shape
        torch.Size([3, 5])
    """
    return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=batch_dims)


def split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut ``(*batch, P)`` into one ``(*batch, *p.shape)`` tensor per entry of ``like`` (views where possible).

    Example:
        >>> [t.shape for t in split(torch.arange(5.0), [torch.ones(2, 2), torch.zeros(1)])]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    batch = flat.shape[:-1]
    pieces = flat.split([p.numel() for p in like], dim=-1)
    return [t.reshape(*batch, *p.shape) for t, p in zip(pieces, like)]
