"""One call from a model to a sharpness report: λ_max, top-k eigenvalues, trace, Frobenius norm, density.

Optionally, λ_max and the trace of each block of parameters (layer by layer), one
:class:`~curvature.sharpness.BlockSharpness` per block.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ._checks import check_count, check_scalar
from .blocks import parameter_blocks, resolve_blocks
from .linalg.density import SpectralDensity, spectral_density
from .linalg.eigen import eigenvalues
from .linalg.trace import MIN_MATVECS, TRACE_METHODS, Estimate, frobenius_norm, trace
from .monitor import MONITOR_METRICS, MonitorEntry, SharpnessMonitor  # noqa: F401 (their old home)
from .operators.base import LinearOperator
from .operators.curvature import CurvatureOperator
from .operators.registry import APPROXIMATE_OPERATORS, OPERATORS, operator_class  # noqa: F401 (OPERATORS: read here by the command)
from .sampling import resolve_generator

__all__ = [
    "METRICS",
    "MONITOR_METRICS",
    "BlockSharpness",
    "MonitorEntry",
    "SharpnessMonitor",
    "SharpnessReport",
    "parameter_blocks",
    "sharpness",
]

METRICS = ("lambda_max", "top_k", "lambda_min", "trace", "frobenius_norm", "density")


def _estimate_dict(est: Estimate) -> dict[str, Any]:
    return {"value": est.value, "std_error": est.std_error, "num_matvecs": est.num_matvecs}


@dataclass(frozen=True)
class BlockSharpness:
    r"""λ_max and the trace of the curvature restricted to one block of parameters: a row of the per-block table.

    For the parameters ``b`` of the block, the restricted curvature is the diagonal block :math:`H_{bb}` of the
    full operator ``H`` (the curvature of the loss as a function of those parameters alone, the others held
    fixed), built by the same operator class with ``params=`` the block. The traces of blocks that partition
    the parameters add up to the full trace, :math:`\operatorname{tr} H = \sum_b \operatorname{tr} H_{bb}`;
    by Cauchy's interlacing theorem every block's λ_max lies between the full operator's λ_min and λ_max.

    Attributes:
        name: The block's name: a module's path (``"features.0"``), a parameter's name, or a key of
            ``blocks=``.
        params: The names of its parameters, in the model's order.
        num_params: Its size ``P_b``.
        lambda_max: The largest eigenvalue of :math:`H_{bb}`, or None when not asked for.
        residual: The residual norm of its eigenpair, or None.
        converged: Whether λ_max met ``tol`` within the budget, or None.
        trace: :math:`\operatorname{tr} H_{bb}` with its standard error (0 when exact), or None.
        num_matvecs: Products spent on the block (with its own, smaller operator).
        seconds: Wall time spent on the block.
    """

    name: str
    params: tuple[str, ...]
    num_params: int
    lambda_max: float | None = None
    residual: float | None = None
    converged: bool | None = None
    trace: Estimate | None = None
    num_matvecs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the row as plain Python values (JSON-serializable); the metrics not measured are left out."""
        out: dict[str, Any] = {"name": self.name, "params": list(self.params), "num_params": self.num_params}
        if self.lambda_max is not None:
            out.update(lambda_max=self.lambda_max, residual=self.residual, converged=self.converged)
        if self.trace is not None:
            out["trace"] = _estimate_dict(self.trace)
        out.update(num_matvecs=self.num_matvecs, seconds=self.seconds)
        return out


