"""The ``curvature`` command: a sharpness report of a model from the shell.

``curvature report`` with no arguments is a complete, self-contained run: it trains a 64-32-10 tanh MLP
(2410 parameters) on scikit-learn's digits (8x8 images, 10 classes, shipped with scikit-learn: no
download), 75/25 stratified split, standardized with the training statistics, 30 epochs of minibatch SGD
(lr 0.05, momentum 0.9, batch 64), then measures the Hessian of the mean cross-entropy over the whole
training split (one full batch of 1347 samples) with :func:`curvature.sharpness`, prints the report and
writes ``report.json`` and ``density.png`` into ``--out`` (default ``./curvature-report``). It takes about 5
seconds on a 2-core CPU, start-up included. With ``--dtype float64 --seed 0`` the model is the one of
``examples/sharpness.py``.

Your own model and data come from Python files (or importable modules), each naming a factory that is
called with no arguments:

- ``--model FILE.py:FACTORY`` returns a ``torch.nn.Module``. The model is measured as it is (after
  ``--checkpoint``), in eval mode, never trained. It needs ``--data``.
- ``--data FILE.py:FACTORY`` returns the data: one ``(inputs, targets)`` batch, a re-iterable of such
  batches (a ``DataLoader``, a list), or a dict ``{"data": ..., "loss_fn": ...}`` to bring a loss
  (``loss_fn(outputs, targets)`` returning a scalar; ``--loss`` overrides it; default cross-entropy).
  Inputs may be a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``). Floating
  tensors are converted to ``--dtype`` and every tensor is moved to ``--device``.
- ``--checkpoint PATH`` is a file written by ``torch.save``, read with ``weights_only=True``: a state
  dict, or a dict holding one under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``. It must fit the
  model exactly (``load_state_dict(strict=True)``). With the built-in model it replaces the training.

The factories run after ``torch.manual_seed(--seed)``, so a randomly initialized model is reproducible;
the same seed drives the training's shuffling and every random draw of the estimators.

Every user error (a wrong path, a missing or failing factory, a factory that returns the wrong thing, a
checkpoint that does not fit or holds NaN or Inf, a loss that does not reduce the batch to a scalar, an
``--out`` that cannot be created or written, an unknown metric, dtype or device, data that does not fit the
model) exits with status 2 and one line on stderr, ``curvature: error: ...``, without a traceback. Progress bars
(training, products) go to stderr when it is a terminal; ``--quiet`` prints nothing but the report.

Example:
    Run from Python (the shell's ``curvature ...`` is ``main([...])``):

    >>> main(["--version"])  # doctest: +ELLIPSIS
    curvature ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .operators.data import Data, batch_size, is_single_batch
from .operators.losses import resolve_reduction
from .sharpness import METRICS, OPERATORS, SharpnessReport, sharpness

__all__ = ["DEFAULT_METRICS", "main"]

DEFAULT_METRICS = ("lambda_max", "top_k", "trace", "frobenius_norm", "density")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOSSES: dict[str, Callable[[], nn.Module]] = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
DATA_KEYS = ("data", "loss_fn")
BUILTIN_MODEL = "built-in: 64-32-10 tanh MLP"
BUILTIN_DATA = "built-in: scikit-learn digits, training split (1347 of 1797 samples, standardized)"
DEFAULT_EPOCHS = 30
_IMPORTED: dict[Path, Any] = {}  # user files by resolved path

CONTRACTS = """\
file contracts (each FACTORY is called with no arguments):
  --model FILE.py:FACTORY   returns a torch.nn.Module; measured as is (after --checkpoint), in eval
                            mode, never trained; needs --data
  --data FILE.py:FACTORY    returns (inputs, targets), a DataLoader or list of such batches, or
                            {"data": <one of those>, "loss_fn": <loss(outputs, targets) -> scalar>}
  --checkpoint PATH         torch.save'd state dict (or a dict with it under "state_dict",
                            "model_state_dict" or "model"), loaded with weights_only=True, strict
  FILE.py may also be an importable module: --model mypackage.nets:make_model

