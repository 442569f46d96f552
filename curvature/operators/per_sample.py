r"""Per-sample quantities: each sample's gradient and each sample's share of a curvature diagonal, streamed.

Every quantity here is a sum over samples of pulled-back output columns. For a batch with outputs :math:`z`, a
column :math:`c_{k}` in output space and the Jacobian :math:`J_n = \partial z_n / \partial \theta` of sample
:math:`n` alone,

.. math:: g_{kn} = J_n^\top c_{kn},

computed for a chunk of samples at once with ``torch.func`` (``vmap`` over the samples of ``vjp`` of the model on one
sample, and ``vmap`` over the columns of its pullback), or sample by sample where the model cannot be batched that
way. Never more than a chunk of ``(samples, columns, P)`` is in memory; the result is streamed as
:class:`~curvature.operators.PerSampleChunk` ``(indices, values)`` pieces, or reduced on the fly.

- **Gradients** (:func:`~curvature.per_sample_gradients`): one column, :math:`c_n = w_b \nabla_{z_n} L_b`, the
  output gradient of the batch loss times the batch's weight. For ``reduction="mean"`` with :math:`L_b = \frac{1}{w_b}
  \sum_u \ell_u` (``w_b`` the count the loss divides by: samples, or non-ignored targets), this is the gradient of the
  sample's **summed** loss :math:`\ell_n = \sum_{u \in n} \ell_u`, and the gradient of the mean loss over all the data
  is exactly :math:`\nabla L = \frac{1}{W} \sum_n \nabla \ell_n` with :math:`W = \sum_b w_b`
  (``PerSample.normalizer``), whatever the batching and padding. For ``"sum"``, :math:`W = 1`.
- **Diagonals** (:func:`~curvature.per_sample_diagonals`): the columns of the operator's output matrix
  :math:`\Lambda_b = \sum_k c_k c_k^\top` (the loss's closed-form square root for the GGN and exact Fisher, the
  drawn targets' gradients for the Monte-Carlo Fisher, the per-sample loss gradients for the empirical Fisher), one
  column per output unit (class dimension at each position) so that no cross-position term enters, and
  :math:`d_n = w_b \sum_k (J_n^\top c_{kn})^{\odot 2}`, so that :math:`\operatorname{diag}(G) = \frac1W \sum_n d_n`
  (BackPACK's ``DiagGGNExact``/``DiagGGNMC`` and their per-sample versions: Dangel, Kunstner & Hennig 2020,
  "BackPACK: Packing more into backprop", ICLR, arXiv:1912.10985).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .._func import model_outputs, vjp_columns
from .._modes import autograd_enabled
from .._tree import map_leaves
from .curvature import CurvatureOperator
from .data import batch_size
from .layer_rows import CHECK_SAMPLES, Recording, RowLayers
from .losses import check_additive
from .losses.base import unit_masks

__all__ = ["PerSample", "PerSampleChunk", "gradient_norms", "per_sample_diagonals", "per_sample_gradients"]

#: The memory a chunk of per-sample pullbacks may take by default: ``samples × columns × P`` elements.
CHUNK_BYTES = 256 * 2**20


class PerSampleChunk(NamedTuple):
    """One piece of a per-sample stream.

    Attributes:
        indices: ``(n,)`` int64: the samples' positions in the data, counted over the batches in iteration order.
        values: ``(n, P)``: one row per sample, in the operator's flat parameter order (``param_names``).
    """

    indices: torch.Tensor
    values: torch.Tensor


#: ``(outputs, targets, index) -> (columns (k, N, *z_sample), unit_dims or None, scale)``: a batch's output columns.
Columns = Callable[[torch.Tensor, Any, int], tuple[torch.Tensor, "tuple[int, ...] | None", float]]


class PerSample:
    r"""A stream of per-sample rows: iterate for :class:`~curvature.operators.PerSampleChunk` pieces, or reduce it.

    Built by :func:`~curvature.per_sample_gradients` and :func:`~curvature.per_sample_diagonals`. Each pass over it
    reads the data again (the model is left as it was); rows are computed in chunks of ``chunk_size`` samples and
    never held together unless asked (:meth:`~curvature.PerSample.stack`). After a full pass, ``normalizer`` is
    :math:`W` of the module docstring (the mean loss's total count, 1 for a sum) and ``num_samples`` the samples
    seen; the whole-data quantity is ``sum / normalizer`` (:meth:`~curvature.PerSample.mean`).

    Attributes:
        param_names: The parameters the columns of the rows belong to, in order.
        normalizer: :math:`W` after a complete pass, else None.
        num_samples: The samples of the last complete pass, else None.
    """

    def __init__(self, op: CurvatureOperator, columns: Columns, square: bool, chunk_size: int | None,
                 what: str) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None (automatic) or a positive integer, got {chunk_size!r}.")
        self._op = op
        self._columns = columns
        self._square = square
        self._what = what
        self.chunk_size = chunk_size
        self.param_names = list(op.param_names)
        self.normalizer: float | None = None
        self.num_samples: int | None = None
        self.batches = 0
        self._vmap_failed = False
        self._rows: RowLayers | None = None
        self._separable = False  # whether the model's outputs were checked not to couple the samples

    def __repr__(self) -> str:
        return f"PerSample({self._what}, P={self._op.shape[0]}, chunk_size={self.chunk_size})"

    # -- the stream -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[PerSampleChunk]:
        return self._stream("rows")

    def _stream(self, mode: str) -> Iterator[PerSampleChunk]:
        """The chunks, as rows or reduced.

        ``"rows"``: each chunk's ``(n, P)`` rows; ``"sum"``: their sums ``(1, P)``, never forming the rows;
        ``"norms"`` (gradients only): each row's squared norm per parameter, ``(n, parameters)``.
        """
        op = self._op
        op._sync_with_model()
        weight_sum, start, batches = 0.0, 0, 0
        with autograd_enabled(), op._rng_preserved():
            for index, batch in enumerate(op._data):
                n = batch_size(batch[0])
                if n == 0:
                    continue
                inputs, targets = op._prepare_batch(*batch)
                weight = yield from self._batch(index, inputs, targets, start, n, mode)
                weight_sum += weight
                start += n
                batches += 1
        op._data.count_pass(batches)
        self.batches = batches
        if op._shards is None:  # in a process group an empty shard is fine: the ranks' totals are checked together
            op._check_totals(weight_sum, batches, "")
        self.normalizer = weight_sum if op.reduction == "mean" else 1.0
        self.num_samples = start

    def _batch(self, index: int, inputs: Any, targets: Any, start: int, n: int, mode: str
               ) -> Iterator[PerSampleChunk]:
        op = self._op
        state = op._state()
        rows = self._row_layers()
        P, P_rows = op.shape[0], sum(op._sizes[i] for i in rows.indices)
        # the rows' memory per sample: every row layer's result, or for sums and norms one layer's at a time
        rows_per_sample = (1 + self._square) * (P_rows if mode == "rows" else max(
            (sum(op._sizes[i] for i in layer.indices) for layer in rows.layers), default=0))
        where = f"batch {index} of data"
        recording = None
        if rows.layers and (self.chunk_size or n) >= n and n * rows_per_sample * op.dtype.itemsize <= CHUNK_BYTES:
            # one chunk: its recorded forward pass gives the outputs too
            recording = rows.record(state, [p.detach() for p in op._params], inputs,
                                    lambda st, x: op._forward(where, st, x))
            outputs = recording.outputs.detach()
        else:
            with torch.no_grad():
                outputs = op._forward(where, state, inputs)
        op._check_batch(index, outputs, targets, inputs)
        if not self._separable and n > 1:
            self._check_separable(state, inputs, outputs, n, where)
        if op._loss_object.kind == "other" and n > 1:  # a per-sample split needs a loss that does not couple samples
            check_additive(op.loss_fn, outputs, targets, inputs, op.reduction, f"batch {index} of data")
        weight = op._weight(targets, inputs, outputs)
        columns, unit_dims, scale = self._columns(outputs, targets, index)
        per_sample_columns = columns.shape[0] * _unit_count(columns.shape[2:], unit_dims)
        # memory per sample: the rows' results (and their squares), the vmap path's pullbacks of every column
        per_sample_bytes = columns.element_size() * (rows_per_sample + (P - P_rows) * per_sample_columns
                                                     + per_sample_columns * math.prod(columns.shape[2:]))
        chunk = self.chunk_size or max(1, CHUNK_BYTES // max(1, per_sample_bytes))
        if chunk < n:
            recording = None  # several chunks: each records its own forward pass
        factor = weight * scale  # folded into the columns: w_b s (J^T c)^2 = (J^T sqrt(w_b s) c)^2
        for begin in range(0, n, chunk):
            end = min(n, begin + chunk)
            indices = torch.arange(start + begin, start + end, device=op.device)
            if factor == 0:  # a batch whose targets are all ignored adds nothing (its columns may be 0/0)
                shape = (1, P) if mode == "sum" else (end - begin, len(op._sizes) if mode == "norms" else P)
                yield PerSampleChunk(indices, torch.zeros(shape, dtype=op.dtype, device=op.device))
                continue
            cols = _expand_units(columns[:, begin:end], unit_dims)  # (K, n, *z_sample)
            if factor != 1.0:
                cols = cols * (math.sqrt(factor) if self._square else factor)
            yield PerSampleChunk(indices, self._values(inputs, n, begin, end, cols, mode, recording))
        return weight

    def _check_separable(self, state: dict[str, torch.Tensor], inputs: Any, outputs: torch.Tensor, n: int,
                         where: str) -> None:
        """Refuse a model whose outputs for some samples change when the others are left out.

        Per-sample quantities exist only where each sample's outputs depend on that sample alone: a forward pass over
        a batch that mixes the samples (a mean over the batch, an attention across it) would give rows that are
        neither the batch's gradient split by sample nor each sample's own. The first samples' outputs computed alone
        are compared with theirs in the batch, once per stream, to the square root of the unit roundoff.
        """
        m = min(CHECK_SAMPLES, n // 2)
        with torch.no_grad():
            alone = self._op._forward(where, state, _sample_slice(inputs, n, 0, m))
        batched = outputs[:m]
        scale = float(batched.abs().max()) if batched.numel() else 0.0
        if alone.shape != batched.shape or float((alone - batched).abs().max()) > \
                math.sqrt(torch.finfo(outputs.dtype).eps) * max(scale, torch.finfo(outputs.dtype).tiny):
            raise ValueError(
                f"{where}: the model's outputs for its first {m} samples change when the other samples of the "
                "batch are left out, so its forward pass couples the samples (a mean or a normalization over the "
                "batch, attention across it) and per-sample quantities are not defined. Make the model treat samples "
                "independently (eval mode for batch statistics), or pass batches of one sample (each sample alone); "
                "for the diagonal of the batch's curvature as it is, use an estimate: "
                "curvature.diagonal(op, method='hutchinson')."
            )
        self._separable = True

    def _row_layers(self) -> RowLayers:
        if self._rows is None:
            self._rows = RowLayers(self._op.model, self._op._params, self._op.param_names)
        return self._rows

    def _values(self, inputs: Any, n: int, begin: int, end: int, cols: torch.Tensor, mode: str,
                recording: Recording | None = None) -> torch.Tensor:
        """The rows of the samples ``begin:end``, their sum or their norms, as :meth:`_stream`'s ``mode`` says.

        Each parameter comes from its layer's rows (:class:`~curvature.operators.layer_rows.RowLayers`) or by vmap.
        """
        op = self._op
        state = op._state()
        part = _sample_slice(inputs, n, begin, end)
        primals = [p.detach() for p in op._params]
        shape = (1, op.shape[0]) if mode == "sum" else (end - begin, len(primals) if mode == "norms" else op.shape[0])
        out = torch.empty(shape, dtype=cols.dtype, device=cols.device)
        offsets = [0]
        for size in op._sizes[:-1]:
            offsets.append(offsets[-1] + size)
        written = self._row_layers().pullbacks(state, primals, part, cols, self._square, out, offsets, mode, recording)
        rest = [i for i in range(len(primals)) if i not in written]
        if rest:
            pulled = self._pullback(inputs, n, begin, end, cols, rest)  # (samples, K, P_rest)
            values = pulled.square().sum(1) if self._square else pulled[:, 0]
            values = values.sum(0, keepdim=True) if mode == "sum" else values
            for i, value in zip(rest, values.split([op._sizes[i] for i in rest], dim=1)):
                if mode == "norms":
                    out[:, i] = value.square().sum(1)
                else:
                    out[:, offsets[i]:offsets[i] + op._sizes[i]] = value
        return out

    def _pullback(self, inputs: Any, n: int, begin: int, end: int, cols: torch.Tensor, which: list[int]
                  ) -> torch.Tensor:
        """``J_m^T c_{km}`` for the samples ``begin:end`` and the parameters ``which``: ``(samples, K, P_which)``."""
        op = self._op
        names = [op.param_names[i] for i in which]
        primals = [op._params[i].detach() for i in which]
        state = op._state()
        part = _sample_slice(inputs, n, begin, end)

        def pull_one(x: Any, c: torch.Tensor) -> torch.Tensor:
            def outputs(*ps: torch.Tensor) -> torch.Tensor:
                return model_outputs(op.model, {**state, **dict(zip(names, ps))}, x)
            _, pull = torch.func.vjp(outputs, *primals)
            grads = torch.func.vmap(lambda ci: pull(ci.unsqueeze(0)))(c)
            return torch.cat([g.reshape(c.shape[0], -1) for g in grads], dim=1)

        if not self._vmap_failed:
            dims = map_leaves(lambda t: 0 if _batched_leaf(t, n) else None, inputs)  # shared tensors stay whole
            try:
                return torch.func.vmap(lambda x, c: pull_one(map_leaves(_add_batch_dim, x), c),
                                       in_dims=(dims, 1))(part, cols)
            except (RuntimeError, ValueError, TypeError, NotImplementedError):  # a model vmap cannot batch
                self._vmap_failed = True
        rows = [_loop_pullback(op, state, which, _sample_slice(inputs, n, m, m + 1), cols[:, m - begin:m - begin + 1])
                for m in range(begin, end)]
        return torch.stack(rows)

    # -- reductions -----------------------------------------------------------------------------------------
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` applied to every chunk's ``(n, P)`` rows, concatenated along the samples (``fn`` keeps dim 0)."""
        parts = [fn(chunk.values) for chunk in self]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def norms(self) -> torch.Tensor:
        r"""Each sample's row norm, ``(N,)``: for gradients, the GraNd score at these parameters (Paul et al. 2021).

        For gradients, without forming the rows of the layers' parameters: :math:`\|g a^\top\|^2 =
        \|g\|^2 \|a\|^2` for one row per sample (BackPACK's ``BatchL2Grad``).
        """
        if self._square:
            return self.map(lambda v: torch.linalg.vector_norm(v, dim=1))
        parts = [chunk.values.sum(1).sqrt() for chunk in self._stream("norms")]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sum(self) -> torch.Tensor:
        r""":math:`\sum_n` of the rows, ``(P,)``, accumulated in float64 where the rows are float32 or lower."""
        total = torch.zeros(self._op.shape[0], dtype=_accumulation_dtype(self._op.dtype), device=self._op.device)
        for chunk in self._stream("sum"):
            total += chunk.values[0].to(total.dtype)
        return total.to(self._op.dtype)

    def mean(self) -> torch.Tensor:
        r"""The whole-data quantity :math:`\frac1W \sum_n` of the rows: the gradient of the loss, or the diagonal."""
        total = self.sum()
        return total / self.normalizer

    def stack(self) -> torch.Tensor:
        """Every row at once, ``(N, P)``: memory ``N·P``, only where asked for."""
        return self.map(lambda v: v)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    params: Any = None,
    *,
    chunk_size: int | None = None,
    **operator_kwargs: Any,
) -> PerSample:
    r"""Each sample's gradient, streamed in chunks: :math:`\nabla_\theta \ell_n` of the sample's **summed** loss.

    For ``reduction="mean"``, :math:`L = \frac1W \sum_n \ell_n` with :math:`W` the count the loss divides by over the
    whole data (samples, or non-ignored targets for ``CrossEntropyLoss(ignore_index=...)`` and
    :class:`~curvature.NormalizedLoss` counts), so :math:`\nabla L = \frac1W \sum_n \nabla\ell_n` exactly, with
    :math:`W` read off the stream after a pass (``PerSample.normalizer``; :meth:`~curvature.PerSample.mean` divides
    by it).
    A per-sample gradient is thus independent of the batch it came in and of padding elsewhere; the gradient of
    sample ``n``'s loss as ``loss_fn`` alone would average it is :math:`\nabla\ell_n / w_n` with :math:`w_n` that
    sample's count.

    Computed from the recorded rows of the ``Linear``, convolution and normalization layers (BackPACK's
    ``BatchGrad`` way; ``curvature/operators/layer_rows.py``), and for every other parameter with ``torch.func``
    (``vmap`` over the samples of a ``vjp``), falling back to one backward pass per sample where the model cannot be
    vmapped. Memory is one chunk of ``(chunk_size, P)`` rows; cost about one gradient per chunk plus writing the rows.

    Args:
        model: The model (its parameters, ``.grad``, buffers, mode and the RNG are left untouched).
        loss_fn: ``loss_fn(outputs, targets)``; a callable must not couple the samples of a batch (checked).
        data: One ``(inputs, targets)`` batch or an iterable of them; inputs may be tensors, tuples or dicts.
        params: None (every trainable parameter) or the parameters or names to differentiate.
        chunk_size: Samples per chunk; None picks it so that a chunk's rows take about 256 MiB.
        **operator_kwargs: ``reduction=``, ``verify=``, ... as for :class:`~curvature.HessianOperator`, whose
            checks the model, loss and data go through first.

    Returns:
        A :class:`~curvature.PerSample` stream of ``(indices, gradients)`` chunks, with ``norms()``, ``sum()``,
        ``mean()``, ``map(fn)`` and ``stack()``.

    Raises:
        ValueError, TypeError: What the operators refuse (data, ``params``, a model in a random mode, a loss that
            couples the samples of a batch), and a bad ``chunk_size``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> grads = per_sample_gradients(model, torch.nn.CrossEntropyLoss(), (x, y), chunk_size=4)
        >>> [tuple(chunk.values.shape) for chunk in grads]
        [(4, 8), (4, 8)]
        >>> grads.normalizer
        8.0
    """
    from .hessian import HessianOperator

    op = HessianOperator(model, loss_fn, data, params, **operator_kwargs)
    return PerSample(op, _gradient_columns(op), square=False, chunk_size=chunk_size, what="gradients")


