"""A batch as a tree of tensors, walked with ``torch.utils._pytree``.

A batch's inputs and targets are trees. Their containers are dicts, lists and tuples (namedtuples included);
everything else is a leaf: tensors, None, NumPy arrays, numbers, strings, and any other object, also one that a
library registered with pytree (a deque, a dataclass): a batch never looked inside those. pytree walks plain
dicts, lists, tuples and namedtuples. Any other subclass of dict, list or tuple (an ``OrderedDict``, a
``torch.Size``, a user's class) is read as the container it derives from and rebuilt as a batch always rebuilt it:
a dict subclass as a plain dict, a list or tuple subclass as its own type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

from torch.utils import _pytree as pytree

__all__ = ["leaves", "map_leaves", "paired_leaves"]


def _by_hand(x: Any) -> bool:
    """Whether ``x`` is a container read by hand: a subclass of dict, list or tuple, other than a namedtuple."""
    if type(x) in (dict, list, tuple):
        return False
    return isinstance(x, dict) or isinstance(x, (list, tuple)) and not pytree.is_namedtuple_instance(x)


def _stop(x: Any) -> bool:
    """Where pytree stops: at a leaf of the batch, or at a container read by hand."""
    return not isinstance(x, (dict, list, tuple)) or _by_hand(x)


def _plain(x: Any) -> Any:
    """A container read by hand as the plain dict or list it derives from."""
    return dict(x) if isinstance(x, dict) else list(x)


def leaves(tree: Any) -> Iterator[Any]:
    """Yield the leaves of a batch, depth first, in the order of its dicts and sequences.

    Args:
        tree: A tensor, None, or a (nested) dict, list or tuple of them and of other leaves.

    Yields:
        Each leaf.

    Example:
        >>> list(leaves({"x": (1, [2]), "y": None}))
        [1, 2, None]
    """
    for leaf in pytree.tree_iter(tree, is_leaf=_stop):
        if _by_hand(leaf):
            yield from leaves(_plain(leaf))
        else:
            yield leaf


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """The batch with ``fn`` applied to every leaf, in the same containers.

    Args:
        fn: Function of one leaf.
        tree: A tensor, None, or a (nested) dict, list or tuple of them and of other leaves.

    Returns:
        The same structure holding ``fn(leaf)`` for each leaf (a dict subclass comes back as a plain dict).

    Example:
        >>> map_leaves(lambda v: None if v is None else 2 * v, {"x": (1, [2]), "y": None})
        {'x': (2, [4]), 'y': None}
    """

    def visit(x: Any) -> Any:
        if not _by_hand(x):
            return fn(x)
        mapped = map_leaves(fn, _plain(x))
        return mapped if isinstance(x, dict) else type(x)(mapped)

    return pytree.tree_map(visit, tree, is_leaf=_stop)


def paired_leaves(a: Any, b: Any) -> Iterator[tuple[Any, Any]]:
    """Yield each leaf of ``a`` with what ``b`` holds in its place.

    Args:
        a: A batch.
        b: A batch of the same containers: the same types (a dict and an ``OrderedDict`` count as one), the same
            keys in any order and the same lengths; where ``a`` holds a leaf, ``b`` may hold anything.

    Yields:
        ``(leaf of a, subtree of b)`` pairs, in the order of :func:`leaves`.

    Raises:
        ValueError: If ``b``'s containers differ from ``a``'s.

    Example:
        >>> list(paired_leaves({"x": 1, "y": [2]}, {"y": [3], "x": None}))
        [(1, None), (2, 3)]
    """
    flat, spec = pytree.tree_flatten(a, is_leaf=_stop)
    for x, y in zip(flat, spec.flatten_up_to(b)):
        if not _by_hand(x):
            yield x, y
        elif isinstance(y, dict) if isinstance(x, dict) else isinstance(y, (list, tuple)):
            yield from paired_leaves(_plain(x), _plain(y))
        else:
            raise ValueError(f"the trees differ: a {type(x).__name__} where the other holds a {type(y).__name__}.")
