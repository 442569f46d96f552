"""Batches of data: recognizing a single batch, iterating loaders, moving tensors, counting samples.

The curvature operators represent the loss over the *whole* data. Each batch's product is the curvature
of that batch's loss; :class:`~curvature.operators.curvature.CurvatureOperator` weights them so that an
uneven last batch counts exactly as much as its samples (see :func:`batch_size` and the losses' mean
normalizers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Data", "batch_size", "is_single_batch", "to_device"]


def _is_inputs(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, dict)) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)
    )


def is_single_batch(data: Any) -> bool:
    """Return True when ``data`` is one ``(inputs, targets)`` pair rather than an iterable of pairs.

    A pair is a tuple or list of length two whose second entry is a tensor (the targets) and whose first
    entry is a tensor, a tuple of tensors or a dict of tensors (the inputs).

    Args:
        data: What the user passed as ``data``.

    Returns:
        Whether it is a single batch.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if isinstance(targets, torch.Tensor):
        return _is_inputs(inputs)
    # Structured targets (a tuple or dict of tensors, for a custom loss) with plain tensor or dict inputs;
    # a pair of tuples is read as two batches, the more common meaning.
    return isinstance(inputs, (torch.Tensor, dict)) and _is_inputs(targets)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple, list or dict to ``device``.

    Args:
        obj: A tensor or a container of tensors.
        device: The target device.

    Returns:
        The same structure on ``device``.
    """
    if isinstance(obj, torch.Tensor):
        # Asynchronous only towards an accelerator: a device-to-host copy must finish before it is read.
        return obj.to(device, non_blocking=device.type != "cpu")
    if isinstance(obj, dict):
        return {key: to_device(val, device) for key, val in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(val, device) for val in obj)
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for val in values:
        found = _first_tensor(val)
        if found is not None:
            return found
    return None


def batch_size(inputs: Any) -> int:
    """Return the number of samples in a batch: the leading dimension of its first input tensor.

    Args:
        inputs: The batch's inputs.

    Returns:
        The batch size.

    Raises:
        ValueError: If the inputs hold no tensor with a batch dimension.
    """
    first = _first_tensor(inputs)
    if first is None or first.ndim == 0:
        raise ValueError("cannot tell the batch size: the inputs hold no tensor with a leading batch dimension.")
    return int(first.shape[0])


def floating_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every floating-point tensor in a (nested) container.

    Args:
        obj: A tensor or a container of tensors.

    Yields:
        The floating-point tensors.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for val in obj.values():
            yield from floating_tensors(val)
    elif isinstance(obj, (tuple, list)):
        for val in obj:
            yield from floating_tensors(val)


class Data:
    """A re-iterable view of the user's ``data``: one ``(inputs, targets)`` batch or an iterable of them.

    Args:
        data: A single batch, or a re-iterable of batches (a list, a ``DataLoader``).

    Raises:
        TypeError: If ``data`` is a one-shot iterator (it would be exhausted after one product), a
            map-style dataset of single samples, or not iterable.
    """

    def __init__(self, data: Any) -> None:
        self.single = is_single_batch(data)
        if self.single:
            self._source: Iterable[Any] = [data]
            return
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
            raise TypeError(
                "data is a Dataset of single samples; wrap it in a DataLoader, e.g. "
                "torch.utils.data.DataLoader(dataset, batch_size=256)."
            )
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError(
                f"data is a {type(data).__name__} of {len(data)} tensors; pass one (inputs, targets) pair, with "
                "several inputs packed as a tuple or dict, e.g. ((x1, x2), y), or a list of such pairs."
            )
        if isinstance(data, Iterator):
            raise TypeError(
                "data is a one-shot iterator (a generator?), but every product iterates over the data again; "
                "pass a list of (inputs, targets) batches or a DataLoader instead."
            )
        if not isinstance(data, Iterable):
            raise TypeError(
                f"data must be an (inputs, targets) pair or an iterable of such pairs, got {type(data).__name__}."
            )
        self._source = data

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for index, batch in enumerate(self._source):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"batch {index} of data is a {type(batch).__name__}"
                    f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; every "
                    "batch must be an (inputs, targets) pair."
                )
            yield batch[0], batch[1]

    def first(self) -> tuple[Any, Any]:
        """Return the first batch.

        Returns:
            The first ``(inputs, targets)`` pair.

        Raises:
            ValueError: If the data holds no batch.
        """
        for batch in self:
            return batch
        raise ValueError("data is empty: it yielded no (inputs, targets) batch.")