def gradient_norms(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    params: Any = None,
    *,
    chunk_size: int | None = None,
    **operator_kwargs: Any,
) -> torch.Tensor:
    r"""The norm of each sample's gradient, ``(N,)``: GraNd scores (Paul, Ganguli & Dziugaite 2021).

    :math:`\chi_n = \|\nabla_\theta \ell_n\|_2` with :math:`\ell_n` the sample's summed loss, as in
    :func:`~curvature.per_sample_gradients` (never more than a chunk of gradients in memory). Paul et al. ("Deep
    Learning on a Data Diet: Finding Important Examples Early in Training", NeurIPS 2021, arXiv:2107.07075) average it
    over a few initializations early in training and keep the samples with the largest scores; call this at each.

    Args:
        model: The model.
        loss_fn: ``loss_fn(outputs, targets)``.
        data: One batch or an iterable of batches.
        params: None or the parameters or names to differentiate.
        chunk_size: Samples per chunk (None: automatic).
        **operator_kwargs: As for :func:`~curvature.per_sample_gradients`.

    Returns:
        ``(N,)`` norms in the parameters' dtype, in the data's order.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> gradient_norms(model, torch.nn.CrossEntropyLoss(), (torch.randn(5, 3), torch.randint(0, 2, (5,)))).shape
        torch.Size([5])
    """
    return per_sample_gradients(model, loss_fn, data, params, chunk_size=chunk_size, **operator_kwargs).norms()


