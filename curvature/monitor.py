"""Sharpness inside a training loop: :class:`SharpnessMonitor`, warm-started from one measurement to the next."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ._checks import check_count, check_scalar
from ._modes import eval_mode
from .linalg.eigen import eigenvalues
from .linalg.trace import trace
from .operators.curvature import CurvatureOperator
from .operators.registry import operator_class
from .sampling import resolve_generator

__all__ = ["MONITOR_METRICS", "MonitorEntry", "SharpnessMonitor"]

MONITOR_METRICS = ("lambda_max", "lambda_min", "trace")


@dataclass(frozen=True, eq=False)
class MonitorEntry(Mapping[str, Any]):
    """One measurement of :class:`~curvature.SharpnessMonitor`: an entry of its ``history``.

    Read it by attribute (``entry.lambda_max``) or as a read-only mapping of the values it holds, as the dict it
    replaces was read (``entry["lambda_max"]``, ``dict(entry)``; two entries compare as mappings). The keys are
    ``step``, ``residuals``, each measured metric in the monitor's order (``trace`` followed by
    ``trace_std_error``; ``converged`` after the first eigenvalue), ``num_matvecs`` and ``seconds``, then the
    values attached with ``entry[key] = value`` (``entry["loss"] = loss.item()`` in a training loop); the measured
    values themselves cannot be replaced.

    Attributes:
        step: The monitor's call count when it measured (1 at the first call).
        metrics: The metrics measured, in the monitor's order.
        num_matvecs: Products spent on this measurement.
        seconds: Wall time of this measurement.
        residuals: The residual norm of each eigenvalue, by metric (empty when only ``"trace"`` is tracked).
        converged: Whether each eigenvalue met ``tol``, by metric (empty when only ``"trace"`` is tracked).
        lambda_max: The largest eigenvalue, or None when not tracked.
        lambda_min: The smallest eigenvalue, or None when not tracked.
        trace: Hutchinson's trace estimate, or None when not tracked.
        trace_std_error: The standard error of ``trace``, or None when not tracked.
        notes: The values attached with ``entry[key] = value``, by key.
    """

    step: int
    metrics: tuple[str, ...]
    num_matvecs: int
    seconds: float
    residuals: dict[str, float] = field(default_factory=dict)
    converged: dict[str, bool] = field(default_factory=dict)
    lambda_max: float | None = None
    lambda_min: float | None = None
    trace: float | None = None
    trace_std_error: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def _measured(self) -> list[str]:
        """The keys of the measured values, in the order the monitor always wrote them."""
        keys = ["step", "residuals"]
        for metric in self.metrics:
            for key in ("trace", "trace_std_error") if metric == "trace" else (metric, "converged"):
                if key not in keys:
                    keys.append(key)
        return keys + ["num_matvecs", "seconds"]

    def __getitem__(self, key: str) -> Any:
        if key in self._measured():
            return getattr(self, key)
        return self.notes[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._measured() + list(self.notes))

    def __len__(self) -> int:
        return len(self._measured()) + len(self.notes)

    def __setitem__(self, key: str, value: Any) -> None:
        """Attach a value of your own to the entry (kept in ``notes``, and read back as ``entry[key]``).

        Raises:
            TypeError: If ``key`` names a measured value or a field of the entry: those are read-only.
        """
        if key in {f.name for f in fields(self)}:
            raise TypeError(
                f"entry[{key!r}] is the monitor's and read-only; attach values of your own under another key, "
                "e.g. entry['loss'] = loss.item()."
            )
        self.notes[key] = value


class SharpnessMonitor:
    r"""Track sharpness inside a training loop: call :meth:`step` once per training step.

    Every ``every`` calls (the first call included) it measures the curvature of ``loss_fn`` over ``data``
    at the current parameters:

    - ``"lambda_max"`` / ``"lambda_min"``: the largest / smallest Hessian eigenvalue by Lanczos
      (:func:`curvature.eigenvalues`, relative error ``tol``), **warm-started from the eigenvector of the
      previous measurement**. Between nearby training steps the top eigenvector barely turns, so Lanczos
      converges in a few products instead of the dozens a random start needs (the saving is measured in
      ``benchmarks/monitor.py``).
    - ``"trace"``: Hutchinson's estimate with ``num_matvecs`` probes.

    Each measurement is appended to ``history`` as a :class:`~curvature.monitor.MonitorEntry` (step, values,
    residuals, products, seconds; read by attribute or as a mapping). The model, its ``.grad``, buffers and
    train/eval mode are left as they were, and the global random stream is never
    touched: random start vectors and probes come from ``generator`` (None: a private copy of the global
    generator, taken once at construction). A model whose forward pass is random or changes buffers in train
    mode (dropout, batch norm) is refused by the operator; pass ``eval_mode=True`` to measure it in eval mode
    (every module's flag is restored afterwards).

    The curvature operator is built once, at construction (in eval mode with ``eval_mode=True``), so that its
    checks run before any training step: data that is a one-shot iterator (a generator) or makes the loss NaN
    or Inf on its first batch, a ``params=`` naming no parameter of the model, a model refused in its mode, a
    loss that does not reduce the batch. The model is left unchanged by them. Every measurement reuses the
    operator, which follows the parameters as training updates them (it is rebuilt if they move to another
    device or dtype).

    Measuring λ_max during training is how progressive sharpening and the edge of stability are seen: with
    full-batch gradient descent at step size η, λ_max rises until it reaches 2/η and hovers there (Cohen,
    Kaur, Li, Kolter & Talwalkar 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", ICLR, arXiv:2103.00065; ``examples/edge_of_stability.py``).

    Args:
        model: The model being trained.
        loss_fn: ``loss_fn(outputs, targets)``.
        data: One ``(inputs, targets)`` batch or an iterable of them (a fixed measurement set).
        every: Measure on calls ``1, every + 1, 2 every + 1, ...``.
        metrics: Any of ``"lambda_max"``, ``"lambda_min"``, ``"trace"``.
        operator: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, ``"kfac"`` or ``"ekfac"``
            (the K-FAC factors are computed again whenever the parameters have changed).
        tol: The relative error of the eigenvalues, certified by their error bounds. The bound holds for the
            eigenvalue *nearest* the value, not necessarily the largest: when the top two eigenvalues nearly
            cross, as they do at the edge of stability, a loose ``tol`` can stop on the second one. Measured on
            ``examples/edge_of_stability.py`` (``benchmarks/monitor.py``): at ``tol=1e-3`` the largest deviation
            from λ_max over 100 measurements was 9.6e-3 (a stop on λ₂); at the default ``1e-4``, 8.6e-7.
        num_matvecs: Probes of the trace.
        warm_start: Start Lanczos from the previous eigenvector (set False to recompute from scratch).
        eval_mode: Measure with every module in eval mode (restored afterwards).
        generator: The source of random start vectors and probes.
        **operator_kwargs: Passed to the operator (``params=``, ``reduction=``, ...).

    Raises:
        ValueError: On an unknown metric or operator, ``every`` below 1, or a non-positive ``tol``, and whatever
            the operator refuses at construction (data, ``params``, a non-finite loss, the model's mode).
        TypeError: On a flag that is not a bool, and data or arguments of the wrong type for the operator.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 2)
        >>> monitor = SharpnessMonitor(model, nn.MSELoss(), (x, y), every=5)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> for step in range(10):
        ...     optimizer.zero_grad()
        ...     nn.functional.mse_loss(model(x), y).backward()
        ...     optimizer.step()
        ...     record = monitor.step()
        >>> [entry["step"] for entry in monitor.history]
        [1, 6]
        >>> monitor.history[-1].step, monitor.history[-1].lambda_max > 0
        (6, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        every: int = 1,
        metrics: Iterable[str] = ("lambda_max",),
        *,
        operator: str = "hessian",
        tol: float = 1e-4,
        num_matvecs: int = 100,
        warm_start: bool = True,
        eval_mode: bool = False,
        generator: torch.Generator | None = None,
        **operator_kwargs: Any,
    ) -> None:
        self.metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        if not self.metrics or any(m not in MONITOR_METRICS for m in self.metrics):
            raise ValueError(f"metrics must be a non-empty selection of {MONITOR_METRICS}, got {self.metrics!r}.")
        operator_class(operator)  # a clear error for an unknown name, before any work
        self.every = check_count(every, "every")
        self.tol = check_scalar(tol, "tol")
        if self.tol <= 0:
            raise ValueError(f"tol must be positive, got {tol}.")
        self.num_matvecs = check_count(num_matvecs, "num_matvecs", minimum=2)
        for flag, value in (("warm_start", warm_start), ("eval_mode", eval_mode)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}.")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.operator, self.operator_kwargs = operator, operator_kwargs
        self.warm_start, self.eval_mode = warm_start, eval_mode
        self.generator = resolve_generator(generator)
        self.history: list[MonitorEntry] = []
        self.calls = 0
        self.total_matvecs = 0
        self._vectors: dict[str, torch.Tensor] = {}
        # Its checks refuse bad data, params or modes before any training step; a model with lazy modules not yet
        # initialized (nn.LazyLinear before its first forward pass) is built at the first measurement instead.
        lazy = any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers()))
        self._op: CurvatureOperator | None = None if lazy else self._build_operator()

    def _build_operator(self) -> CurvatureOperator:
        """Build the curvature operator, in eval mode with ``eval_mode=True`` (every module's flag restored)."""
        with eval_mode(self.model, enabled=self.eval_mode):
            return operator_class(self.operator)(self.model, self.loss_fn, self.data, **self.operator_kwargs)

    def _operator(self) -> CurvatureOperator:
        """The operator built at construction, or a new one if the parameters moved to another device or dtype."""
        if self._op is None:
            self._op = self._build_operator()
        first = dict(self._op.model.named_parameters()).get(self._op.param_names[0])  # (unwrapped from DDP)
        if first is None or (first.dtype, first.device) != (self._op.dtype, self._op.device):
            self._op, self._vectors = self._build_operator(), {}
        return self._op

    def step(self) -> MonitorEntry | None:
        """Count one training step; measure when it is due.

        Returns:
            The new ``history`` entry when a measurement was taken, else None.
        """
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        return self.measure()

    def measure(self) -> MonitorEntry:
        """Measure now (whatever the step count) and append the result to ``history``.

        Returns:
            The entry: ``step``, each metric's value, ``residuals``, ``num_matvecs`` and ``seconds``.
        """
        start = time.perf_counter()
        values: dict[str, float] = {}
        residuals: dict[str, float] = {}
        converged: dict[str, bool] = {}
        with eval_mode(self.model, enabled=self.eval_mode):
            op = self._operator()
            before = op.num_matvecs
            for metric in self.metrics:
                if metric == "trace":
                    estimate = trace(op, num_matvecs=self.num_matvecs, generator=self.generator)
                    values["trace"], values["trace_std_error"] = estimate.value, estimate.std_error
                    continue
                which = "largest" if metric == "lambda_max" else "smallest"
                v0 = self._vectors.get(metric) if self.warm_start else None
                result = eigenvalues(op, k=1, which=which, tol=self.tol, generator=self.generator, v0=v0)
                self._vectors[metric] = result.vectors[:, 0].detach().clone()
                values[metric] = float(result.values[0])
                residuals[metric] = float(result.residuals[0])
                converged[metric] = bool(result.converged)
        op.clear_cache()  # the parameters change before the next measurement: keep no graph alive meanwhile
        num_matvecs = op.num_matvecs - before
        entry = MonitorEntry(step=self.calls, metrics=self.metrics, num_matvecs=num_matvecs,
                             seconds=time.perf_counter() - start, residuals=residuals, converged=converged, **values)
        self.total_matvecs += entry.num_matvecs
        self.history.append(entry)
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The settings and the history as plain Python values (JSON-serializable)."""
        return {
            "metrics": list(self.metrics), "operator": self.operator, "every": self.every, "tol": self.tol,
            "warm_start": self.warm_start, "total_matvecs": self.total_matvecs,
            "history": [dict(entry) for entry in self.history],
        }

    def plot(self, path: str | Path, lines: dict[str, float] | None = None, title: str | None = None) -> Path:
        """Plot the tracked metrics against the training step and save the figure (needs matplotlib).

        Args:
            path: The output file (``.png``).
            lines: Horizontal reference lines, label to value (e.g. ``{"2/η": 10.0}``).
            title: The figure title.

        Returns:
            The path written.
        """
        from .plot import plot_history

        series = {m: [entry[m] for entry in self.history] for m in self.metrics}
        return plot_history([entry["step"] for entry in self.history], series, path, lines=lines, title=title)
