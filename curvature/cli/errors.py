"""The command's user errors and the one-line messages they are reported in."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A mistake of the user's: reported as one line ``curvature: error: ...`` with exit status 2."""


def _one_line(text: str, limit: int = 600) -> str:
    r"""Collapse ``text`` onto one line and cut it at ``limit`` characters.

    Example:
        >>> _one_line("first\n  second  ")
        'first second'
    """
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _describe(error: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    return _one_line(f"{type(error).__name__}: {error}")