def per_sample_diagonals(op: CurvatureOperator, chunk_size: int | None = None) -> PerSample:
    r"""Each sample's share of the diagonal of a GGN, Fisher (exact or Monte-Carlo) or empirical Fisher operator.

    :math:`d_n = w_b \sum_k (J_n^\top c_{kn})^{\odot 2}` with the columns :math:`c_k` of the operator's output
    matrix (module docstring), so that ``op``'s diagonal is :math:`\frac1W \sum_n d_n`
    (:meth:`~curvature.PerSample.mean`):
    for the GGN and Fisher of a mean loss, :math:`d_n` is the diagonal of the sample's summed loss's GGN
    :math:`J_n^\top \nabla^2_{z_n} \ell_n J_n`; for the empirical Fisher, :math:`(\nabla \ell_n)^{\odot 2}` of its
    per-sample loss. A Monte-Carlo Fisher uses the operator's own draws, so the result is the diagonal of that very
    operator. Cost: one pullback per output unit and column (``C`` per sample for ``C`` classes, ``C·T`` over
    ``T`` positions; ``M`` draws per unit for the Monte-Carlo Fisher; one for the empirical Fisher), vectorized.

    Args:
        op: A :class:`~curvature.GGNOperator`, :class:`~curvature.FisherOperator` or
            :class:`~curvature.EmpiricalFisherOperator` whose loss has a closed-form output Hessian (MSE, cross-entropy,
            binary cross-entropy; any loss for the empirical Fisher).
        chunk_size: Samples per chunk; None picks it so that a chunk's pullbacks take about 256 MiB.

    Returns:
        A :class:`~curvature.PerSample` stream of ``(indices, diagonals)`` chunks.

    Raises:
        TypeError: For another operator, or a loss without a closed-form square root of its output Hessian.
    """
    columns = getattr(op, "_sample_columns", None)
    if not isinstance(op, CurvatureOperator) or columns is None:
        raise TypeError(
            f"op must be a GGNOperator, FisherOperator or EmpiricalFisherOperator, got {type(op).__name__}; for the "
            "Hessian use curvature.diagonal(op, method='exact') (P products) or an estimate."
        )
    op._check_structured_diagonal()
    return PerSample(op, columns, square=True, chunk_size=chunk_size, what="diagonals")


