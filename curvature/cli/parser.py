"""The command line of ``curvature``: its options, their types and defaults, and the combinations refused."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from ..operators.registry import APPROXIMATE_OPERATORS, OPERATORS
from ..sharpness import METRICS
from .digits import DEFAULT_EPOCHS
from .errors import UsageError

__all__ = ["CONTRACTS", "DEFAULT_METRICS", "DTYPES", "LOSSES", "build_parser"]

DEFAULT_METRICS = ("lambda_max", "top_k", "trace", "frobenius_norm", "density")
BLOCK_METRICS = ("lambda_max", "top_k", "trace")  # any of them lets --per-layer and --block measure a block
DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOSSES: dict[str, Callable[[], nn.Module]] = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}

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
  curvature report --per-layer                       # ... with lambda_max and trace of each layer
  curvature report --model net.py:make_model --data data.py:make_data --checkpoint net.pt \\
                   --metrics lambda_max,trace --device cuda --out runs/net
"""

class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`UsageError` (one line, no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise the parse error as a :class:`UsageError` naming the help command."""
        command = "curvature report" if self.prog.endswith(" report") else "curvature"
        raise UsageError(f"{message} (see: {command} --help)")



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
    measure.add_argument("--operator", choices=(*OPERATORS, *APPROXIMATE_OPERATORS), default="hessian",
                         help="which curvature: an exact one, or the Kronecker-factored kfac or ekfac of the "
                         "model's Linear, Conv1d/2d, Embedding and normalization layers (default: hessian)")
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
    measure.add_argument("--per-layer", action="store_true",
                         help="add a per-layer table: lambda_max and trace of the curvature of each module's own "
                         "parameters alone (its diagonal block), as --metrics asks for them")
    measure.add_argument("--block", action="append", metavar="NAME=SEL[,SEL...]",
                         help="a block of your own for that table instead: parameter or module names (a module "
                         "takes every parameter under it); repeat for several blocks, e.g. --block "
                         "hidden=0 --block out=2.weight,2.bias")
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


def _parse_blocks(args: argparse.Namespace, metrics: tuple[str, ...]) -> str | dict[str, list[str]] | None:
    """The ``blocks=`` of :func:`curvature.sharpness` that ``--per-layer`` or ``--block`` ask for (None: neither).

    Example:
        >>> _parse_blocks(argparse.Namespace(per_layer=False, block=["hidden=0", "out=2.weight,2.bias"]),
        ...               ("lambda_max",))
        {'hidden': ['0'], 'out': ['2.weight', '2.bias']}
    """
    if args.per_layer and args.block:
        raise UsageError("--per-layer and --block both choose the blocks of the table: one block per module, or "
                         "yours; pass one of them.")
    if not args.per_layer and not args.block:
        return None
    option = "--per-layer" if args.per_layer else "--block"
    if not set(BLOCK_METRICS) & set(metrics):
        raise UsageError(f"{option} measures lambda_max and the trace of each block, and --metrics asks for neither; "
                         f"add lambda_max or trace to --metrics.")
    if args.per_layer:
        return "modules"
    blocks: dict[str, list[str]] = {}
    for value in args.block:
        name, equals, selection = value.partition("=")
        names = [part.strip() for part in selection.split(",") if part.strip()]
        if not equals or not name.strip() or not names:
            raise UsageError(f"--block expects NAME=SEL[,SEL...] (parameter or module names), got {value!r}; e.g. "
                             "--block hidden=0 or --block out=2.weight,2.bias.")
        if name.strip() in blocks:
            raise UsageError(f"--block names the block {name.strip()!r} twice; give each block one --block.")
        blocks[name.strip()] = names
    return blocks
