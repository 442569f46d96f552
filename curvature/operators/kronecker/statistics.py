"""One pass over the data for the Kronecker factors: recorded rows, backpropagated columns, their statistics.

:class:`FactorStatistics` is the part of :class:`~curvature.operators.kronecker.kfac.KFACOperator` that reads the
data: forward hooks record every factored module's input and output, the loss's columns are backpropagated to the
outputs, and each batch becomes sums of outer products (weighted like the batch's share of the loss), all-reduced
over a process group. The functions below are the row arithmetic they share with EK-FAC's fit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..._func import model_outputs
from ..._tree import map_leaves
from ..curvature import require_graph
from ..data import batch_size, split_batch
from ..losses.base import unit_masks
from .layers import Layer

__all__ = ["FactorStatistics", "backward_columns", "gram", "per_sample_gradients", "rows_rebuild", "summed_gradient"]


class FactorStatistics:
    """The factors' statistics over the data: a mixin of :class:`~curvature.operators.kronecker.kfac.KFACOperator`.

    It uses the operator's ``layers``, ``diagonal``, ``fisher_type``, ``kfac_approx``, ``mc_samples``, ``reduction``,
    ``_loss_object``, ``_params``, ``param_names``, ``_shards`` and the batch loop of
    :class:`~curvature.operators.curvature.CurvatureOperator` (``_build_contexts``, ``_context``).
    """

    @contextlib.contextmanager
    def _recorded(self) -> Iterator[None]:
        """Record every factored module's (input, output) during forward passes; the hooks are always removed."""
        records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def hook(index: int) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                if not self._paused:
                    records.setdefault(index, []).append((args[0].detach(), output))
            return record

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        self._recording = records
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._recording = None

    def _statistics(self) -> dict[str, Any]:
        """Sum the factors' statistics over the batches and the ranks of a process group, and normalize them."""
        error: Exception | None = None
        try:
            totals, weight_sum, batches = self._local_statistics()
        except Exception as err:  # in a process group the rank still joins the all-reduce, then raises
            if self._shards is None:
                raise
            error, totals, weight_sum, batches = err, None, 0.0, 0
        if self._shards is not None:
            totals, weight_sum, batches, failed = self._all_reduce(totals, weight_sum, batches, error is not None)
            if error is not None:
                raise error
            if failed:
                raise ValueError("computing the K-FAC statistics failed on another rank of the process group; see "
                                 "the error raised there.")
        self._check_totals(weight_sum, batches, "" if self._shards is None else " on every rank of the process group")
        scale = 1.0 / weight_sum if self.reduction == "mean" else 1.0
        for key, value in totals.items():
            if key not in ("A", "rows"):
                totals[key] = [t * scale for t in value]
        if "A" in totals:
            totals["A"] = [a / max(rows, 1.0) for a, rows in zip(totals["A"], totals["rows"])]
        return totals

    def _local_statistics(self) -> tuple[dict[str, Any] | None, float, int]:
        """This process's statistics: input ones summed, curvature ones weighted by the batch's share of the loss."""
        totals: dict[str, Any] | None = None
        weight_sum, batches = 0.0, 0
        with torch.enable_grad(), self._recorded():
            for stats, weight in self._build_contexts():
                if totals is None:
                    totals = {key: [0.0] * len(value) for key, value in stats.items()}
                for key, value in stats.items():
                    for i, t in enumerate(value):
                        # input statistics are summed, curvature ones weighted like the batch's share of the loss
                        totals[key][i] = totals[key][i] + (t if key in ("A", "rows") else weight * t)
                weight_sum += weight
                batches += 1
        return totals, weight_sum, batches

    def _statistic_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """The shape of every statistic, known without data (for a rank whose shard is empty)."""
        shapes: dict[str, list[tuple[int, ...]]] = {"A": [], "G": []}
        for layer in self.layers:
            groups, rows, cols = layer.sizes()
            if layer.kind == "embedding":
                shapes["A"].append((1, rows))
                shapes["G"].append((1, cols, cols))
            elif layer.kind == "norm":
                shapes["A"].append((1, cols, cols))
                shapes["G"].append((1, layer.width(), layer.width()))
            else:
                shapes["A"].append((groups, cols, cols))
                shapes["G"].append((groups, rows, rows))
        if self.diagonal is not None:
            shapes["D"] = [(sum(self._sizes[i] for i in self.diagonal.indices),)]
        return shapes

    def _all_reduce(self, totals: dict[str, Any] | None, weight_sum: float, batches: int, failed: bool
                    ) -> tuple[dict[str, Any], float, int, bool]:
        """One all-reduce of every statistic, the row counts, the weight sum, the batch count and a failure flag."""
        shapes = self._statistic_shapes()
        keys = sorted(shapes)
        parts = []
        for key in keys:
            for i, shape in enumerate(shapes[key]):
                t = totals[key][i] if totals is not None else None
                parts.append(torch.zeros(shape, dtype=self._factor_dtype, device=self.device).reshape(-1)
                             if not isinstance(t, torch.Tensor) else t.reshape(-1).to(self._factor_dtype))
        rows = totals["rows"] if totals is not None and "rows" in totals else [0.0] * len(self.layers)
        tail = torch.tensor([*rows, weight_sum, batches, float(failed)], dtype=torch.float64)
        flat = torch.cat(parts + [tail.to(self._factor_dtype).to(self.device)])
        dist.all_reduce(flat, group=self.process_group)
        out: dict[str, Any] = {}
        start = 0
        for key in keys:
            out[key] = []
            for shape in shapes[key]:
                size = math.prod(shape)
                out[key].append(flat[start:start + size].view(shape))
                start += size
        tail_values = flat[start:].tolist()
        out["rows"] = tail_values[:len(self.layers)]
        return out, tail_values[-3], int(tail_values[-2]), tail_values[-1] > 0

    # -- one batch ---------------------------------------------------------------------------------------------
    def _context(self, index: int, inputs: Any, targets: Any, leaves: list[torch.Tensor]) -> tuple[Any, float]:
        self._inputs = inputs  # the exact diagonal's per-sample pass and the batch-first check need them
        self._batch_samples = batch_size(inputs)
        try:
            return super()._context(index, inputs, targets, leaves)
        finally:
            self._inputs = None

    def _batch_rows(self) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[torch.Tensor]]:
        """The batch's recorded calls per layer (checked by :meth:`_calls`, then cleared) and their input rows."""
        calls = self._calls(self._recording)
        self._recording.clear()
        return calls, [_rows([layer.input_rows(x) for x, _ in c]) for layer, c in zip(self.layers, calls)]

    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        calls, rows_in = self._batch_rows()
        stats: dict[str, list[Any]] = {"A": [], "rows": []}
        for layer, a in zip(self.layers, rows_in):
            A, rows = self._input_statistics(layer, a)
            stats["A"].append(A)
            stats["rows"].append(rows)
        stats.update(self._gradient_statistics(leaves, outputs, targets, index, rows_in, calls))
        return stats

    def _calls(self, records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], samples: int | None = None
               ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every factored module's calls in the batch's forward pass, checked to be batch-first.

        A module applied to something shared by the samples (a position embedding called on ``arange(T)``) has no
        per-sample rows: its rows would be taken for samples, a silently wrong factor. Each call's leading
        dimension must be the batch's, and on the first batch it must follow the batch when half of it is run.
        """
        missing = [layer.name for i, layer in enumerate(self.layers) if i not in records]
        if missing:
            raise ValueError(
                f"module(s) {missing[:5]} were not called during the forward pass (their parameters are used "
                "another way, e.g. nn.MultiheadAttention's out_proj, or not at all), so K-FAC cannot factor their "
                "parameters; exclude them with params=."
            )
        samples = self._batch_samples if samples is None else samples
        for i, layer in enumerate(self.layers):
            for x, out in records[i]:
                if x.ndim == 0 or x.shape[0] != samples or out.ndim == 0 or out.shape[0] != samples:
                    self._refuse_shared(layer, x.shape[0] if x.ndim else 0, samples)
        if self._check_first and samples >= 2:
            self._check_follows_batch(samples)
        return [records[i] for i in range(len(self.layers))]

    _batch_samples = 0

    def _refuse_shared(self, layer: Layer, leading: int, samples: int) -> None:
        raise ValueError(
            f"module {layer.name!r} is called on a tensor whose leading dimension ({leading}) is not the batch's "
            f"({samples} samples): it is applied to something the samples share (e.g. a position embedding called on "
            "torch.arange(T)), which has no per-sample rows, so K-FAC cannot factor it. Exclude its parameters with "
            "params=, or use an exact operator."
        )

    def _check_follows_batch(self, samples: int) -> None:
        """Run the first half of the batch: every factored module's leading dimension must be halved too."""
        half = samples // 2
        ok, part = split_batch(self._inputs, 0, half, samples)
        if not ok:
            return
        seen: dict[int, int] = {}

        def hook(i: int) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                seen.setdefault(i, args[0].shape[0] if args[0].ndim else 0)  # returns None: the output is kept
            return record

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        self._paused = True
        try:
            with torch.no_grad():
                model_outputs(self.model, self._state(), part)
        finally:
            self._paused = False
            for handle in handles:
                handle.remove()
        for i, leading in seen.items():
            if leading != half:
                self._refuse_shared(self.layers[i], leading, half)

    def _input_statistics(self, layer: Layer, a: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The batch's summed input outer products and its row count."""
        if layer.kind == "embedding":
            tokens = a.reshape(-1)
            counts = torch.bincount(tokens, minlength=layer.module.num_embeddings).to(self._factor_dtype)
            if layer.module.padding_idx is not None:
                counts[layer.module.padding_idx] = 0  # its gradient is zero
            return counts.unsqueeze(0), float(tokens.numel())
        a = a.to(self._factor_dtype)
        if self.kfac_approx == "expand":
            return gram(a), float(a.shape[0] * a.shape[1])
        return gram(a.mean(1, keepdim=True)), float(a.shape[0])

    def _columns(self, outputs: torch.Tensor, targets: Any, index: int
                 ) -> tuple[torch.Tensor, Iterator[torch.Tensor], float]:
        """The differentiated output ``z``, the columns backpropagated from it, and their weight."""
        loss = self._loss_object
        if self.fisher_type == "empirical":
            z = loss.per_sample_losses(outputs, targets, self.reduction)
            scale = 1.0 / z.shape[0] if self.reduction == "mean" else 1.0
            return z, iter([torch.ones_like(z)]), scale
        detached = outputs.detach()
        if self.fisher_type == "mc":
            rank = self._shards.rank if self._shards is not None else 0
            generator = torch.Generator(device=self.device).manual_seed(self._seed + (rank << 32) + index)
            g = loss.sampled_output_gradients(detached, targets, self.mc_samples, generator)
            count = loss.mean_count(targets, None, detached) if self.reduction == "mean" else 1.0
            scale = 1.0 / (self.mc_samples * count) if count else 0.0
            return outputs, iter(g), scale
        S = loss.output_hessian_sqrt(detached, targets, self.reduction)
        return outputs, _unit_columns(S, loss.unit_dims), 1.0

    def _gradient_statistics(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int,
                             rows_in: list[torch.Tensor], calls: list[list[tuple[torch.Tensor, torch.Tensor]]]
                             ) -> dict[str, list[torch.Tensor]]:
        z, columns, scale = self._columns(outputs, targets, index)
        require_graph(z, "the model's outputs")
        layer_outputs = [s for c in calls for _, s in c]
        G: list[Any] = [0.0] * len(self.layers)
        D: Any = 0.0
        extra = self._extra_statistics(rows_in)
        diagonal = self.diagonal is not None and self._diagonal_wanted()
        if diagonal and self.fisher_type == "empirical":  # columns in output space
            (output_column,) = torch.autograd.grad(z, outputs, torch.ones_like(z), retain_graph=True)
        check = self._check_first
        columns = list(columns)
        chunks = [columns[:1]] if check else []  # the first column alone, with the parameters' gradients
        rest = columns[len(chunks):]
        chunks += [rest[i:i + self._column_chunk] for i in range(0, len(rest), self._column_chunk)]
        for number, chunk in enumerate(chunks):
            checking = check and number == 0
            grads = backward_columns(z, layer_outputs + (leaves if checking else []), chunk)
            start = 0
            g_rows = []  # per layer: (columns, N, R, groups, width)
            for layer, c in zip(self.layers, calls):
                parts = [torch.zeros(len(chunk), *s.shape, dtype=s.dtype, device=s.device) if gr is None else gr
                         for gr, (_, s) in zip(grads[start:start + len(c)], c)]
                start += len(c)
                # the columns ride along the batch dimension: (columns * N, ...) rows, then (columns, N, ...)
                rows = [layer.output_rows(p.flatten(0, 1)).unflatten(0, (len(chunk), -1)) for p in parts]
                g_rows.append((rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)).to(self._factor_dtype))
            if checking:
                leaf_grads = tuple(None if g is None else g[0] for g in grads[len(layer_outputs):])
                self._check_reconstruction(rows_in, [g[0] for g in g_rows], leaf_grads)
                self._check_first = False
            for i, g in enumerate(g_rows):
                G[i] = G[i] + scale * self._gradient_outer(g.flatten(0, 1))
            self._accumulate_extra(extra, rows_in, g_rows, scale)
            if diagonal:
                for column in chunk:
                    out_column = output_column if self.fisher_type == "empirical" else column
                    D = D + scale * self._diagonal_squares(leaves, out_column)
        return {"G": G, **extra, **({"D": [D]} if diagonal else {})}

    def _diagonal_wanted(self) -> bool:
        """Whether this pass computes the exact diagonal (EK-FAC's correction pass does not)."""
        return True

    def _diagonal_squares(self, leaves: list[torch.Tensor], column: torch.Tensor) -> torch.Tensor:
        r"""``sum_n (J_n^T c_n)^2`` over the diagonal part's parameters, from per-sample vector-Jacobian products."""
        indices = self.diagonal.indices
        names = [self.param_names[i] for i in indices]
        state = self._state([leaf.detach() for leaf in leaves])
        primals = [leaves[i].detach() for i in indices]

        def one(inputs: Any, c: torch.Tensor) -> torch.Tensor:
            def outputs(*ps: torch.Tensor) -> torch.Tensor:
                return model_outputs(self.model, {**state, **dict(zip(names, ps))}, inputs)
            _, pull = torch.func.vjp(outputs, *primals)
            return torch.cat([g.reshape(-1) for g in pull(c)])

        self._paused = True  # these forward passes are not the factors' records
        try:
            try:
                per_sample = torch.func.vmap(lambda x, c: one(map_leaves(_batched, x), c.unsqueeze(0)))(
                    self._inputs, column)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):  # a model vmap cannot batch
                per_sample = torch.stack([one(_slice(self._inputs, n), column[n:n + 1])
                                          for n in range(column.shape[0])])
        finally:
            self._paused = False
        return per_sample.to(self._factor_dtype).square().sum(0)

    def _gradient_outer(self, g: torch.Tensor) -> torch.Tensor:
        return gram(g if self.kfac_approx == "expand" else g.sum(1, keepdim=True))

    def _extra_statistics(self, rows_in: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Further per-batch statistics of a subclass (EK-FAC's corrections): none here."""
        return {}

    def _accumulate_extra(self, extra: dict[str, list[torch.Tensor]], rows_in: list[torch.Tensor],
                          g_rows: list[torch.Tensor], scale: float) -> None:
        """Add one column's contribution to :meth:`_extra_statistics`."""

    def _check_reconstruction(self, rows_in: list[torch.Tensor], g_rows: list[torch.Tensor],
                              leaf_grads: tuple[torch.Tensor | None, ...]) -> None:
        """Refuse a parameter whose gradient is not the sum over its module's rows (used outside the module)."""
        for layer, a, g in zip(self.layers, rows_in, g_rows):
            a = a.to(g.dtype) if a.is_floating_point() else a
            actual = {i: (torch.zeros_like(self._params[i]) if leaf_grads[i] is None else leaf_grads[i]).unsqueeze(0)
                      for i in layer.indices}
            if not rows_rebuild(layer, a, g, layer.to_matrix(actual)[0], self.dtype):
                names = [self.param_names[i] for i in layer.indices]
                raise ValueError(
                    f"the gradient of {names} is not the one module {layer.name!r} computes from its inputs and "
                    "outputs: the parameter is also used outside the module's forward (weight tying, or a functional "
                    "call such as F.linear(h, module.weight)), and K-FAC would miss those uses. Exclude it with "
                    "params=, or use an exact operator."
                )


def _unit_columns(S: torch.Tensor, unit_dims: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The columns of a unit-wise square root ``S`` (``(k, *z.shape)``), one per unit position and column.

    ``S``'s column ``j`` holds the roots of every unit at once; backpropagating it whole would add cross terms
    between the units of a sample, so each unit position gets its own columns.
    """
    masks = unit_masks(S.shape[2:], unit_dims)
    if masks is None:
        yield from S
        return
    for mask in masks.to(S):
        for column in S:
            yield column * mask


def rows_rebuild(layer: Layer, a: torch.Tensor, g: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the rows' gradient ``sum_n sum_r g_r a_r^T`` is autograd's ``expected`` (``(groups, rows, cols)``).

    Measured against the sum of the terms' magnitudes, so that cancellation (a gradient near zero at a minimum) is not
    mistaken for a missing use; the tolerance is the square root of the unit roundoff of ``dtype``. A parameter that
    fails is also used outside its module's forward pass (weight tying, a functional call).
    """
    rebuilt = summed_gradient(layer, a, g)
    magnitude = float(summed_gradient(layer, a.abs() if a.is_floating_point() else a, g.abs()).max())
    scale = max(magnitude, float(expected.abs().max()))
    return scale == 0 or float((expected.to(rebuilt.dtype) - rebuilt).abs().max()) <= \
        math.sqrt(torch.finfo(dtype).eps) * scale


def summed_gradient(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The layer's gradient rebuilt from its rows, ``sum_n sum_r g_r a_r^T``, as a ``(groups, rows, cols)`` matrix."""
    if layer.kind == "embedding":
        out = g.new_zeros(layer.module.num_embeddings, g.shape[-1])
        out.index_add_(0, a.reshape(-1), g.reshape(-1, g.shape[-1]))
        if layer.module.padding_idx is not None:
            out[layer.module.padding_idx] = 0
        return out.unsqueeze(0)
    if layer.kind == "norm":
        return per_sample_gradients(layer, a, g).sum(0)
    return torch.bmm(_by_group(g).transpose(1, 2), _by_group(a))


def _by_group(x: torch.Tensor) -> torch.Tensor:
    """Rows ``(N, R, groups, d)`` as ``(groups, N R, d)``."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_{n, r} x_{nr} x_{nr}^T`` per group, for rows ``(N, R, groups, d)``: ``(groups, d, d)``."""
    if x.shape[2] == 1:
        flat = x.reshape(-1, x.shape[-1])
        return (flat.T @ flat).unsqueeze(0)
    grouped = _by_group(x)
    return torch.bmm(grouped.transpose(1, 2), grouped)


def per_sample_gradients(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient of a Kronecker or norm layer as ``(N, groups, rows, cols)``: ``sum_r g_r a_r^T``."""
    if layer.kind == "norm":
        copies = a.shape[-1] // g.shape[-1]
        return (a * g.repeat(1, 1, 1, copies)).sum(1).unsqueeze(2)
    return torch.einsum("nrgi,nrgj->ngij", g, a)


def backward_columns(z: torch.Tensor, inputs: list[torch.Tensor], columns: list[torch.Tensor]
              ) -> list[torch.Tensor | None]:
    """The vector-Jacobian products of ``z`` with several columns at once: ``(columns, *shape)`` per input.

    Batched through the graph (``is_grads_batched``, vmap over the backward pass) where the graph's operations
    allow it, else one backward pass per column. The graph is kept: its owner frees it.
    """
    if len(columns) > 1:
        try:
            return list(torch.autograd.grad(z, inputs, torch.stack(columns), retain_graph=True, allow_unused=True,
                                            is_grads_batched=True))
        except (RuntimeError, NotImplementedError):  # an operation without a batching rule
            pass
    per_column = [torch.autograd.grad(z, inputs, c, retain_graph=True, allow_unused=True) for c in columns]
    return [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_column)]


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of a module's calls in one forward pass, side by side (one call: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _batched(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def _slice(inputs: Any, n: int) -> Any:
    return map_leaves(lambda t: t[n:n + 1] if isinstance(t, torch.Tensor) else t, inputs)