def exact_diagonal(op: CurvatureOperator, chunk_size: int | None = None) -> torch.Tensor:
    """The diagonal of ``op`` from :func:`~curvature.per_sample_diagonals`: summed over the samples (and ranks)."""
    stream = per_sample_diagonals(op, chunk_size)
    total: torch.Tensor | None = None
    error: Exception | None = None
    try:
        total = stream.sum().to(_accumulation_dtype(op.dtype))
    except Exception as err:  # in a process group the rank still joins the all-reduce, then raises
        if op._shards is None:
            raise
        error = err
    if op._shards is None:
        return (total / stream.normalizer).to(op.dtype)
    dtype = _accumulation_dtype(op.dtype)
    ok = error is None and total is not None
    zeros = torch.zeros(op.shape[0], dtype=dtype, device=op.device)
    weight = float(stream.normalizer) if ok and op.reduction == "mean" else 0.0
    flags = [weight, float(stream.batches) if ok else 0.0, 0.0 if error is None else 1.0]
    packed = torch.cat([total if ok else zeros, torch.tensor(flags, dtype=dtype, device=op.device)])
    dist.all_reduce(packed, group=op.process_group)
    if error is not None:
        raise error
    if float(packed[-1]):
        raise ValueError("computing the diagonal failed on another rank of the process group; see the error there.")
    op._check_totals(float(packed[-3]) if op.reduction == "mean" else 1.0, float(packed[-2]),
                     " on every rank of the process group")
    normalizer = float(packed[-3]) if op.reduction == "mean" else 1.0
    return (packed[:-3] / normalizer).to(op.dtype)


