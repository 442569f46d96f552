"""Sharpness inside a training loop: :class:`SharpnessMonitor`, warm-started from one measurement to the next."""

from __future__ import annotations

import itertools
import math
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
from .linalg.subspace import principal_angles, subspace_overlap
from .linalg.trace import trace
from .operators.curvature import CurvatureOperator
from .operators.registry import operator_class
from .sampling import resolve_generator

__all__ = ["MONITOR_METRICS", "MonitorEntry", "SharpnessMonitor"]

MONITOR_METRICS = ("lambda_max", "lambda_min", "trace", "gradient_overlap", "update_overlap", "rotation",
                   "gradient_curvature")
# The metrics that read the top-k eigenvectors of the "lambda_max" run, and the values each metric writes.
_EIGENSPACE_METRICS = ("gradient_overlap", "update_overlap", "rotation")
_KEYS = {
    "lambda_max": ("lambda_max", "top_eigenvalues", "converged"),
    "lambda_min": ("lambda_min", "converged"),
    "trace": ("trace", "trace_std_error"),
    "gradient_overlap": ("gradient_overlap", "gradient_norm"),
    "update_overlap": ("update_overlap", "update_norm"),
    "rotation": ("rotation", "principal_angles", "eigenspace_overlap"),
    "gradient_curvature": ("gradient_curvature", "gradient_norm"),
}
GRADIENT_SOURCES = ("loss", "grad")


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
        top_eigenvalues: The ``top_k`` largest eigenvalues, descending (``lambda_max`` first), or None when
            ``top_k = 1``.
        gradient_norm: ``‖g‖`` of the gradient the gradient metrics read, or None when none is tracked.
        gradient_overlap: ``‖Qᵀg‖² / ‖g‖²``, the fraction of the gradient's squared norm in the span of the
            ``top_k`` eigenvectors ``Q`` (NaN for a zero gradient), or None when not tracked.
        gradient_curvature: ``gᵀAg / ‖g‖²``, the curvature along the gradient (NaN for a zero gradient), or None.
        update_norm: ``‖Δθ‖``, the parameters' change since the previous measurement, or None (not tracked, or
            the first measurement).
        update_overlap: ``‖QᵀΔθ‖² / ‖Δθ‖²`` (NaN when the parameters did not move), or None (not tracked, or the
            first measurement).
        rotation: The largest principal angle (radians) between the previous and the current top-``k``
            eigenspace, or None (not tracked, or the first measurement).
        principal_angles: All ``top_k`` principal angles between them, ascending (radians), or None.
        eigenspace_overlap: ``‖Q_prevᵀ Q‖_F² / k``, the mean squared cosine of those angles (1: the same
            eigenspace), or None.
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
    top_eigenvalues: tuple[float, ...] | None = None
    gradient_norm: float | None = None
    gradient_overlap: float | None = None
    gradient_curvature: float | None = None
    update_norm: float | None = None
    update_overlap: float | None = None
    rotation: float | None = None
    principal_angles: tuple[float, ...] | None = None
    eigenspace_overlap: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def _measured(self) -> list[str]:
        """The keys of the measured values, in the order the monitor always wrote them."""
        keys = ["step", "residuals"]
        for metric in self.metrics:
            for key in _KEYS[metric]:
                if key not in keys and (key != "top_eigenvalues" or self.top_eigenvalues is not None):
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
      ``benchmarks/monitor.py``). With ``top_k = k > 1`` the ``"lambda_max"`` run computes the ``k`` largest
      eigenpairs (``top_eigenvalues``), each to ``tol``; :func:`~curvature.eigenvalues` takes one start vector
      (a single-vector Krylov method), so the warm start is the sum of the previous ``k`` eigenvectors, whose
      Krylov space holds all of them.
    - ``"trace"``: Hutchinson's estimate with ``num_matvecs`` probes.

    and the geometry of the top-``k`` eigenspace ``Q`` (the ``k`` eigenvectors of the ``"lambda_max"`` run,
    which these metrics need in ``metrics``) with the gradient ``g`` and the training's update (Gur-Ari, Roberts
    & Dyer 2018, "Gradient Descent Happens in a Tiny Subspace", arXiv:1812.04754, with ``k`` the number of
    classes; :func:`curvature.subspace_overlap`):

    - ``"gradient_overlap"``: :math:`\|Q^\top g\|^2 / \|g\|^2 \in [0, 1]` (their Eq. 2; a random direction has
      ``k / P``). No product: ``g`` costs one gradient pass over ``data`` (none for the Hessian of one batch,
      whose kept graph holds it), or nothing with ``gradient="grad"``.
    - ``"update_overlap"``: the same for the update :math:`\Delta\theta`, the change of the selected parameters
      since the previous measurement (the last step's update with ``every=1``, the sum of ``every`` updates
      otherwise), projected on the current ``Q``. No product, but the monitor keeps a copy of the parameters
      (memory ``P``), so it is opt-in. None at the first measurement.
    - ``"rotation"``: how far ``Q`` turned since the previous measurement: the principal angles
      :math:`\theta_i = \arccos \sigma_i(Q_\text{prev}^\top Q)` (:func:`curvature.principal_angles`;
      ``rotation`` is the largest, ``eigenspace_overlap`` :math:`= \frac1k \sum_i \cos^2\theta_i`). No product:
      the previous vectors are kept anyway, for the warm start. None at the first measurement.
    - ``"gradient_curvature"``: :math:`g^\top A g / \|g\|^2`, the curvature along the gradient, between
      ``lambda_min`` and ``lambda_max``. **One product per measurement**, the only product beyond Lanczos's: the
      Krylov space holds ``g`` only when Lanczos starts from it (its first coefficient would then be this value),
      which would give up the warm start, worth far more than one product.

    The gradient is that of ``loss_fn`` over ``data`` at the current parameters (``gradient="loss"``,
    :meth:`curvature.CurvatureOperator.gradient`: the curvature and the gradient of the same
    function, at the same point), or the parameters' ``.grad`` as the training left it (``gradient="grad"``: a
    mini-batch gradient, at the parameters before the optimizer's step if :meth:`step` is called after it).

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
        metrics: Any of ``"lambda_max"``, ``"lambda_min"``, ``"trace"``, ``"gradient_overlap"``,
            ``"update_overlap"``, ``"rotation"`` (these three with ``"lambda_max"``) and ``"gradient_curvature"``.
        operator: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"``, ``"kfac"`` or ``"ekfac"``
            (the K-FAC factors are computed again whenever the parameters have changed).
        tol: The relative error of the eigenvalues, certified by their error bounds. The bound holds for the
            eigenvalue *nearest* the value, not necessarily the largest: when the top two eigenvalues nearly
            cross, as they do at the edge of stability, a loose ``tol`` can stop on the second one. Measured on
            ``examples/edge_of_stability.py`` (``benchmarks/monitor.py``): at ``tol=1e-3`` the largest deviation
            from λ_max over 100 measurements was 9.6e-3 (a stop on λ₂); at the default ``1e-4``, 8.6e-7.
        num_matvecs: Probes of the trace.
        warm_start: Start Lanczos from the previous eigenvector(s) (set False to recompute from scratch).
        eval_mode: Measure with every module in eval mode (restored afterwards).
        generator: The source of random start vectors and probes.
        top_k: The number ``k`` of largest eigenpairs the ``"lambda_max"`` run computes: the dimension of the
            eigenspace the overlaps and the rotation measure (Gur-Ari et al.: the number of classes).
        gradient: ``"loss"`` (the gradient of ``loss_fn`` over ``data``) or ``"grad"`` (the selected parameters'
            ``.grad``; a missing one counts as zero, and none at all is an error).
        **operator_kwargs: Passed to the operator (``params=``, ``reduction=``, ...).

    Raises:
        ValueError: On an unknown metric, operator or gradient source, an eigenspace metric or ``top_k > 1``
            without ``"lambda_max"``, ``top_k`` above the number of parameters, ``every`` below 1, or a
            non-positive ``tol``, and whatever the operator refuses at construction (data, ``params``, a
            non-finite loss, the model's mode). At a measurement with ``gradient="grad"``: no ``.grad`` at all.
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

        The top-2 eigenspace, and how much of the gradient lies in it:

        >>> monitor = SharpnessMonitor(model, nn.MSELoss(), (x, y), metrics=("lambda_max", "gradient_overlap",
        ...                            "rotation"), top_k=2, generator=torch.Generator().manual_seed(0))
        >>> first, second = monitor.measure(), monitor.measure()
        >>> len(first.top_eigenvalues), 0.0 <= first.gradient_overlap <= 1.0, first.rotation is None
        (2, True, True)
        >>> second.rotation < 1e-2  # the parameters did not move: the same eigenspace
        True
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
        top_k: int = 1,
        gradient: str = "loss",
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
        self.top_k = check_count(top_k, "top_k")
        needs_top = [m for m in self.metrics if m in _EIGENSPACE_METRICS] + (["top_k > 1"] if self.top_k > 1 else [])
        if needs_top and "lambda_max" not in self.metrics:
            raise ValueError(
                f"{', '.join(needs_top)} use the top-k eigenvectors of the 'lambda_max' run: add 'lambda_max' to "
                f"metrics, e.g. metrics=('lambda_max', {', '.join(repr(m) for m in self.metrics)})."
            )
        if gradient not in GRADIENT_SOURCES:
            raise ValueError(f"gradient must be 'loss' (the gradient of loss_fn over data) or 'grad' (the "
                             f"parameters' .grad), got {gradient!r}.")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.operator, self.operator_kwargs = operator, operator_kwargs
        self.warm_start, self.eval_mode, self.gradient = warm_start, eval_mode, gradient
        self.generator = resolve_generator(generator)
        self.history: list[MonitorEntry] = []
        self.calls = 0
        self.total_matvecs = 0
        self._vectors: dict[str, torch.Tensor] = {}  # the last eigenvectors of each eigenvalue metric, (P, k)
        self._parameters: torch.Tensor | None = None  # a copy at the last measurement, for "update_overlap"
        # Its checks refuse bad data, params or modes before any training step; a model with lazy modules not yet
        # initialized (nn.LazyLinear before its first forward pass) is built at the first measurement instead.
        lazy = any(is_lazy(t) for t in itertools.chain(model.parameters(), model.buffers()))
        self._op: CurvatureOperator | None = None if lazy else self._build_operator()

    def _build_operator(self) -> CurvatureOperator:
        """Build the curvature operator, in eval mode with ``eval_mode=True`` (every module's flag restored)."""
        with eval_mode(self.model, enabled=self.eval_mode):
            op = operator_class(self.operator)(self.model, self.loss_fn, self.data, **self.operator_kwargs)
        if self.top_k > op.shape[0]:
            raise ValueError(f"top_k={self.top_k} exceeds the number of parameters measured, {op.shape[0]}.")
        return op

    def _operator(self) -> CurvatureOperator:
        """The operator built at construction, or a new one if the parameters moved to another device or dtype."""
        if self._op is None:
            self._op = self._build_operator()
        first = dict(self._op.model.named_parameters()).get(self._op.param_names[0])  # (unwrapped from DDP)
        if first is None or (first.dtype, first.device) != (self._op.dtype, self._op.device):
            self._op, self._vectors, self._parameters = self._build_operator(), {}, None
        return self._op

    @property
    def top_eigenvectors(self) -> torch.Tensor | None:
        """The ``top_k`` eigenvectors of the last ``"lambda_max"`` measurement, the columns of a ``(P, k)`` copy.

        The basis the overlaps and the rotation read (over the selected parameters, in flat-vector order;
        eigenvalues in ``top_eigenvalues``), to project other vectors on; None before the first measurement.
        """
        vectors = self._vectors.get("lambda_max")
        return None if vectors is None else vectors.clone()

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

        Raises:
            ValueError: With ``gradient="grad"`` and a gradient metric, if no selected parameter has a ``.grad``.
        """
        start = time.perf_counter()
        values: dict[str, Any] = {}
        residuals: dict[str, float] = {}
        converged: dict[str, bool] = {}
        with eval_mode(self.model, enabled=self.eval_mode):
            op = self._operator()
            before = op.num_matvecs
            previous = self._vectors.get("lambda_max")
            for metric in self.metrics:
                if metric == "trace":
                    estimate = trace(op, num_matvecs=self.num_matvecs, generator=self.generator)
                    values["trace"], values["trace_std_error"] = estimate.value, estimate.std_error
                elif metric in ("lambda_max", "lambda_min"):
                    k, which = (self.top_k, "largest") if metric == "lambda_max" else (1, "smallest")
                    last = self._vectors.get(metric) if self.warm_start else None
                    v0 = None if last is None else last.sum(1)  # one start vector holding the k previous ones
                    result = eigenvalues(op, k=k, which=which, tol=self.tol, generator=self.generator, v0=v0)
                    self._vectors[metric] = result.vectors.detach().clone()
                    values[metric] = float(result.values[0])
                    if k > 1:
                        values["top_eigenvalues"] = tuple(result.values.tolist())
                    residuals[metric] = float(result.residuals[0])
                    converged[metric] = bool(result.converged)
            values.update(self._geometry(op, previous))
        op.clear_cache()  # the parameters change before the next measurement: keep no graph alive meanwhile
        num_matvecs = op.num_matvecs - before
        entry = MonitorEntry(step=self.calls, metrics=self.metrics, num_matvecs=num_matvecs,
                             seconds=time.perf_counter() - start, residuals=residuals, converged=converged, **values)
        self.total_matvecs += entry.num_matvecs
        self.history.append(entry)
        return entry

    def _geometry(self, op: CurvatureOperator, previous: torch.Tensor | None) -> dict[str, Any]:
        """The gradient, update and rotation metrics, from the new top-k vectors and the ``previous`` ones."""
        values: dict[str, Any] = {}
        top = self._vectors.get("lambda_max")
        if "gradient_overlap" in self.metrics or "gradient_curvature" in self.metrics:
            g = self._gradient_vector(op)
            values["gradient_norm"] = float(g.double().norm())
            if "gradient_overlap" in self.metrics:
                values["gradient_overlap"] = float(subspace_overlap(g, top))
            if "gradient_curvature" in self.metrics:  # the one product beyond Lanczos's
                g64 = g.double()
                values["gradient_curvature"] = float(g64 @ (op @ g).double() / (g64 @ g64))
        if "update_overlap" in self.metrics:
            current = torch.cat([p.detach().reshape(-1) for p in op.params])  # a copy: memory P
            if self._parameters is not None:
                update = current.to(torch.promote_types(current.dtype, torch.float32)) - self._parameters
                values["update_norm"] = float(update.double().norm())
                values["update_overlap"] = float(subspace_overlap(update, top))
            self._parameters = current.to(torch.promote_types(current.dtype, torch.float32))
        if "rotation" in self.metrics and previous is not None:
            angles = principal_angles(previous, top)
            values["rotation"] = float(angles.max())
            values["principal_angles"] = tuple(angles.tolist())
            values["eigenspace_overlap"] = float(angles.cos().pow(2).mean())
        return values

    def _gradient_vector(self, op: CurvatureOperator) -> torch.Tensor:
        """The gradient the metrics read: of the loss over ``data`` (``gradient="loss"``), or the ``.grad`` left."""
        if self.gradient == "loss":
            return op.gradient()
        grads = [p.grad for p in op.params]
        if all(g is None for g in grads):
            raise ValueError(
                "gradient='grad' reads the parameters' .grad, but none of the measured parameters has one: call "
                "monitor.step() after loss.backward() and before optimizer.zero_grad(), or use gradient='loss' "
                "(the gradient of loss_fn over the monitor's data)."
            )
        return torch.cat([(torch.zeros_like(p) if g is None else g.detach().to_dense() if g.is_sparse else g.detach())
                          .reshape(-1) for p, g in zip(op.params, grads)])

    def to_dict(self) -> dict[str, Any]:
        """The settings and the history as plain Python values (JSON-serializable)."""
        return {
            "metrics": list(self.metrics), "operator": self.operator, "every": self.every, "tol": self.tol,
            "warm_start": self.warm_start, "top_k": self.top_k, "gradient": self.gradient,
            "total_matvecs": self.total_matvecs,
            "history": [{key: list(value) if isinstance(value, tuple) else value for key, value in entry.items()}
                        for entry in self.history],
        }

    def plot(self, path: str | Path, lines: dict[str, float] | None = None, title: str | None = None) -> Path:
        """Plot the tracked metrics against the training step and save the figure (needs matplotlib).

        Eigenvalues, the trace and ``gradient_curvature`` share the upper panel; the overlaps (of the gradient,
        of the update, and ``eigenspace_overlap`` for the rotation), which lie in ``[0, 1]``, a lower one.

        Args:
            path: The output file (``.png``).
            lines: Horizontal reference lines of the upper panel, label to value (e.g. ``{"2/η": 10.0}``).
            title: The figure title.

        Returns:
            The path written.
        """
        from .plot import plot_history

        def series(key: str) -> list[float]:
            return [math.nan if entry[key] is None else entry[key] for entry in self.history]

        upper = {m: series(m) for m in self.metrics if m in ("lambda_max", "lambda_min", "trace", "gradient_curvature")}
        lower = {m: series(m) for m in self.metrics if m in ("gradient_overlap", "update_overlap")}
        if "rotation" in self.metrics:
            lower["eigenspace_overlap"] = series("eigenspace_overlap")
        return plot_history([entry["step"] for entry in self.history], upper, path, lines=lines, title=title,
                            lower=lower or None, lower_label="overlap (fraction of squared norm)")
