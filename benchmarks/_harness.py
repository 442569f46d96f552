"""The benchmark harness: one row type, one round-robin timer and its statistics, one environment header.

Every script in this folder prints :func:`environment_header` first, and times its calls with
:func:`round_robin`: after the warm-up rounds, each repetition runs every row once, so that a burst of load from
another process hits all rows alike; a table reports medians, and marks a row whose third quartile exceeds
``SPREAD`` times its first (:attr:`Stats.disturbed`): other processes took the cores during part of the run.

``GOMP_SPINCOUNT`` (which keeps the OpenMP workers spinning between the many short parallel regions of small
products) must be set before torch, and with it libgomp, is loaded. This module imports torch, so it cannot
set it: every script sets it as its first statement, and the header prints the value in force.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Callable, Optional, Sequence, Union

import torch

import curvature

SPREAD = 1.5  # a row whose q3 exceeds SPREAD * q1 is marked "*"

Device = Union[torch.device, str, None]


@dataclass(frozen=True)
class Stats:
    """Median, quartiles and minimum of a row's repetitions."""

    median: float
    q1: float
    q3: float
    min: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """The statistics of ``values`` (one value: all four are that value)."""
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        return cls(statistics.median(values), q1, q3, min(values))

    @property
    def disturbed(self) -> bool:
        """A wide spread, ``q3 > SPREAD * q1``: other processes took the cores during part of the repetitions."""
        return self.q3 > SPREAD * self.q1

    @property
    def mark(self) -> str:
        """``" *"`` after a disturbed row's median, else nothing."""
        return " *" if self.disturbed else ""


@dataclass
class Row:
    """One timed call of a table, and what :func:`round_robin` recorded of it.

    Attributes:
        label: the row's name in the table.
        fn: the timed call; it takes the arguments ``prepare`` returns (none without ``prepare``).
        prepare: untimed set-up before every call (a deep copy of the model, a seed): it gets the round's index
            (negative in warm-up rounds) and returns the tuple of ``fn``'s arguments.
        group: the table section the row belongs to (``"k=16"``), where a script times sections apart.
        keep: record what ``fn`` returns in ``results``; off by default, so that no product outlives its call.
        seconds: the seconds of every timed call.
        results: what every timed call returned (with ``keep``).
    """

    label: str
    fn: Callable[..., Any]
    prepare: Optional[Callable[[int], tuple]] = None
    group: str = ""
    keep: bool = False
    seconds: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def stats(self, scale: float = 1.0) -> Stats:
        """The statistics of the recorded times, multiplied by ``scale`` (1e3: milliseconds)."""
        return Stats.of([scale * s for s in self.seconds])

    @property
    def median(self) -> float:
        """The median seconds of the timed calls."""
        return statistics.median(self.seconds)


def synchronize(device: Device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(rows: Sequence[Row], reps: int, warmup: int = 0, *, device: Device = None,
                order: Optional[random.Random] = None, lead_in: bool = False) -> None:
    """Time ``rows`` round-robin: ``warmup`` untimed rounds, then ``reps`` rounds that each run every row once.

    The times go to each row's ``seconds`` (and, with ``keep``, the results to ``results``).

    Args:
        rows: the rows, in the order of a round.
        reps: the timed rounds.
        warmup: the rounds before them, run the same way and not recorded.
        device: synchronized before and after every call (CUDA).
        order: shuffle each round with this generator (a row's time can depend on the row before it: shuffling
            turns that order effect into noise that the median discards); None: the order of ``rows``.
        lead_in: start each timed round with an untimed call of the first row, which absorbs the order effect of
            the previous round's last row.

    Raises:
        ValueError: ``reps`` below 1 or ``warmup`` negative.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}.")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}.")
    for r in range(-warmup, reps):
        if lead_in and r >= 0:
            rows[0].fn(*(rows[0].prepare(r) if rows[0].prepare is not None else ()))
        for row in order.sample(rows, len(rows)) if order is not None else rows:
            args = row.prepare(r) if row.prepare is not None else ()
            synchronize(device)
            start = time.perf_counter()
            if row.keep:
                result = row.fn(*args)
            else:
                row.fn(*args)  # its output is freed here, within the timing, and never beside the next call
            synchronize(device)
            seconds = time.perf_counter() - start
            if r >= 0:
                row.seconds.append(seconds)
                if row.keep:
                    row.results.append(result)


def spread_note(disturbed: int, total: int) -> str:
    """The footnote of a table in which ``disturbed`` of ``total`` rows are marked ``*``."""
    return (f"* {disturbed} of {total} rows have q3 > {SPREAD:g} q1: other processes competed for the cores during "
            "part of the run, so their medians (and ratios) are unreliable; compare the min columns, or re-run on a "
            "quiet machine.")


def peer_versions(modules: dict[str, object]) -> str:
    """The versions of the distributions whose module imported (None: it did not), or ``"none"``.

    ``{"PyHessian": pyhessian, "curvlinops-for-pytorch": None}`` gives ``"PyHessian 0.1"``.
    """
    return ", ".join(f"{dist} {version(dist)}" for dist, module in modules.items() if module is not None) or "none"


def print_load() -> None:
    """Other processes on a 2-core machine distort timings: show the load next to the numbers."""
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def environment_header(*settings: str, device: Device = None) -> None:
    """Print the line every script starts with, then the load average.

    ``date | platform | cores | [GPU |] python | torch | curvature | threads | settings... | GOMP_SPINCOUNT``;
    ``threads`` is torch's intra-op thread count at the call, so a script sets it first.

    Args:
        *settings: the script's own fields (``"reps 5"``, ``"scipy 1.17.1"``), in order.
        device: the device the script measures on; a CUDA device adds its name.
    """
    fields = [datetime.date.today().isoformat(), platform.platform(), f"{os.cpu_count()} cores"]
    if device is not None and torch.device(device).type == "cuda":
        fields.append(torch.cuda.get_device_name(device))
    fields += [f"python {platform.python_version()}", f"torch {torch.__version__}",
               f"curvature {curvature.__version__}", f"threads {torch.get_num_threads()}", *settings,
               f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}"]
    print(" | ".join(fields))
    print_load()