@dataclass(frozen=True)
class SharpnessReport:
    """The result of :func:`sharpness`.

    Attributes:
        operator: Which curvature: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, or the
            Kronecker-factored ``"kfac"`` or ``"ekfac"``.
        num_params: The number of parameters ``P`` the curvature is taken over.
        lambda_max: The largest eigenvalue, or None when not asked for.
        top_k: The ``k`` largest eigenvalues (descending, float64), or None.
        lambda_min: The smallest eigenvalue (negative for a saddle), or None.
        trace: The trace estimate with its standard error, or None.
        frobenius_norm: The Frobenius-norm estimate with its standard error, or None.
        density: The SLQ spectral density, or None.
        residuals: Residual norms of the eigenpairs, keyed ``"top_k"`` (or ``"lambda_max"`` when only that
            was asked for) and ``"lambda_min"``.
        converged: Whether each eigenvalue computation met ``tol`` within its budget, keyed like
            ``residuals``.
        num_matvecs: Products spent per metric (``"blocks"`` for the per-block table, and ``"total"``).
        seconds: Wall time per metric (``"blocks"`` and ``"total"`` too).
        blocks: The per-block table (``blocks=`` of :func:`sharpness`): one
            :class:`~curvature.sharpness.BlockSharpness` per block, in order; empty when not asked for.
    """

    operator: str
    num_params: int
    lambda_max: float | None = None
    top_k: torch.Tensor | None = None
    lambda_min: float | None = None
    trace: Estimate | None = None
    frobenius_norm: Estimate | None = None
    density: SpectralDensity | None = None
    residuals: dict[str, list[float]] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    num_matvecs: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    blocks: tuple[BlockSharpness, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain Python values (JSON-serializable; the density as nodes and weights).

        The per-block table, when measured, is a list of :meth:`~curvature.sharpness.BlockSharpness.to_dict`
        under ``"blocks"``.
        """
        out: dict[str, Any] = {"operator": self.operator, "num_params": self.num_params}
        if self.lambda_max is not None:
            out["lambda_max"] = self.lambda_max
        if self.top_k is not None:
            out["top_k"] = self.top_k.tolist()
        if self.lambda_min is not None:
            out["lambda_min"] = self.lambda_min
        for name in ("trace", "frobenius_norm"):
            est = getattr(self, name)
            if est is not None:
                out[name] = _estimate_dict(est)
        if self.density is not None:
            out["density"] = {
                "nodes": self.density.nodes.tolist(),
                "weights": self.density.weights.tolist(),
                "probe": self.density.probe.tolist(),
                "num_probes": self.density.num_probes,
            }
        if self.blocks:
            out["blocks"] = [block.to_dict() for block in self.blocks]
        out["residuals"] = dict(self.residuals)
        out["converged"] = dict(self.converged)
        out["num_matvecs"] = dict(self.num_matvecs)
        out["seconds"] = dict(self.seconds)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """Return the report as JSON text, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        rows: list[tuple[str, str, str, str]] = []

        def cost(name: str) -> tuple[str, str]:
            return str(self.num_matvecs.get(name, "")), f"{self.seconds.get(name, math.nan):.2f}"

        def flag(key: str) -> str:
            return "" if self.converged.get(key, True) else " (not converged)"

        top_key = "top_k" if self.top_k is not None else "lambda_max"
        if self.lambda_max is not None:
            rows.append(("lambda_max", f"{self.lambda_max:.6g}{flag(top_key)}", *cost("eigenvalues")))
        if self.top_k is not None:
            values = ", ".join(f"{v:.4g}" for v in self.top_k.tolist())
            rows.append((f"top_{self.top_k.numel()}", values + flag(top_key), *cost("eigenvalues")))
        if self.lambda_min is not None:
            rows.append(("lambda_min", f"{self.lambda_min:.6g}{flag('lambda_min')}", *cost("lambda_min")))
        for name in ("trace", "frobenius_norm"):
            est = getattr(self, name)
            if est is not None:
                rows.append((name, f"{est.value:.6g} ± {est.std_error:.2g}", *cost(name)))
        if self.density is not None:
            d = self.density
            rows.append(("density", f"{d.num_probes} probes, {d.nodes.numel()} nodes in "
                         f"[{float(d.nodes.min()):.4g}, {float(d.nodes.max()):.4g}]", *cost("density")))
        if self.blocks:
            rows.append(("blocks", f"{len(self.blocks)} blocks (table below)", *cost("blocks")))
        rows.append(("total", "", *cost("total")))
        lines = [f"Sharpness report: {self.operator}, P = {self.num_params}",
                 *_table(("metric", "value", "products", "seconds"), rows)]
        if self.blocks:
            title = operator_class(self.operator).title
            lines += ["", f"Per block: the {title} in each block's parameters alone (its diagonal block)",
                      *_table(("block", "params", "lambda_max", "trace", "products", "seconds"), self._block_rows())]
        return "\n".join(lines)

    def _block_rows(self) -> list[tuple[str, ...]]:
        """The rows of the per-block table, and its total."""
        rows = []
        for block in self.blocks:
            lam = "" if block.lambda_max is None else f"{block.lambda_max:.6g}" + (
                "" if block.converged else " (not converged)")
            tr = "" if block.trace is None else f"{block.trace.value:.6g} ± {block.trace.std_error:.2g}"
            rows.append((block.name, str(block.num_params), lam, tr, str(block.num_matvecs), f"{block.seconds:.2f}"))
        rows.append(("total", str(sum(b.num_params for b in self.blocks)), "", "",
                     str(sum(b.num_matvecs for b in self.blocks)), f"{sum(b.seconds for b in self.blocks):.2f}"))
        return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a plain-text table: the header, a rule, and the rows, each column as wide as its widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


class _Progress(LinearOperator):
    """Forward products to ``op`` and advance a progress bar by the number of columns."""

    def __init__(self, op: LinearOperator, bar: Any, counter: LinearOperator | None = None) -> None:
        super().__init__(op.shape[0], op.dtype, op.device, is_symmetric=op.is_symmetric, is_psd=op.is_psd)
        self.op, self.bar, self.counter = op, bar, counter

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op.matmat(V)
        self.bar.update(V.shape[1])
        if self.counter is not None:  # a float32 view's products count in the report's totals too
            self.counter.num_matvecs += V.shape[1]
        return out

    def higher_precision(self) -> LinearOperator | None:
        """The float32 view of the operator (half-precision models), its products counted on the same bar."""
        inner = self.op.higher_precision()
        return None if inner is None else _Progress(inner, self.bar, counter=self)


def sharpness(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    metrics: Iterable[str] = ("lambda_max", "trace"),
    *,
    operator: str = "hessian",
    params: Any = None,
    k: int = 5,
    tol: float = 1e-3,
    num_matvecs: int = 100,
    trace_method: str = "hutchinson",
    density_probes: int = 1,
    density_steps: int = 100,
    generator: torch.Generator | None = None,
    quiet: bool = False,
    blocks: Any = None,
    **operator_kwargs: Any,
) -> SharpnessReport:
    """Measure how sharp a model's loss is: build the curvature operator and run the estimators on it.

    Metrics (any subset, in any order):

    - ``"lambda_max"``: the largest eigenvalue, by Lanczos to a relative error ``tol`` (certified by its error bound)
      (:func:`curvature.eigenvalues`);
    - ``"top_k"``: the ``k`` largest eigenvalues (shares the Lanczos run with ``"lambda_max"``);
    - ``"lambda_min"``: the smallest eigenvalue (negative at a saddle);
    - ``"trace"``: :func:`curvature.trace` with ``trace_method`` and ``num_matvecs`` products;
    - ``"frobenius_norm"``: :func:`curvature.frobenius_norm` with ``num_matvecs`` products;
    - ``"density"``: :func:`curvature.spectral_density` with ``density_probes`` probes of ``density_steps``
      Lanczos steps.

    With ``blocks=`` the report adds a per-block table (``SharpnessReport.blocks``, layer by layer): for each
    block ``b`` of parameters, λ_max (when ``"lambda_max"`` or ``"top_k"`` is asked for) and the trace (when
    ``"trace"`` is) of the diagonal block :math:`H_{bb}` of the operator, the curvature of the loss in those
    parameters alone. Each block gets its own operator of the same class on the same data
    (``params=`` the block; a Monte-Carlo Fisher draws the same labels as the full one), so a block costs
    products of its own, counted in the block's row and in ``num_matvecs["blocks"]``. λ_max is computed to
    ``tol`` like the full one; the trace with ``trace_method`` and ``num_matvecs``, except that a block of at
    most ``num_matvecs`` parameters gets its exact trace (``P_b`` products, no more than the estimate would
    spend, and no error). Blocks are checked, and their operators built, before any product.

    The model, its ``.grad``, buffers, train/eval mode and the global RNG are left as they were. A progress
    bar (tqdm) counts products when the work takes longer than two seconds.

    Args:
        model: The model, in eval mode if it has dropout or batch norm.
        loss_fn: The loss, e.g. ``nn.CrossEntropyLoss()``.
        data: One ``(inputs, targets)`` batch or an iterable of them (a DataLoader).
        metrics: The metrics to compute.
        operator: ``"hessian"`` (default), ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, or the
            Kronecker-factored approximations ``"kfac"`` (:class:`~curvature.KFACOperator`) and ``"ekfac"``
            (:class:`~curvature.EKFACOperator`), whose options (``fisher_type=``, ``kfac_approx=``, ...) pass
            through ``operator_kwargs``; their λ_max is the largest eigenvalue of their blocks.
        params: Restrict to some parameters (names or tensors); None takes all trainable ones.
        k: The number of top eigenvalues for ``"top_k"``.
        tol: The relative error of the eigenvalues, certified by their error bounds (:func:`curvature.eigenvalues`).
        num_matvecs: Products for the trace and Frobenius estimates.
        trace_method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"exact"``.
        density_probes: Probes of the spectral density.
        density_steps: Lanczos steps per density probe.
        generator: The source of every random draw (probes, start vectors, and the sampled labels of a
            Monte-Carlo Fisher); None: a copy of torch's global generator, which is left untouched.
        quiet: Hide the progress bar.
        blocks: The per-block table: None or False (none, the default); True or ``"modules"`` for one block per
            module that registers parameters itself, named by its path (``"features.0"``, ``"classifier"``;
            ``"(model)"`` for the model's own); ``"parameters"`` for one block per parameter tensor; or a
            mapping from block names to selections, each a parameter or module name (a module name, with or
            without a trailing dot, takes every parameter under it: ``"encoder"`` or ``"encoder."``), a
            parameter tensor, a submodule, or a list of these, e.g. ``{"encoder": "encoder", "head": ["fc.weight",
            "fc.bias"]}``. Blocks are taken within ``params``; frozen parameters are left out; blocks may
            overlap (see :func:`~curvature.sharpness.parameter_blocks`).
        **operator_kwargs: Passed to the operator (``mc_samples=`` for the Fisher, ``reduction=``, ...).

    Returns:
        A :class:`SharpnessReport`; ``print(report)`` shows a table, ``report.to_dict()`` the values.

    Raises:
        ValueError: On an unknown metric, operator or trace method, a count out of range, or a block that
            names nothing, names a frozen or unselected parameter, or asks for a table without
            ``"lambda_max"``, ``"top_k"`` or ``"trace"`` among the metrics (checked before any product).
        TypeError: On ``blocks`` of another type, or a block selection that is neither a name, a tensor nor
            a module.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        >>> report = sharpness(model, nn.CrossEntropyLoss(), data, metrics=("lambda_max",), quiet=True)
        >>> report.lambda_max > 0
        True
        >>> report = sharpness(model, nn.CrossEntropyLoss(), data, blocks=True, trace_method="exact", quiet=True)
        >>> [(b.name, b.num_params) for b in report.blocks]
        [('0', 16), ('2', 10)]
        >>> abs(sum(b.trace.value for b in report.blocks) - report.trace.value) < 1e-12
        True
    """
    metrics = _checked_metrics(metrics, operator, trace_method, tol, k, num_matvecs, density_probes, density_steps)
    measured = _block_metrics(blocks, metrics)
    generator = resolve_generator(generator)
    labels = generator.get_state()  # the Monte-Carlo labels of a sampled operator: its blocks draw the same
    op = _build_operator(model, loss_fn, data, operator, params, generator, operator_kwargs)
    if op.process_group is not None and torch.distributed.get_rank(op.process_group) != 0:
        quiet = True  # one progress bar for a job over several processes: rank 0's
    block_ops = {}
    if measured:
        strip = "module." if op.model is not model else ""  # names of a wrapped (DDP) model's parameters
        for name, names in resolve_blocks(op.model, blocks, op.param_names, strip).items():
            replay = torch.Generator(device=generator.device)
            replay.set_state(labels)
            block_ops[name] = _build_operator(model, loss_fn, data, operator, list(names), replay, operator_kwargs)
    stages = _stages(metrics, k, tol, trace_method, num_matvecs, density_probes, density_steps, generator)
    block_stage = _BlockStage(block_ops, measured, tol, trace_method, num_matvecs, generator)
    return _run_stages(op, operator, stages, quiet, block_stage)


def _wants_blocks(blocks: Any) -> bool:
    """Whether ``blocks`` asks for a table (None and False do not)."""
    return blocks is not None and blocks is not False


def _block_metrics(blocks: Any, metrics: tuple[str, ...]) -> tuple[str, ...]:
    """What the per-block table measures: ``"lambda_max"`` and/or ``"trace"``, after the metrics; () for none.

    Raises:
        ValueError: If a table is asked for with none of ``"lambda_max"``, ``"top_k"``, ``"trace"`` in ``metrics``.
    """
    if not _wants_blocks(blocks):
        return ()
    measured = tuple(name for name, wanted in (("lambda_max", {"lambda_max", "top_k"} & set(metrics)),
                                               ("trace", "trace" in metrics)) if wanted)
    if not measured:
        raise ValueError(f"blocks: the per-block table holds lambda_max and the trace of each block, and metrics "
                         f"{metrics!r} asks for neither; add 'lambda_max' or 'trace' to metrics, or leave out blocks.")
    return measured


def _checked_metrics(metrics: Iterable[str], operator: str, trace_method: str, tol: float, k: int,
                     num_matvecs: int, density_probes: int, density_steps: int) -> tuple[str, ...]:
    """Check :func:`sharpness`'s arguments before any work, in this order, and return the metrics as a tuple.

    Raises:
        ValueError: On an unknown metric, operator or trace method, or a count or ``tol`` out of range.
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {metrics!r}.")
    operator_class(operator)  # a clear error for an unknown name, before any work
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"trace_method must be one of {TRACE_METHODS}, got {trace_method!r}.")
    if check_scalar(tol, "tol") <= 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    check_count(k, "k")
    if "trace" in metrics and trace_method != "exact":
        check_count(num_matvecs, "num_matvecs", minimum=MIN_MATVECS[trace_method])
    if "frobenius_norm" in metrics:
        check_count(num_matvecs, "num_matvecs", minimum=2)
    check_count(density_probes, "density_probes")
    check_count(density_steps, "density_steps")
    return metrics


def _build_operator(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, operator: str, params: Any,
                    generator: torch.Generator, operator_kwargs: dict[str, Any]) -> CurvatureOperator:
    """The operator named ``operator`` from the registry; Monte-Carlo labels are drawn from ``generator``.

    That is the Fisher with ``mc_samples=``, and K-FAC and EK-FAC with ``fisher_type="mc"``.
    """
    sampled = (operator == "fisher" and operator_kwargs.get("mc_samples") is not None) or (
        operator in APPROXIMATE_OPERATORS and operator_kwargs.get("fisher_type") == "mc")
    if sampled:
        operator_kwargs = {"generator": generator, **operator_kwargs}  # the Monte-Carlo labels too
    return operator_class(operator)(model, loss_fn, data, params=params, **operator_kwargs)


@dataclass(frozen=True)
class _Measured:
    """What one stage of :func:`sharpness` measured.

    Attributes:
        values: Report fields to their values (None: computed but not asked for).
        residuals: Residual norms of the eigenpairs, keyed as in :class:`SharpnessReport`.
        converged: Whether each eigenvalue computation met ``tol``, keyed likewise.
    """

    values: dict[str, Any]
    residuals: dict[str, list[float]] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)


def _largest_eigenvalues(op: LinearOperator, metrics: tuple[str, ...], k: int, tol: float,
                         generator: torch.Generator) -> _Measured:
    """λ_max and the top ``k`` from one Lanczos run (``k`` values only when ``"top_k"`` is asked for)."""
    count = k if "top_k" in metrics else 1
    result = eigenvalues(op, k=count, which="largest", tol=tol, generator=generator)
    values = {
        "lambda_max": float(result.values[0]) if "lambda_max" in metrics else None,
        "top_k": result.values if "top_k" in metrics else None,
    }
    key = "top_k" if "top_k" in metrics else "lambda_max"
    return _Measured(values, {key: result.residuals.tolist()}, {key: result.converged})


def _smallest_eigenvalue(op: LinearOperator, tol: float, generator: torch.Generator) -> _Measured:
    """λ_min by Lanczos to a relative error ``tol``."""
    result = eigenvalues(op, k=1, which="smallest", tol=tol, generator=generator)
    return _Measured({"lambda_min": float(result.values[0])}, {"lambda_min": result.residuals.tolist()},
                     {"lambda_min": result.converged})


def _stages(metrics: tuple[str, ...], k: int, tol: float, trace_method: str, num_matvecs: int, density_probes: int,
            density_steps: int, generator: torch.Generator) -> dict[str, Callable[[LinearOperator], _Measured]]:
    """The stages the metrics need, in the order they run, each a function of the (tracked) operator.

    ``"lambda_max"`` and ``"top_k"`` share one stage, ``"eigenvalues"``; every other metric is its own stage.
    """
    every: dict[str, Callable[[LinearOperator], _Measured]] = {
        "eigenvalues": lambda op: _largest_eigenvalues(op, metrics, k, tol, generator),
        "lambda_min": lambda op: _smallest_eigenvalue(op, tol, generator),
        "trace": lambda op: _Measured(
            {"trace": trace(op, method=trace_method, num_matvecs=num_matvecs, generator=generator)}
        ),
        "frobenius_norm": lambda op: _Measured(
            {"frobenius_norm": frobenius_norm(op, num_matvecs=num_matvecs, generator=generator)}
        ),
        "density": lambda op: _Measured(
            {"density": spectral_density(op, num_probes=density_probes, num_steps=density_steps, generator=generator)}
        ),
    }
    wanted = {"eigenvalues": "lambda_max" in metrics or "top_k" in metrics}
    return {stage: run for stage, run in every.items() if wanted.get(stage, stage in metrics)}


@dataclass(frozen=True)
class _BlockStage:
    """The per-block table's work: the blocks' operators and how to measure each.

    Attributes:
        ops: Block names to their operators (``params=`` the block), built before any product.
        measured: ``"lambda_max"`` and/or ``"trace"``.
        tol: The relative error of λ_max.
        trace_method: The trace method of blocks larger than ``num_matvecs``.
        num_matvecs: The trace's products; a block of at most this many parameters gets its exact trace.
        generator: The source of the start vectors and probes.
    """

    ops: dict[str, CurvatureOperator]
    measured: tuple[str, ...]
    tol: float
    trace_method: str
    num_matvecs: int
    generator: torch.Generator

    def measure(self, name: str, op: LinearOperator, params: tuple[str, ...]) -> BlockSharpness:
        """λ_max and the trace of one block's operator ``op`` (tracked), timed and counted."""
        start, before = time.perf_counter(), op.num_matvecs
        values: dict[str, Any] = {}
        if "lambda_max" in self.measured:
            largest = _largest_eigenvalues(op, ("lambda_max",), 1, self.tol, self.generator)
            values.update(lambda_max=largest.values["lambda_max"], residual=largest.residuals["lambda_max"][0],
                          converged=largest.converged["lambda_max"])
        if "trace" in self.measured:
            method = "exact" if op.shape[0] <= self.num_matvecs else self.trace_method
            values["trace"] = trace(op, method=method, num_matvecs=self.num_matvecs, generator=self.generator)
        return BlockSharpness(name=name, params=params, num_params=op.shape[0],
                              num_matvecs=op.num_matvecs - before, seconds=time.perf_counter() - start, **values)


def _run_stages(op: CurvatureOperator, operator: str, stages: dict[str, Callable[[LinearOperator], _Measured]],
                quiet: bool, block_stage: _BlockStage) -> SharpnessReport:
    """Run the stages on ``op``, then the blocks, behind one progress bar, counting each one's products and seconds."""
    from tqdm.auto import tqdm

    values: dict[str, Any] = {}
    residuals: dict[str, list[float]] = {}
    converged: dict[str, bool] = {}
    num_products: dict[str, int] = {}
    seconds: dict[str, float] = {}
    rows: list[BlockSharpness] = []
    start_all = time.perf_counter()
    with tqdm(desc="sharpness", unit="product", delay=2.0, disable=quiet, leave=False) as bar:
        tracked = _Progress(op, bar)
        for stage, measure in stages.items():
            bar.set_postfix_str(stage, refresh=False)
            before, start = tracked.num_matvecs, time.perf_counter()
            measured = measure(tracked)
            values.update(measured.values)
            residuals.update(measured.residuals)
            converged.update(measured.converged)
            num_products[stage] = tracked.num_matvecs - before
            seconds[stage] = time.perf_counter() - start
        if block_stage.ops:
            op.clear_cache()  # the full operator's kept graphs are not needed any more
            start = time.perf_counter()
            for i, (name, block_op) in enumerate(block_stage.ops.items(), 1):
                bar.set_postfix_str(f"block {i}/{len(block_stage.ops)}: {name}", refresh=False)
                rows.append(block_stage.measure(name, _Progress(block_op, bar), tuple(block_op.param_names)))
                block_op.clear_cache()
            num_products["blocks"] = sum(row.num_matvecs for row in rows)
            seconds["blocks"] = time.perf_counter() - start
    num_products["total"] = sum(num_products.values())
    seconds["total"] = time.perf_counter() - start_all
    return SharpnessReport(
        operator=operator, num_params=op.shape[0], residuals=residuals, converged=converged, num_matvecs=num_products,
        seconds=seconds, blocks=tuple(rows), **{name: value for name, value in values.items() if value is not None},
    )
