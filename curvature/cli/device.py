"""The run's device and dtype: ``--device`` checked against this machine, the user's data converted to both."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .._tree import map_leaves
from .errors import UsageError, _describe

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """Check that ``--device`` names a device this machine has.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...

    Returns:
        The device.

    Raises:
        UsageError: If the name is not a device or the device is not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {name!r} is not a device ({_describe(error)[:150]}); use cpu, cuda, cuda:1 or "
                         "mps.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as error:
            raise UsageError(f"--device {name} is not usable here: {_describe(error)[:200]}") from error
    return device


def _cast(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Move every tensor in a nested container to ``device``; floating ones also to ``dtype``."""

    def cast(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return map_leaves(cast, obj)


class _CastBatches:
    """A re-iterable view of the user's batches, converted to the run's dtype and device on the fly."""

    def __init__(self, source: Iterable[Any], dtype: torch.dtype, device: torch.device) -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self.__wrapped__ = source  # the operators read a DataLoader's sampler through it (shuffling is fine)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.source:
            yield _cast(batch, self.dtype, self.device)
