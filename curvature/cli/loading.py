"""The user's files: model and data factories, and checkpoints, each checked against its contract.

A factory is named ``FILE.py:FACTORY`` (or ``module:FACTORY``) and called with no arguments; a checkpoint is read
with ``torch.load(weights_only=True)``. Whatever breaks a contract is a :class:`~curvature.cli.errors.UsageError`
that names the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..operators.data import Data, is_single_batch
from .errors import UsageError, _describe, _one_line

__all__ = ["CHECKPOINT_KEYS", "DATA_KEYS", "load_checkpoint", "load_data", "load_model"]

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
DATA_KEYS = ("data", "loss_fn")
_IMPORTED: dict[Path, Any] = {}  # user files by resolved path


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