without --model: a 64-32-10 tanh MLP trained on scikit-learn's digits (needs scikit-learn), measured on
its training split; --checkpoint loads its weights instead of training.

outputs: the report on stdout; report.json (the report and a "run" section) and density.png (when the
density is measured; needs matplotlib) in --out. Exit status 0, or 2 with one line on stderr
("curvature: error: ...") for any user error.

example:
  curvature report                                   # the built-in digits run
  curvature report --model net.py:make_model --data data.py:make_data --checkpoint net.pt \\
                   --metrics lambda_max,trace --device cuda --out runs/net
"""


class UsageError(Exception):
    """A mistake of the user's: reported as one line ``curvature: error: ...`` with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`UsageError` (one line, no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise the parse error as a :class:`UsageError` naming the help command."""
        command = "curvature report" if self.prog.endswith(" report") else "curvature"
        raise UsageError(f"{message} (see: {command} --help)")


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


def _parse_metrics(values: Sequence[str]) -> tuple[str, ...]:
    """Turn ``--metrics`` words (comma- or space-separated; ``all`` for every metric) into metric names.

    Example:
        >>> _parse_metrics(["lambda_max,trace", "density"])
        ('lambda_max', 'trace', 'density')
    """
    names: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            for metric in METRICS if name == "all" else (name,):
                if metric not in METRICS:
                    raise UsageError(f"--metrics: unknown metric {name!r}; choose from {', '.join(METRICS)} or all.")
                if metric not in names:
                    names.append(metric)
    if not names:
        raise UsageError(f"--metrics is empty; choose from {', '.join(METRICS)} or all.")
    return tuple(names)


