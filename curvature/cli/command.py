"""Running ``curvature``: :func:`main` and its exit statuses, and ``curvature report`` as load, measure, write."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import __version__
from ..operators.data import is_single_batch
from ..operators.losses import resolve_reduction
from ..sharpness import SharpnessReport, parameter_blocks, sharpness
from .device import _cast, _CastBatches, resolve_device
from .digits import BUILTIN_DATA, BUILTIN_MODEL, DEFAULT_EPOCHS, _accuracy, _builtin_model, _digits, _train
from .errors import UsageError, _one_line
from .fit import _check_fit
from .loading import load_checkpoint, load_data, load_model
from .parser import DTYPES, LOSSES, _check_combination, _parse_blocks, _parse_metrics, build_parser
from .report import _check_out, _Console, _write

__all__ = ["main"]


@dataclass
class _Loaded:
    """What the report measures, on the run's device and dtype, and the report's ``run`` section so far."""

    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    data: Any
    run: dict[str, Any]
    digits: tuple[torch.Tensor, ...] | None  # the built-in run's X_train, X_test, y_train, y_test


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
    """Check the arguments, load, measure, write; every user error before any work."""
    start_all = time.perf_counter()
    console = _Console(args.quiet)
    hide_bars = args.quiet or not sys.stderr.isatty()
    metrics = _parse_metrics(args.metrics)
    device = resolve_device(args.device)
    _check_combination(args)
    blocks = _parse_blocks(args, metrics)
    _check_out(args.out)
    torch.manual_seed(args.seed)
    loaded = _load(args, argv, device)
    _check_blocks(loaded.model, blocks, args)
    _prepare(loaded, args, device, console, hide_bars)
    report = _measure(loaded, args, metrics, blocks, device, hide_bars)
    console.report(report)
    written = _write(report, loaded.run, args.out, start_all)
    console.written(written, loaded.run["seconds"])
    return 0


def _load(args: argparse.Namespace, argv: list[str], device: torch.device) -> _Loaded:
    """Build the model (with ``--checkpoint``), the data and the loss, on the run's device and dtype."""
    dtype = DTYPES[args.dtype]
    builtin = args.model is None
    run: dict[str, Any] = {
        "curvature_version": __version__,
        "command": ["curvature", *argv],
        "model": BUILTIN_MODEL if builtin else args.model,
        "data": BUILTIN_DATA if builtin else args.data,
        "checkpoint": args.checkpoint,
    }
    model = _builtin_model() if builtin else load_model(args.model)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.to(device=device, dtype=dtype)
    digits, data_loss = None, None
    if builtin:
        digits = _digits(dtype, device)
        data: Any = (digits[0], digits[2])
    else:
        raw, data_loss = load_data(args.data)
        data = _cast(raw, dtype, device) if is_single_batch(raw) else _CastBatches(raw, dtype, device)
    loss_fn, run["loss"] = _choose_loss(args, data_loss)
    return _Loaded(model, loss_fn, data, run, digits)


def _choose_loss(
    args: argparse.Namespace, data_loss: Callable[..., torch.Tensor] | None
) -> tuple[Callable[..., torch.Tensor], str]:
    """``--loss``, else the data factory's ``loss_fn``, else cross-entropy; with its name for the run section."""
    if args.loss is not None:
        return LOSSES[args.loss](), args.loss
    if data_loss is not None:
        name = getattr(data_loss, "__name__", type(data_loss).__name__)
        try:  # reduction='none' gets the operators' own message, before any work
            resolve_reduction(data_loss, None)
        except ValueError as error:
            raise UsageError(f"--data: the loss_fn of {args.data}: {_one_line(str(error))}") from error
        return data_loss, f"loss_fn from {args.data}: {name}"
    return nn.CrossEntropyLoss(), "cross_entropy"


def _check_blocks(model: nn.Module, blocks: str | dict[str, list[str]] | None, args: argparse.Namespace) -> None:
    """Refuse ``--block`` names that are not the model's, before any training or measurement."""
    try:
        parameter_blocks(model, blocks)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{'--per-layer' if args.per_layer else '--block'}: {_one_line(str(error))}") from error


def _prepare(
    loaded: _Loaded, args: argparse.Namespace, device: torch.device, console: _Console, hide_bars: bool
) -> None:
    """Train the built-in model (unless ``--checkpoint``), put the model in eval mode, and check the data fits."""
    model, run = loaded.model, loaded.run
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.model(run, num_params, args.dtype, device)
    if loaded.digits is not None:
        X, X_test, y, y_test = loaded.digits
        console.digits(len(X), len(X_test))
        if args.checkpoint is None:
            epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
            start = time.perf_counter()
            _train(model, X, y, epochs, args.seed, hide_bars)
            run.update(epochs=epochs, train_seconds=round(time.perf_counter() - start, 3))
            console.training(run)
        model.eval()
        run.update(train_accuracy=_accuracy(model, X, y), test_accuracy=_accuracy(model, X_test, y_test))
    else:
        model.eval()
    fit = _check_fit(model, loaded.loss_fn, loaded.data, hide_bars)
    run.update(num_samples=fit["num_samples"], num_batches=fit["num_batches"], loss_value=fit["loss"])
    console.fit(run, fit, None if loaded.digits is not None else args.data)


def _measure(
    loaded: _Loaded, args: argparse.Namespace, metrics: tuple[str, ...], blocks: str | dict[str, list[str]] | None,
    device: torch.device, hide_bars: bool,
) -> SharpnessReport:
    """Run :func:`curvature.sharpness` with the options, seeded by ``--seed``; record them in the run section."""
    loaded.run.update(dtype=args.dtype, device=str(device), seed=args.seed, operator=args.operator,
                      metrics=list(metrics), top_k=args.top_k, tol=args.tol, num_matvecs=args.num_matvecs,
                      density_probes=args.density_probes, density_steps=args.density_steps)
    if blocks is not None:
        loaded.run["blocks"] = blocks
    try:
        return sharpness(
            loaded.model, loaded.loss_fn, loaded.data, metrics=metrics, operator=args.operator, k=args.top_k,
            tol=args.tol, num_matvecs=args.num_matvecs, density_probes=args.density_probes,
            density_steps=args.density_steps, generator=torch.Generator().manual_seed(args.seed), quiet=hide_bars,
            blocks=blocks,
        )
    except (ValueError, TypeError) as error:
        raise UsageError(_one_line(str(error))) from error
    except torch.cuda.OutOfMemoryError as error:
        raise UsageError(f"out of memory on {device}: use smaller batches in --data, or --device cpu.") from error