def _gradient_columns(op: CurvatureOperator) -> Columns:
    def columns(outputs: torch.Tensor, targets: Any, index: int) -> tuple[torch.Tensor, None, float]:
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = op._loss(z, targets, index)
            (grad,) = torch.autograd.grad(loss, z)
        return grad.unsqueeze(0), None, 1.0
    return columns


def _unit_count(z_sample: torch.Size, unit_dims: tuple[int, ...] | None) -> int:
    if unit_dims is None:
        return 1
    return math.prod(size for d, size in enumerate(z_sample, start=1) if d not in unit_dims)


def _expand_units(columns: torch.Tensor, unit_dims: tuple[int, ...] | None) -> torch.Tensor:
    """``(k, n, *z_sample)`` columns as ``(k·U, n, *z_sample)``: each column restricted to one output unit in turn.

    A unit-wise square root holds every unit's root at once (:meth:`~curvature.operators.losses.base.Loss.
    output_hessian_sqrt`); pulled back whole, a sample's units would add cross terms that are not in the matrix.
    """
    masks = unit_masks(columns.shape[2:], unit_dims)
    if masks is None:
        return columns
    masks = masks.to(columns)
    return (columns.unsqueeze(1) * masks.unsqueeze(1).unsqueeze(0)).flatten(0, 1)  # (k, U, n, *z_sample) flattened


def _batched_leaf(t: Any, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == n


def _sample_slice(inputs: Any, n: int, begin: int, end: int) -> Any:
    """Samples ``begin:end`` of a batch of ``n``: tensors with ``n`` rows are sliced, everything else is shared."""
    return map_leaves(lambda t: t[begin:end] if _batched_leaf(t, n) else t, inputs)


def _add_batch_dim(t: Any) -> Any:
    return t.unsqueeze(0) if isinstance(t, torch.Tensor) else t


def _loop_pullback(op: CurvatureOperator, state: dict[str, torch.Tensor], which: list[int], x: Any,
                   cols: torch.Tensor) -> torch.Tensor:
    """One sample's ``(K, P_which)`` pullbacks by autograd (for models vmap cannot batch)."""
    leaves = [op._params[i].detach().requires_grad_(True) for i in which]
    names = [op.param_names[i] for i in which]
    with torch.enable_grad():
        z = model_outputs(op.model, {**state, **dict(zip(names, leaves))}, x)
        grads = vjp_columns([z], leaves, [cols], vectorize=False, retain_graph=False)
    return torch.cat([g.reshape(cols.shape[0], -1) for g in grads], dim=1)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float16, torch.bfloat16, torch.float32) else dtype