def _int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``curvature`` command (subcommand ``report``).

    Returns:
        The argument parser.
    """
    parser = _Parser(
        prog="curvature",
        description="Second-order information for PyTorch models, from the shell.",
        epilog="run 'curvature report --help' for the options and the file contracts.",
    )
    parser.add_argument("--version", action="version", version=f"curvature {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="train or load a model, measure how sharp its loss is, write report.json and density.png",
        description="Measure the curvature of a model's loss: lambda_max, top-k eigenvalues, trace, Frobenius\n"
        "norm and spectral density, with the products and time each took. Without --model: a 64-32-10\n"
        "tanh MLP trained on scikit-learn's digits and measured on its training split (seconds on a CPU).",
        epilog=CONTRACTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = report.add_argument_group("model and data")
    source.add_argument("--model", metavar="FILE.py:FACTORY", help="your model factory (default: the built-in MLP)")
    source.add_argument("--data", metavar="FILE.py:FACTORY", help="your data factory (required with --model)")
    source.add_argument("--checkpoint", metavar="PATH", help="a state dict to load into the model (strict)")
    source.add_argument("--loss", choices=sorted(LOSSES),
                        help="the loss (default: the data factory's loss_fn, else cross_entropy)")
    source.add_argument("--epochs", type=_int_at_least(0), metavar="N",
                        help=f"epochs of SGD for the built-in model (default {DEFAULT_EPOCHS}; 0: untrained)")
    measure = report.add_argument_group("measurement")
    measure.add_argument("--metrics", nargs="+", metavar="METRIC", default=list(DEFAULT_METRICS),
                         help=f"comma- or space-separated, from: {', '.join(METRICS)}, or all "
                         f"(default: {','.join(DEFAULT_METRICS)})")
    measure.add_argument("--operator", choices=tuple(OPERATORS), default="hessian",
                         help="which curvature (default: hessian)")
    measure.add_argument("--top-k", type=_int_at_least(1), default=5, metavar="K",
                         help="eigenvalues for top_k (default 5)")
    measure.add_argument("--tol", type=_positive_float, default=1e-3,
                         help="relative error of the eigenvalues, certified by their error bounds (default 1e-3)")
    measure.add_argument("--num-matvecs", type=_int_at_least(2), default=100, metavar="N",
                         help="products for the trace and Frobenius estimates (default 100)")
    measure.add_argument("--density-probes", type=_int_at_least(1), default=1, metavar="N",
                         help="probes of the spectral density (default 1)")
    measure.add_argument("--density-steps", type=_int_at_least(1), default=100, metavar="N",
                         help="Lanczos steps per density probe (default 100)")
    run = report.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default: cpu)")
    run.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                     help="the model and the floating data are converted to it (default: float32)")
    run.add_argument("--threads", type=_int_at_least(1), metavar="N",
                     help="CPU threads for torch (default: 1 for the tiny built-in model, torch's default otherwise)")
    run.add_argument("--seed", type=_int_at_least(0, 2**63 - 1), default=0,
                     help="seeds the factories, training and estimators (default 0)")
    run.add_argument("--out", type=Path, default=Path("curvature-report"), metavar="DIR",
                     help="directory for report.json and density.png (created; default ./curvature-report)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or messages: only the report")
    return parser


# -- loading user files --------------------------------------------------------------------------------------


def _split_spec(spec: str, option: str) -> tuple[str, str]:
    """Split ``FILE.py:FACTORY`` (or ``module:FACTORY``) at its last colon."""
    source, colon, name = spec.rpartition(":")
    if not colon or not source or not name.isidentifier():
        raise UsageError(
            f"{option} {spec!r} names no factory; write {option} FILE.py:FACTORY, e.g. {option} "
            f"{'net.py:make_model' if option == '--model' else 'data.py:make_data'}."
        )
    return source, name


def _import_source(source: str, option: str) -> Any:
    """Import a Python file by path, or a module by its dotted name."""
    path = Path(source).expanduser()
    looks_like_file = source.endswith(".py") or "/" in source or "\\" in source
    if looks_like_file or path.is_file():
        if not path.is_file():
            raise UsageError(f"{option}: no such file: {source}")
        if path.resolve() in _IMPORTED:  # --model and --data from one file: import it once
            return _IMPORTED[path.resolve()]
        stem = "".join(c if c.isalnum() else "_" for c in path.stem)
        name = f"_curvature_user_{len(_IMPORTED)}_{stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"{option}: cannot import {source} as Python (does it end in .py?).")
        module = importlib.util.module_from_spec(spec)
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # the file may import its neighbours, as a script would
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            sys.modules.pop(name, None)
            raise UsageError(f"{option}: importing {source} failed: {_describe(error)}") from error
        _IMPORTED[path.resolve()] = module
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as error:
        if error.name and source.startswith(error.name):
            raise UsageError(f"{option}: {source!r} is neither a file nor an importable module.") from error
        raise UsageError(f"{option}: importing {source} failed: {_describe(error)}") from error
    except (Exception, SystemExit) as error:
        raise UsageError(f"{option}: importing {source} failed: {_describe(error)}") from error


def _call_factory(spec: str, option: str) -> Any:
    """Import ``spec``'s file or module and return what its factory returns when called with no arguments."""
    source, name = _split_spec(spec, option)
    module = _import_source(source, option)
    if not hasattr(module, name):
        defined = sorted(
            key for key, value in vars(module).items()
            if callable(value) and not key.startswith("_") and getattr(value, "__module__", None) == module.__name__
        )
        hint = f"; it defines {', '.join(defined[:8])}" if defined else ""
        raise UsageError(f"{option}: {source} has no {name!r}{hint}.")
    factory = getattr(module, name)
    if not callable(factory):
        raise UsageError(f"{option}: {source}:{name} is a {type(factory).__name__}, not a function to call.")
    try:
        return factory()
    except (Exception, SystemExit) as error:
        raise UsageError(f"{option}: {source}:{name}() raised {_describe(error)}") from error


