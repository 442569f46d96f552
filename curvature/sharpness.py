"""One call from a model to a sharpness report: λ_max, top-k eigenvalues, trace, Frobenius norm, density."""

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
from .linalg.density import SpectralDensity, spectral_density
from .linalg.eigen import eigenvalues
from .linalg.trace import MIN_MATVECS, TRACE_METHODS, Estimate, frobenius_norm, trace
from .monitor import MONITOR_METRICS, MonitorEntry, SharpnessMonitor  # noqa: F401 (their old home)
from .operators.base import LinearOperator
from .operators.curvature import CurvatureOperator
from .operators.registry import APPROXIMATE_OPERATORS, OPERATORS, operator_class  # noqa: F401 (OPERATORS: read here by the command)
from .sampling import resolve_generator

__all__ = ["METRICS", "MONITOR_METRICS", "MonitorEntry", "SharpnessMonitor", "SharpnessReport", "sharpness"]

METRICS = ("lambda_max", "top_k", "lambda_min", "trace", "frobenius_norm", "density")


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
        num_matvecs: Products spent per metric (``"total"`` too).
        seconds: Wall time per metric (``"total"`` too).
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

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain Python values (JSON-serializable; the density as nodes and weights)."""
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
                out[name] = {"value": est.value, "std_error": est.std_error, "num_matvecs": est.num_matvecs}
        if self.density is not None:
            out["density"] = {
                "nodes": self.density.nodes.tolist(),
                "weights": self.density.weights.tolist(),
                "probe": self.density.probe.tolist(),
                "num_probes": self.density.num_probes,
            }
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
        rows.append(("total", "", *cost("total")))
        header = ("metric", "value", "products", "seconds")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = [f"Sharpness report: {self.operator}, P = {self.num_params}"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


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
        **operator_kwargs: Passed to the operator (``mc_samples=`` for the Fisher, ``reduction=``, ...).

    Returns:
        A :class:`SharpnessReport`; ``print(report)`` shows a table, ``report.to_dict()`` the values.

    Raises:
        ValueError: On an unknown metric, operator or trace method, or a count out of range (checked
            before any product).

    Example:
        >>> model = nn.Linear(3, 2).double()
        >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        >>> report = sharpness(model, nn.CrossEntropyLoss(), data, metrics=("lambda_max",), quiet=True)
        >>> report.lambda_max > 0
        True
    """
    metrics = _checked_metrics(metrics, operator, trace_method, tol, k, num_matvecs, density_probes, density_steps)
    generator = resolve_generator(generator)
    op = _build_operator(model, loss_fn, data, operator, params, generator, operator_kwargs)
    if op.process_group is not None and torch.distributed.get_rank(op.process_group) != 0:
        quiet = True  # one progress bar for a job over several processes: rank 0's
    stages = _stages(metrics, k, tol, trace_method, num_matvecs, density_probes, density_steps, generator)
    return _run_stages(op, operator, stages, quiet)


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


def _run_stages(op: CurvatureOperator, operator: str, stages: dict[str, Callable[[LinearOperator], _Measured]],
                quiet: bool) -> SharpnessReport:
    """Run the stages on ``op`` behind one progress bar, counting each stage's products and seconds."""
    from tqdm.auto import tqdm

    values: dict[str, Any] = {}
    residuals: dict[str, list[float]] = {}
    converged: dict[str, bool] = {}
    num_products: dict[str, int] = {}
    seconds: dict[str, float] = {}
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
    num_products["total"] = tracked.num_matvecs
    seconds["total"] = time.perf_counter() - start_all
    return SharpnessReport(
        operator=operator, num_params=op.shape[0], residuals=residuals, converged=converged, num_matvecs=num_products,
        seconds=seconds, **{name: value for name, value in values.items() if value is not None},
    )
