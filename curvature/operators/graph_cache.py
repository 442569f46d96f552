"""The per-batch autograd graphs an operator keeps between products while the model is unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable

__all__ = ["GraphCache"]


class GraphCache:
    """What the products of each batch need (a context and the batch's weight), kept across products.

    The entries are keyed on a fingerprint of the model (parameter and buffer versions, and with ``verify``
    their contents): a product whose key differs rebuilds them. An interrupted pass leaves the cache
    incomplete, so the next product rebuilds it from the first batch.

    Attributes:
        entries: ``(context, weight)`` per non-empty batch, in data order.
        complete: Whether ``entries`` cover every batch.
        key: The fingerprint the entries were built for.
        checked_key: The key whose global totals were checked over a process group (read on the host once).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drop every entry (frees the graphs)."""
        self.entries: list[tuple[Any, float]] = []
        self.complete = False
        self.key: tuple[Any, ...] | None = None
        self.checked_key: tuple[Any, ...] | None = None

    def contexts(self, key: tuple[Any, ...],
                 build: Callable[[], Iterable[tuple[Any, float]]]) -> Iterator[tuple[Any, float]]:
        """Yield every batch's ``(context, weight)``: the kept ones if built for ``key``, else from ``build()``.

        Args:
            key: The model's current fingerprint.
            build: Yields the entries afresh, one per non-empty batch, in data order.
        """
        if key != self.key:
            self.entries, self.complete, self.key = [], False, key
        if self.complete:
            yield from self.entries
            return
        self.entries = []
        for entry in build():
            self.entries.append(entry)
            yield entry
        self.complete = True