def load_model(spec: str) -> nn.Module:
    """Build the user's model from ``FILE.py:FACTORY``.

    Args:
        spec: The ``--model`` argument.

    Returns:
        The module the factory returned.

    Raises:
        UsageError: If the file, module or factory is missing, the factory raises, or it returns no module.
    """
    model = _call_factory(spec, "--model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model: {spec}() returned a {type(model).__name__}, not a torch.nn.Module; the factory must build "
            "and return the model, e.g. return nn.Sequential(...)."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--model: {spec}() returned a module without trainable parameters.")
    return model


def load_data(spec: str) -> tuple[Any, Callable[..., torch.Tensor] | None]:
    """Get the user's data (and optional loss) from ``FILE.py:FACTORY``.

    Args:
        spec: The ``--data`` argument.

    Returns:
        ``(data, loss_fn)``; ``loss_fn`` is None unless the factory returned a dict with one.

    Raises:
        UsageError: If the factory is missing or raises, or returns something that is not data.
    """
    result = _call_factory(spec, "--data")
    loss_fn = None
    if isinstance(result, Mapping):
        unknown = [key for key in result if key not in DATA_KEYS]
        if "data" not in result or unknown:
            raise UsageError(
                f"--data: {spec}() returned a dict with keys {sorted(map(str, result))}; a dict must hold 'data' "
                "and may hold 'loss_fn', nothing else."
            )
        result, loss_fn = result["data"], result.get("loss_fn")
        if loss_fn is not None and not callable(loss_fn):
            raise UsageError(f"--data: the 'loss_fn' of {spec}() is a {type(loss_fn).__name__}, not callable.")
    return _as_data(result, spec), loss_fn


def _as_data(data: Any, spec: str) -> Any:
    """Check the shape of the data contract; a pair of numpy arrays becomes a pair of tensors."""
    contract = (
        "a data factory returns (inputs, targets), a DataLoader or list of such batches, or "
        "{'data': ..., 'loss_fn': ...}"
    )
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(type(a).__module__ == "numpy" for a in data):
        data = tuple(torch.as_tensor(a) for a in data)
    if isinstance(data, (str, bytes, torch.Tensor)) or data is None or not (
        is_single_batch(data) or isinstance(data, Iterable)
    ):
        raise UsageError(f"--data: {spec}() returned a {type(data).__name__}; {contract}.")
    try:
        Data(data)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--data: {spec}() returned unusable data: {_one_line(str(error))}") from error
    return data


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict from ``path`` into ``model`` (strict), with one-line errors for what does not fit.

    Args:
        model: The model.
        path: The ``--checkpoint`` argument.

    Raises:
        UsageError: If the file is missing or not a tensors-only ``torch.save`` file, holds no state dict, its
            keys or shapes differ from the model's, or a floating-point tensor holds NaN or Inf (named).
    """
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(
            f"--checkpoint: cannot read {path} with torch.load(weights_only=True): {_describe(error)[:200]}; save "
            "the weights with torch.save(model.state_dict(), path)."
        ) from error
    if isinstance(state, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise UsageError(
            f"--checkpoint: {path} holds a {type(state).__name__}, not a state dict; save it with "
            "torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict()

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {first(unexpected)}")
    if problems:
        hint = ""
        if unexpected and all(key.startswith("module.") for key in state):
            hint = " (saved from DataParallel/DDP? strip the 'module.' prefix)"
        raise UsageError(f"--checkpoint: {path} does not fit the model: {'; '.join(problems)}{hint}.")
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
        if isinstance(value, torch.Tensor) and isinstance(state[key], torch.Tensor) and state[key].shape != value.shape
    ]
    if shapes:
        raise UsageError(
            f"--checkpoint: {path} does not fit the model: shapes differ (checkpoint vs model) for {first(shapes)}."
        )
    broken = [
        key for key, value in state.items()
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
        and not bool(torch.isfinite(value).all())
    ]
    if broken:
        tensor = state[broken[0]]
        count = int((~torch.isfinite(tensor)).sum())
        others = f" (and {first(broken[1:])})" if len(broken) > 1 else ""
        raise UsageError(
            f"--checkpoint: {path}: {broken[0]} holds NaN or Inf in {count} of its {tensor.numel()} entries{others}; "
            "its curvature is undefined. Load weights saved before the training diverged."
        )
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(f"--checkpoint: {path} does not fit the model: {_describe(error)}") from error


# -- device, dtype, data conversion -------------------------------------------------------------------------


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
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, dict):
        return {key: _cast(value, dtype, device) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(value, dtype, device) for value in obj)
    return obj


class _CastBatches:
    """A re-iterable view of the user's batches, converted to the run's dtype and device on the fly."""

    def __init__(self, source: Iterable[Any], dtype: torch.dtype, device: torch.device) -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self.__wrapped__ = source  # the operators read a DataLoader's sampler through it (shuffling is fine)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.source:
            yield _cast(batch, self.dtype, self.device)


def _call(model: nn.Module, inputs: Any) -> Any:
    """Call the model as the operators do: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def _warnings_unless_failing() -> Iterator[None]:
    """Hold back the warnings of a block; show them only if it succeeds (a failure's error says it all)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _check_fit(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, hide_bars: bool) -> dict[str, Any]:
    """Run the model and the loss over every batch once: count samples, average the loss, catch misfits."""
    from tqdm.auto import tqdm

    total, num_samples, index = 0.0, 0, -1
    batches = iter([data] if is_single_batch(data) else data)
    with torch.no_grad(), tqdm(desc="checking data", unit="batch", delay=2.0, disable=hide_bars, leave=False) as bar:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as error:
                raise UsageError(f"--data: iterating over the data raised {_describe(error)}") from error
            index += 1
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UsageError(f"--data: batch {index} is a {type(batch).__name__}, not an (inputs, targets) pair.")
            inputs, targets = batch
            try:
                n = batch_size(inputs)
            except ValueError as error:
                raise UsageError(f"--data: batch {index}: {_one_line(str(error))}") from error
            try:
                with _warnings_unless_failing():
                    outputs = _call(model, inputs)
            except Exception as error:
                raise UsageError(
                    f"the data does not fit the model: the forward pass on batch {index} raised {_describe(error)}"
                ) from error
            try:
                with _warnings_unless_failing():
                    loss = loss_fn(outputs, targets)
                    scalar = not isinstance(loss, torch.Tensor) or loss.numel() == 1
                    value = float(loss) if scalar else math.nan
            except Exception as error:
                shapes = ", ".join(
                    f"{name} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                    for name, t in (("outputs", outputs), ("targets", targets))
                )
                raise UsageError(
                    f"the loss does not fit the model's outputs and the targets on batch {index} ({shapes}): "
                    f"{_describe(error)}"
                ) from error
            if not scalar:
                raise UsageError(
                    f"the loss returned a tensor of shape {tuple(loss.shape)} on batch {index}, not a scalar: the loss "
                    "must reduce the batch to a scalar with reduction 'mean' or 'sum', e.g. "
                    "torch.nn.functional.cross_entropy(outputs, targets) (reduction='mean')."
                )
            total, num_samples = total + value * n, num_samples + n
            bar.update()
    if index < 0:
        raise UsageError("--data: the data holds no batch.")
    return {"num_samples": num_samples, "num_batches": index + 1, "loss": total / max(num_samples, 1)}


# -- the built-in example --------------------------------------------------------------------------------


def _digits(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """scikit-learn's digits, split 75/25 (stratified), standardized: ``X_train, X_test, y_train, y_test``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise UsageError(
            "the built-in example needs scikit-learn for its digits data: pip install scikit-learn, or bring "
            "your own model and data with --model FILE.py:FACTORY --data FILE.py:FACTORY."
        ) from error
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_train.mean(0), X_train.std(0)
    std[std == 0] = 1.0  # a few border pixels are always 0

    def prep(a: Any) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype, device=device)

    return (prep(X_train), prep(X_test), torch.tensor(y_train, device=device),
            torch.tensor(y_test, device=device))


