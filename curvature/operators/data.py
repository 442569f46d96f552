"""Batches of data: single batches, loaders, devices, sample counts, and data that must stay one fixed set.

The curvature operators represent the loss over the *whole* data. Each batch's product is the curvature
of that batch's loss; :class:`~curvature.operators.curvature.CurvatureOperator` weights them so that an
uneven last batch counts exactly as much as its samples (see :func:`batch_size` and the losses' mean
normalizers). Shards across processes are :mod:`curvature.operators.distributed`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from .._tree import leaves, map_leaves, paired_leaves

__all__ = ["Data", "batch_size", "floating_tensors", "is_single_batch", "split_batch", "tensor_to_device",
           "to_device"]


def _is_inputs(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, dict)) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x)
    )


def is_single_batch(data: Any) -> bool:
    """Return True when ``data`` is one ``(inputs, targets)`` pair rather than an iterable of pairs.

    A pair is a tuple or list of length two whose second entry is a tensor (the targets), or None (a batch
    without targets, for a loss that needs none), and whose first entry is a tensor, a tuple of tensors or a
    dict of tensors (the inputs).

    Args:
        data: What the user passed as ``data``.

    Returns:
        Whether it is a single batch.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, targets = data
    if isinstance(targets, torch.Tensor) or targets is None:
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
    return map_leaves(lambda t: tensor_to_device(t, device) if isinstance(t, torch.Tensor) else t, obj)


def tensor_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One tensor on ``device``.

    The copy is asynchronous only towards an accelerator: a device-to-host copy must finish before it is read.
    """
    return t.to(device, non_blocking=device.type != "cpu")


def batch_size(inputs: Any) -> int:
    """Return the number of samples in a batch: the leading dimension of its first input tensor.

    Args:
        inputs: The batch's inputs.

    Returns:
        The batch size.

    Raises:
        ValueError: If the inputs hold no tensor with a batch dimension.
    """
    first = next((t for t in leaves(inputs) if isinstance(t, torch.Tensor)), None)
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
    return (t for t in leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point())


def _same_batches(a: Any, b: Any) -> bool:
    """Whether two batches hold the same containers and identical tensors (NaN where NaN was).

    Leaves that are not tensors are compared with ``==`` where that gives one truth value (NumPy arrays with
    ``array_equal``); leaves that cannot be compared count as equal (nothing to refuse on).
    """
    try:
        return all(_same_leaf(x, y) for x, y in paired_leaves(a, b))
    except ValueError:  # other containers, keys or lengths
        return False


def _same_leaf(a: Any, b: Any) -> bool:
    """Whether a leaf of one batch equals what the other batch holds in its place."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        a, b = a.cpu(), b.cpu()
        if a.is_floating_point() or a.is_complex():  # NaN marks (missing labels, masks) equal NaN
            return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        try:
            return bool(np.array_equal(a, b, equal_nan=True))
        except TypeError:  # not numbers: compare without NaN
            return bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a single truth value: cannot tell, do not refuse
        return True


