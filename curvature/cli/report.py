"""What ``curvature report`` writes: the console summary on stdout, ``report.json`` and ``density.png`` in ``--out``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..operators.registry import operator_class
from ..sharpness import SharpnessReport
from .digits import BUILTIN_MODEL
from .errors import UsageError, _describe, _one_line


class _Console:
    """The run's lines on stdout: the report always, every other line unless ``--quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def say(self, *text: Any) -> None:
        """Print a progress line (nothing with ``--quiet``)."""
        if not self.quiet:
            print(*text)

    def model(self, run: dict[str, Any], num_params: int, dtype: str, device: torch.device) -> None:
        """The model line: its name, parameter count, dtype and device."""
        self.say(f"model: {run['model']}, {num_params} parameters, {dtype} on {device}")

    def digits(self, num_train: int, num_test: int) -> None:
        """The built-in data line."""
        self.say(f"data: scikit-learn digits, {num_train} training / {num_test} test samples, standardized")

    def training(self, run: dict[str, Any]) -> None:
        """The built-in training line."""
        self.say(f"training: {run['epochs']} epochs of SGD (lr 0.05, momentum 0.9, batch 64) in "
                 f"{run['train_seconds']:.1f} s")

    def fit(self, run: dict[str, Any], fit: dict[str, Any], data: str | None) -> None:
        """The line after the data check: the built-in's loss and accuracies, or the user data's counts and loss."""
        if data is None:
            self.say(f"train loss {fit['loss']:.4f}, train accuracy {run['train_accuracy']:.3f}, "
                     f"test accuracy {run['test_accuracy']:.3f}")
        else:
            self.say(f"data: {data}, {fit['num_samples']} samples in {fit['num_batches']} batch(es), "
                     f"loss {fit['loss']:.6g} ({run['loss']})")

    def report(self, report: SharpnessReport) -> None:
        """The report itself, printed even with ``--quiet``."""
        self.say()
        print(report)

    def written(self, paths: list[Path], seconds: float) -> None:
        """The closing line: the files written and the run's time."""
        self.say()
        self.say(f"wrote {' and '.join(str(path) for path in paths)} in {seconds:.1f} s")


def _check_out(out: Path) -> None:
    """Fail before any work when ``--out`` cannot hold the outputs, by doing what writing them will do.

    The directory and its missing parents are created and a temporary file is written in it; then the file
    and the directories this check created are removed, so that a run failing later leaves nothing behind.
    Permission bits cannot tell: ``os.access`` says yes to root for a read-only directory and for ``/proc``,
    and nothing about a parent that is a dangling link.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; name a directory.")
    created, path = [], out
    while not os.path.lexists(path) and path != path.parent:  # deepest first: the order to remove them in
        created.append(path)
        path = path.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".curvature-write-check-", dir=out)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create a directory and write in it ({_describe(error)}); name "
                         "another directory.") from error
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


def _write(report: SharpnessReport, run: dict[str, Any], out: Path, start_all: float) -> list[Path]:
    """Write ``report.json`` (with the run section) and ``density.png`` into ``out``; return the paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out: cannot create directory {out}: {_describe(error)}") from error
    written = []
    if report.density is not None:
        try:
            name = operator_class(report.operator).title
            model = "digits MLP" if run["model"] == BUILTIN_MODEL else Path(str(run["model"]).rpartition(":")[0]).name
            title = f"{name} spectral density, {model} (P = {report.num_params})"
            written.append(report.density.plot(out / "density.png", title=title))
        except ImportError as error:
            print(f"curvature: warning: density.png not written: {_one_line(str(error))}", file=sys.stderr)
    run["seconds"] = round(time.perf_counter() - start_all, 3)
    path = out / "report.json"
    path.write_text(json.dumps({**report.to_dict(), "run": run}, indent=2) + "\n")
    return [path, *written]