def _builtin_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, hide_bars: bool) -> None:
    """Minibatch SGD with momentum (lr 0.05, momentum 0.9, batch 64), shuffled by a generator seeded with ``seed``."""
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The same loader as examples/sharpness.py (so the same model there for the same seed and dtype).
    loader = DataLoader(TensorDataset(X.cpu(), y.cpu()), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    with tqdm(range(epochs), desc="training", unit="epoch", disable=hide_bars, leave=False) as bar:
        for _ in bar:
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(xb.to(X.device)), yb.to(y.device))
                loss.backward()
                optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    optimizer.zero_grad(set_to_none=True)


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


# -- the report command ------------------------------------------------------------------------------------


def _check_combination(args: argparse.Namespace) -> None:
    """Refuse options that do not go together."""
    builtin = args.model is None
    if builtin and args.data is not None:
        raise UsageError("--data needs --model: the built-in model is trained on the digits; name your model with "
                         "--model FILE.py:FACTORY.")
    if not builtin and args.data is None:
        raise UsageError("--model needs --data FILE.py:FACTORY: a factory that returns (inputs, targets), a "
                         "DataLoader, or {'data': ..., 'loss_fn': ...}.")
    if not builtin and args.epochs is not None:
        raise UsageError("--epochs trains the built-in model only; --model is measured as it is (train it "
                         "yourself and pass --checkpoint).")
    if builtin and args.checkpoint is not None and args.epochs is not None:
        raise UsageError("--checkpoint replaces the training of the built-in model; leave out --epochs.")