def _same_kind(a: Any, b: Any) -> bool:
    """Whether two batch entries look like two batches of one thing.

    Tensors (or dicts of tensors) of the same dtypes and trailing shapes, under the same keys.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape[1:] == b.shape[1:]
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and bool(a) and all(_same_kind(a[key], b[key]) for key in a)
    return False


def _warn_if_ambiguous(data: Any) -> None:
    """Warn when a list of two entries of one kind is read as an (inputs, targets) pair.

    Two tensors, or two dicts of tensors, of one kind may be two batches of inputs for a loss without targets.
    """
    if not (isinstance(data, list) and len(data) == 2 and _same_kind(*data)):
        return
    what = ("tensors of one dtype and trailing shape" if isinstance(data[0], torch.Tensor)
            else "dicts of tensors with the same keys, dtypes and trailing shapes")
    warnings.warn(
        f"data is a list of two {what}, read as ONE (inputs, targets) pair. If they are two batches of "
        "inputs for a loss without targets, pass [(x1, None), (x2, None)]; to say it is a pair (and silence this), "
        "pass a tuple (inputs, targets).",
        UserWarning,
        stacklevel=4,
    )


def _random_sampler(loader: DataLoader) -> str | None:
    """Describe how a DataLoader's sampler makes its batches change between passes, or None if it does not.

    Returns:
        ``"order"`` for a random order of a fixed set of samples (harmless for a sum over all batches, unless a
        remainder is dropped), a sentence for a sampler that draws a different set of samples on every pass,
        or None for a fixed order.

    Raises:
        ValueError: For a random order whose dropped remainder changes from pass to pass.
    """
    batches = loader.batch_sampler
    sampler = getattr(batches, "sampler", None) if batches is not None else loader.sampler
    if isinstance(sampler, WeightedRandomSampler):
        return "its WeightedRandomSampler draws samples at random, with replacement"
    if isinstance(sampler, RandomSampler):
        if sampler.replacement:
            return "its RandomSampler draws samples with replacement"
        if sampler.num_samples != len(sampler.data_source):
            return (f"its RandomSampler draws a random subset of {sampler.num_samples} of the "
                    f"{len(sampler.data_source)} samples")
    if not isinstance(sampler, (RandomSampler, SubsetRandomSampler)):
        return None
    # An explicit batch_sampler carries its own batch size and drop_last (the loader's are then None and False).
    batch_size = getattr(batches, "batch_size", loader.batch_size)
    drop_last = getattr(batches, "drop_last", loader.drop_last)
    if drop_last and isinstance(batch_size, int) and batch_size > 0 and len(sampler) % batch_size:
        dropped = len(sampler) % batch_size
        raise ValueError(
            f"data is a shuffling DataLoader with drop_last=True: each pass drops a different {dropped} of its "
            f"{len(sampler)} samples, so the curvature would change from one product to the next. Pass "
            "shuffle=False (curvature sums over every batch; the order does not matter), or drop_last=False."
        )
    return "order"


class Data:
    """A re-iterable view of the user's ``data``: one ``(inputs, targets)`` batch or an iterable of them.

    Every product iterates over the data again, so the data must yield the same batches on every pass:
    :meth:`check_fixed` refuses sources that do not (random sampling, random augmentation, one-shot
    iterables), and each pass's number of batches is compared with the first complete pass's. A wrapper
    around a ``DataLoader`` (converting its batches, say) exposes it as ``__wrapped__``, so that its sampler
    is read as the loader's.

    Args:
        data: A single batch, or a re-iterable of batches (a list, a ``DataLoader``).

    Raises:
        TypeError: If ``data`` is a one-shot iterator (it would be exhausted after one product), a
            map-style dataset of single samples, or not iterable.
        ValueError: If ``data`` is a shuffling ``DataLoader`` with ``drop_last=True`` that drops a remainder.
    """

    def __init__(self, data: Any) -> None:
        self.single = is_single_batch(data)
        self.random_order = False  # batches come in a random order (a shuffling loader): fine for sums only
        self.passes: int | None = None  # non-empty batches in the first complete pass
        self._loader: DataLoader | None = None
        if self.single:
            _warn_if_ambiguous(data)
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
                "several inputs packed as a tuple or dict, e.g. ((x1, x2), y), or a list of such pairs; for a loss "
                "without targets, pass (x, None) or [(x1, None), (x2, None)]."
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
        loader = data if isinstance(data, DataLoader) else getattr(data, "__wrapped__", None)  # or a wrapper's
        self._loader = loader if isinstance(loader, DataLoader) else None
        self._sampling = _random_sampler(loader) if isinstance(loader, DataLoader) else None
        self.random_order = self._sampling == "order"

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for index, batch in enumerate(self._source):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"batch {index} of data is a {type(batch).__name__}"
                    f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; every "
                    "batch must be an (inputs, targets) pair (for a loss without targets: (inputs, None))."
                )
            yield batch[0], batch[1]

    def first(self) -> tuple[Any, Any]:
        """Return the first batch that holds samples (the first batch if none does).

        Empty batches add nothing to a product, so the checks look at the first batch with samples.

        Returns:
            The ``(inputs, targets)`` pair.

        Raises:
            ValueError: If the data holds no batch.
        """
        found = None
        for batch in self:
            found = batch if found is None else found
            try:
                if batch_size(batch[0]) > 0:
                    return batch
            except ValueError:  # no batch dimension: the checks that follow say what is wrong
                return batch
        if found is None:
            raise ValueError("data is empty: it yielded no (inputs, targets) batch.")
        return found

    def check_fixed(self, first: tuple[Any, Any]) -> None:
        """Refuse data that does not yield the same batches on every pass.

        A list or a single batch is fixed. A ``DataLoader`` whose sampler draws a different set of samples on
        every pass is refused from its sampler; for any other source (a loader in fixed order, a custom
        iterable) the first batch is read once more, with torch's global random generator in another state
        (restored afterwards), and must come out bit for bit the same: that catches random augmentation and
        one-shot iterables (an ``IterableDataset`` over a generator). A loader in random order over a fixed
        set of samples passes (a sum over all batches does not depend on their order) and is flagged
        ``random_order``. Costs one more read of the first batch.

        Args:
            first: The first batch, as :meth:`first` returned it.

        Raises:
            ValueError: If the data draws samples at random, changes between passes, or yields only once.
        """
        if self.single or isinstance(self._source, (tuple, list)):
            return
        fix = ("curvature is the curvature of one fixed data set and every product reads it again: pass a list of "
               "(inputs, targets) batches, or a DataLoader with shuffle=False, no random sampler and no random "
               "transforms (evaluate augmentations once and keep the results).")
        if self._sampling not in (None, "order"):
            raise ValueError(f"data yields different samples on every pass: {self._sampling}. {fix}")
        if self.random_order:  # the first batch differs by design: read one sample of the data set twice instead
            self._check_fixed_samples(fix)
            return
        with torch.random.fork_rng(devices=[]):
            # Another state of the CPU generator (the one loaders and transforms draw from); fork_rng restores it.
            torch.default_generator.manual_seed((torch.initial_seed() + 0x5EED) % 2**63)
            try:
                again: tuple[Any, Any] | None = self.first()
            except ValueError:  # nothing on the second pass
                again = None
        if again is None:
            raise ValueError(
                "data yielded its batches once and nothing on a second pass: it is a one-shot iterable (an "
                "IterableDataset or a class whose __iter__ returns a used-up generator?). Every product reads the "
                "data again: pass a list of (inputs, targets) batches or a re-iterable DataLoader."
            )
        if not _same_batches(first, again):
            raise ValueError(
                "data yields a different first batch on a second pass (random augmentation, a random batch "
                f"sampler, or an iterable that continues where the last pass stopped). {fix}"
            )

    def _check_fixed_samples(self, fix: str) -> None:
        """Read the first sample of a shuffled loader's map-style data set twice, in two random states.

        Raises:
            ValueError: If the two reads differ (random augmentation in the data set).
        """
        dataset = self._loader.dataset if self._loader is not None else None
        if not isinstance(dataset, torch.utils.data.Dataset) or isinstance(dataset, torch.utils.data.IterableDataset):
            return
        try:
            if len(dataset) == 0:  # type: ignore[arg-type]
                return
        except TypeError:
            return
        reads = []
        with torch.random.fork_rng(devices=[]):
            for offset in (0x5EED, 0xD1CE):
                torch.default_generator.manual_seed((torch.initial_seed() + offset) % 2**63)
                reads.append(dataset[0])
        if not _same_batches(*reads):
            raise ValueError(f"data is a shuffling DataLoader whose data set gives a different sample 0 when read "
                             f"twice (random augmentation). {fix}")

    def count_pass(self, batches: int) -> None:
        """Record the number of non-empty batches of a complete pass; refuse a pass that differs from the first.

        Raises:
            ValueError: If this pass yielded a different number of non-empty batches than the first.
        """
        if self.passes is None:
            self.passes = batches
        elif batches != self.passes:
            raise ValueError(
                f"data yielded {batches} non-empty batches on this pass and {self.passes} on the first: it changes "
                "between passes (a one-shot or random iterable?). Every product reads the data again: pass a list "
                "of (inputs, targets) batches or a DataLoader with a fixed order."
            )


def split_batch(obj: Any, start: int, stop: int, size: int) -> tuple[bool, Any]:
    """Slice every tensor of a (nested) batch to the samples ``start:stop`` along its leading dimension.

    Args:
        obj: Inputs or targets: a tensor, None, or a tuple, list or dict of them.
        start: The first sample.
        stop: One past the last sample.
        size: The batch size every tensor's leading dimension must equal.

    Returns:
        ``(True, sliced)``, or ``(False, None)`` when a tensor does not have ``size`` samples along its leading
        dimension (the batch cannot be split by samples). Leaves that are not tensors are kept whole.
    """
    tensors = (t for t in leaves(obj) if isinstance(t, torch.Tensor))
    if any(t.ndim == 0 or t.shape[0] != size for t in tensors):
        return False, None
    # A leaf that is not a tensor (a flag, a string, None) belongs to every part.
    return True, map_leaves(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, obj)