def _report(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``curvature report`` with the thread count it asks for, restoring torch's afterwards."""
    threads = torch.get_num_threads()
    if args.threads is not None or args.model is None:
        # The built-in model is tiny: a second thread costs more than it saves (about 10x slower measured on a
        # 2-core machine while another process ran).
        torch.set_num_threads(1 if args.threads is None else args.threads)
    try:
        return _run_report(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run_report(args: argparse.Namespace, argv: list[str]) -> int:
    start_all = time.perf_counter()

    def say(*text: Any) -> None:
        if not args.quiet:
            print(*text)

    hide_bars = args.quiet or not sys.stderr.isatty()
    metrics = _parse_metrics(args.metrics)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    builtin = args.model is None
    _check_combination(args)
    _check_out(args.out)
    torch.manual_seed(args.seed)
    run: dict[str, Any] = {
        "curvature_version": __version__,
        "command": ["curvature", *argv],
        "model": BUILTIN_MODEL if builtin else args.model,
        "data": BUILTIN_DATA if builtin else args.data,
        "checkpoint": args.checkpoint,
    }
    if builtin:
        model = _builtin_model()
        data_loss = None
    else:
        model = load_model(args.model)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device=device, dtype=dtype)
    if builtin:
        X, X_test, y, y_test = _digits(dtype, device)
        data: Any = (X, y)
    else:
        raw, data_loss = load_data(args.data)
        data = _cast(raw, dtype, device) if is_single_batch(raw) else _CastBatches(raw, dtype, device)
    if args.loss is not None:
        loss_fn: Callable[..., torch.Tensor] = LOSSES[args.loss]()
        run["loss"] = args.loss
    elif data_loss is not None:
        name = getattr(data_loss, "__name__", type(data_loss).__name__)
        loss_fn, run["loss"] = data_loss, f"loss_fn from {args.data}: {name}"
        try:  # reduction='none' gets the operators' own message, before any work
            resolve_reduction(loss_fn, None)
        except ValueError as error:
            raise UsageError(f"--data: the loss_fn of {args.data}: {_one_line(str(error))}") from error
    else:
        loss_fn, run["loss"] = nn.CrossEntropyLoss(), "cross_entropy"

    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {run['model']}, {num_params} parameters, {args.dtype} on {device}")
    if builtin:
        say(f"data: scikit-learn digits, {len(X)} training / {len(X_test)} test samples, standardized")
        if args.checkpoint is None:
            epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
            start = time.perf_counter()
            _train(model, X, y, epochs, args.seed, hide_bars)
            run.update(epochs=epochs, train_seconds=round(time.perf_counter() - start, 3))
            say(f"training: {epochs} epochs of SGD (lr 0.05, momentum 0.9, batch 64) in {run['train_seconds']:.1f} s")
        model.eval()
        run.update(train_accuracy=_accuracy(model, X, y), test_accuracy=_accuracy(model, X_test, y_test))
    else:
        model.eval()
    fit = _check_fit(model, loss_fn, data, hide_bars)
    run.update(num_samples=fit["num_samples"], num_batches=fit["num_batches"], loss_value=fit["loss"])
    if builtin:
        say(f"train loss {fit['loss']:.4f}, train accuracy {run['train_accuracy']:.3f}, "
            f"test accuracy {run['test_accuracy']:.3f}")
    else:
        say(f"data: {args.data}, {fit['num_samples']} samples in {fit['num_batches']} batch(es), "
            f"loss {fit['loss']:.6g} ({run['loss']})")
    run.update(dtype=args.dtype, device=str(device), seed=args.seed, operator=args.operator, metrics=list(metrics),
               top_k=args.top_k, tol=args.tol, num_matvecs=args.num_matvecs, density_probes=args.density_probes,
               density_steps=args.density_steps)

    try:
        report = sharpness(
            model, loss_fn, data, metrics=metrics, operator=args.operator, k=args.top_k, tol=args.tol,
            num_matvecs=args.num_matvecs, density_probes=args.density_probes, density_steps=args.density_steps,
            generator=torch.Generator().manual_seed(args.seed), quiet=hide_bars,
        )
    except (ValueError, TypeError) as error:
        raise UsageError(_one_line(str(error))) from error
    except torch.cuda.OutOfMemoryError as error:
        raise UsageError(f"out of memory on {device}: use smaller batches in --data, or --device cpu.") from error
    say()
    print(report)
    written = _write(report, run, args.out, start_all)
    say()
    say(f"wrote {' and '.join(str(path) for path in written)} in {run['seconds']:.1f} s")
    return 0


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
            name = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}.get(report.operator, "Empirical Fisher")
            model = "digits MLP" if run["model"] == BUILTIN_MODEL else Path(str(run["model"]).rpartition(":")[0]).name
            title = f"{name} spectral density, {model} (P = {report.num_params})"
            written.append(report.density.plot(out / "density.png", title=title))
        except ImportError as error:
            print(f"curvature: warning: density.png not written: {_one_line(str(error))}", file=sys.stderr)
    run["seconds"] = round(time.perf_counter() - start_all, 3)
    path = out / "report.json"
    path.write_text(json.dumps({**report.to_dict(), "run": run}, indent=2) + "\n")
    return [path, *written]


def main(argv: list[str] | None = None) -> int:
    """Run the ``curvature`` command.

    Called from Python it does what the command does, including seeding torch's global random generator
    with ``--seed`` and importing the user's files.

    Args:
        argv: The arguments after the command name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 on a user error (one line on stderr), 130 when interrupted.

    Example:
        >>> main(["report", "--metrics", "lambda_max,sharpness"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help and --version
            return int(exit_.code or 0)
        if args.command is None:
            raise UsageError("choose a command: curvature report (see: curvature --help)")
        return _report(args, argv)
    except UsageError as error:
        print(f"curvature: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvature: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
