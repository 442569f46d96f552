r"""K-FAC: the Kronecker-factored approximation of a Gauss-Newton-type curvature, one block per layer.

For a layer :math:`s_r = W a_r` applied at rows :math:`r` of every sample (one row without weight sharing), the
block of the curvature :math:`\sum_n J_n^\top \Lambda_n J_n` for :math:`W` is :math:`\sum_n \sum_c
\operatorname{vec}(\sum_r g_{ncr} a_{nr}^\top) \operatorname{vec}(\cdot)^\top`, where :math:`g_{ncr}` is the
gradient with respect to :math:`s_r` of one *column* :math:`c` of the loss's factorization (below). K-FAC replaces
the expectation of a Kronecker product by the Kronecker product of expectations (Martens & Grosse 2015, ICML;
convolutions: Grosse & Martens 2016, ICML; weight sharing: Eschenhagen et al. 2023, NeurIPS):

.. math::
    \text{expand:}\quad G \otimes A, \qquad
    A = \frac{1}{\sum_n R_n} \sum_{n, r} a_{nr} a_{nr}^\top, \qquad
    G = \sum_{n, c, r} g_{ncr} g_{ncr}^\top

.. math::
    \text{reduce:}\quad A = \frac{1}{N} \sum_n \bar a_n \bar a_n^\top, \quad \bar a_n = \frac{1}{R_n}\sum_r a_{nr},
    \qquad G = \sum_{n, c} \Big(\sum_r g_{ncr}\Big)\Big(\sum_r g_{ncr}\Big)^\top

The columns :math:`c` depend on ``fisher_type``:

* ``"ggn"`` (curvlinops' ``"type-2"``): the columns of a square root :math:`S` of the loss's output Hessian, one per
  output unit and column (the exact GGN in the factored form :math:`\sum_c (J^\top s_c)(J^\top s_c)^\top`);
* ``"mc"`` (``"mc"``): gradients at ``mc_samples`` targets drawn from the model's predictive distribution, weighted
  by :math:`1/M` (the Monte-Carlo Fisher, exactly the draws of
  :class:`~curvature.operators.ggn.FisherOperator` with the same generator);
* ``"empirical"`` (``"empirical"``): the gradient of each sample's own loss (the empirical Fisher).

A mean loss enters through the weights of the columns, so the operator approximates the curvature of the loss over
all data, whatever the batching. Where the approximation is exact: one data point without weight sharing (the block
diagonal of the GGN); deep linear networks with MSE, for any data, in the expand setting with ``"expand"`` and in the
reduce setting with ``"reduce"`` (Eschenhagen et al. 2023).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..._checks import check_generator, check_scalar
from ..._func import model_outputs
from ..._tree import map_leaves
from ..base import LinearOperator
from ..curvature import CurvatureOperator, require_graph
from ..data import batch_size, split_batch
from .blocks import BlockEigen, KroneckerBlock
from .layers import FACTORED_MODULES, DiagonalPart, Layer, factored_layers

__all__ = ["FISHER_TYPES", "KFACInverse", "KFACOperator"]

#: The curvatures K-FAC can factor, by ``fisher_type``, and curvlinops' names for them.
FISHER_TYPES = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}
_APPROXIMATIONS = ("expand", "reduce")


class KFACOperator(CurvatureOperator):
    r"""The Kronecker-factored curvature (K-FAC): one block :math:`G \otimes A` per layer, over the flat parameters.

    The operator acts on the same flat vector as the exact operators (the selected parameters in
    ``model.parameters()`` order) and is block diagonal, one block per layer (per group, for grouped convolutions).
    Factored layers: ``nn.Linear`` (any number of leading dimensions, with or without bias), ``nn.Conv1d`` /
    ``nn.Conv2d`` (any padding, padding mode, stride, dilation and groups; the unfolded patches are the inputs),
    ``nn.Embedding`` (its input factor is the diagonal of token frequencies; the expand statistics are used in both
    modes, since the reduce factor would be a dense vocabulary-sized matrix) and the affine parameters of
    ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm*d`` in eval mode. A normalization layer's
    :math:`s = \gamma \odot \hat x + \beta` has the per-row gradient :math:`[\hat x; 1] \odot [g; g]`; its block is
    the Hadamard-factored :math:`E[a a^\top] \circ E[\tilde g \tilde g^\top]` with :math:`a = [\hat x; 1]`,
    :math:`\tilde g = [g; g]`: K-FAC's independence assumption applied to an elementwise layer, exact for one data
    point, and a dense block of twice the layer's width.

    Any other selected parameter is refused by name, and so is a factored parameter whose gradient is not the one its
    module computes from its input and output (weight tying, or a functional use such as ``F.linear(h, m.weight)``):
    checked on the first batch against autograd, never silently dropped. The factors are computed at the first
    product (or by :meth:`compute`) and again whenever the parameters change.

    Args:
        model: The model; left unchanged (parameters, buffers, ``.grad``, modes, hooks, the RNG).
        loss_fn: ``torch.nn.MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (mean or sum) for ``"ggn"`` and
            ``"mc"``; any scalar loss for ``"empirical"``.
        data: One ``(inputs, targets)`` batch or a re-iterable of them.
        params: None (all trainable parameters) or an iterable of parameters, names, or a module.
        fisher_type: ``"ggn"`` (default; the type-2 factorization of the exact GGN), ``"mc"`` (Monte-Carlo Fisher)
            or ``"empirical"`` (empirical Fisher); curvlinops calls them ``"type-2"``, ``"mc"``, ``"empirical"``.
        kfac_approx: ``"expand"`` (default; rows of weight-shared layers count as data points) or ``"reduce"``
            (rows are averaged per sample first), Eschenhagen et al. (2023).
        mc_samples: Targets drawn per data point for ``"mc"``.
        generator: Seeds the draws of ``"mc"`` (a fresh random seed if None; the global RNG is never touched).
        unsupported: ``"error"`` (default): a selected parameter no factored layer owns (or several share) is
            refused by name. ``"diagonal"``: such parameters are covered by one more block, the exact diagonal of the
            same curvature (``fisher_type``) over them, from per-sample gradients (``torch.func.vmap``, else a loop
            over samples): one more forward and backward pass per column.
        **kwargs: ``reduction``, ``process_group`` (the factors' statistics are all-reduced over the group once per
            computation) and ``verify`` as in :class:`~curvature.operators.curvature.CurvatureOperator`.

    Raises:
        ValueError: On an unknown ``fisher_type`` or ``kfac_approx``, a parameter no factored layer owns, a factored
            module that is never called, or a parameter used outside its module.
        TypeError: For ``"ggn"`` or ``"mc"`` with a loss that has no closed form or is no likelihood.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> K = KFACOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> K.shape, len(K.eigh())
        ((26, 26), 2)
        >>> v = torch.randn(26)
        >>> bool(torch.allclose(K.inverse(damping=0.1) @ (K @ v + 0.1 * v), v, atol=1e-4))
        True
    """

    name = "kfac"
    title = "K-FAC"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        params: Any = None,
        *,
        fisher_type: str = "ggn",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        unsupported: str = "error",
        **kwargs: Any,
    ) -> None:
        if unsupported not in ("error", "diagonal"):
            raise ValueError(f"unsupported must be 'error' or 'diagonal', got {unsupported!r}.")
        if fisher_type not in FISHER_TYPES:
            hint = {v: k for k, v in FISHER_TYPES.items()}.get(fisher_type)
            raise ValueError(f"fisher_type must be one of {tuple(FISHER_TYPES)}, got {fisher_type!r}"
                             + (f" (curvlinops' {fisher_type!r} is {hint!r} here)." if hint else "."))
        if kfac_approx not in _APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        for unused in ("keep_graph", "vectorize", "allow_tf32"):
            if unused in kwargs:
                raise TypeError(f"{type(self).__name__} keeps no graphs: {unused}= does not apply.")
        check_generator(generator)
        self.fisher_type, self.kfac_approx, self.mc_samples = fisher_type, kfac_approx, mc_samples
        self.unsupported = unsupported
        if generator is None:
            self._seed = torch.Generator().seed() % (2**62)
        else:
            self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        super().__init__(model, loss_fn, data, params, keep_graph=False, **kwargs)
        self.layers, unowned = factored_layers(self.model, self._params, self.param_names,
                                               shared="unowned" if unsupported == "diagonal" else "error")
        if unowned and unsupported == "error":
            names = [self.param_names[i] for i in unowned]
            raise ValueError(
                f"K-FAC has no factorization for parameter(s) {names[:5]}{' ...' if len(names) > 5 else ''}: they "
                f"belong to no {', '.join(t.__name__ for t in FACTORED_MODULES)}. Exclude them with params= "
                "(e.g. params=[p for n, p in model.named_parameters() if ...]), pass unsupported='diagonal' to "
                "cover them with their exact diagonal, or use an exact operator."
            )
        #: The parameters no factored layer owns, covered by their exact diagonal (``unsupported="diagonal"``).
        self.diagonal = DiagonalPart(unowned) if unowned else None
        self._inputs: Any = None
        self._paused = False
        self._blocks: list[KroneckerBlock] | None = None
        self._factors_key: Any = None
        self._recording: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._check_first = True  # the rows are checked against autograd on the first batch, once
        self._column_chunk = 16  # columns backpropagated together
        self._factor_dtype = torch.promote_types(self.dtype, torch.float32)

    # -- hooks of CurvatureOperator ----------------------------------------------------------------------------
    def _known_psd(self) -> bool:
        return True

    def _check_loss_supported(self) -> None:
        loss = self._loss_object
        if self.fisher_type == "ggn" and loss.kind not in ("mse", "ce", "bce"):
            raise TypeError(
                f"fisher_type='ggn' needs a loss whose output Hessian has a closed-form square root (MSELoss, "
                f"CrossEntropyLoss, BCEWithLogitsLoss); {type(self.loss_fn).__name__} has none: use "
                "fisher_type='empirical', or an exact operator."
            )
        if self.fisher_type == "ggn":
            loss.check_ggn()
        if self.fisher_type == "mc":
            loss.check_fisher()
            if self._data.random_order:
                raise ValueError("data is a shuffling DataLoader, but the Monte-Carlo draws are seeded by batch "
                                 "position; pass shuffle=False.")

    @property
    def _weights_by_loss(self) -> bool:  # type: ignore[override]
        return self.fisher_type != "empirical"

    def _batch_weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        if self.fisher_type == "empirical":
            return float(batch_size(inputs))
        return self._loss_object.mean_count(targets, inputs, outputs)

    def _apply(self, ctx: Any, vs: list[torch.Tensor], last_use: bool = False) -> list[torch.Tensor]:
        raise NotImplementedError("K-FAC multiplies with its factors, not through per-batch graphs.")

    def clear_cache(self) -> None:
        """Forget the factors: the next product computes them again."""
        super().clear_cache()
        self._blocks, self._factors_key = None, None

    # -- the factors -------------------------------------------------------------------------------------------
    def compute(self) -> None:
        """Compute the factors now (else at the first product); again only after the parameters change."""
        self._sync_with_model()
        key = self._fingerprint()
        if self._blocks is not None and key == self._factors_key:
            return
        self._blocks = None
        self._blocks = self._compute_blocks()
        self._factors_key = key

    def _compute_blocks(self) -> list[KroneckerBlock]:
        """The blocks at the current parameters: one pass over the data for the factors' statistics."""
        return self._make_blocks(self._statistics())

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
            grads = _backward(z, layer_outputs + (leaves if checking else []), chunk)
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
        # Measured against the sum of the terms' magnitudes, so that cancellation (a gradient near zero at a minimum)
        # is not mistaken for a missing use; the tolerance is the square root of the unit roundoff.
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        for layer, a, g in zip(self.layers, rows_in, g_rows):
            a = a.to(g.dtype) if a.is_floating_point() else a
            rebuilt = summed_gradient(layer, a, g)
            magnitude = float(summed_gradient(layer, a.abs() if a.is_floating_point() else a, g.abs()).max())
            actual = {i: (torch.zeros_like(self._params[i]) if leaf_grads[i] is None else leaf_grads[i]).unsqueeze(0)
                      for i in layer.indices}
            expected = layer.to_matrix(actual)[0].to(rebuilt.dtype)
            scale = max(magnitude, float(expected.abs().max()))
            if scale > 0 and float((expected - rebuilt).abs().max()) > tol * scale:
                names = [self.param_names[i] for i in layer.indices]
                raise ValueError(
                    f"the gradient of {names} is not the one module {layer.name!r} computes from its inputs and "
                    "outputs: the parameter is also used outside the module's forward (weight tying, or a functional "
                    "call such as F.linear(h, module.weight)), and K-FAC would miss those uses. Exclude it with "
                    "params=, or use an exact operator."
                )

    def _make_blocks(self, stats: dict[str, Any]) -> list[KroneckerBlock]:
        blocks = [kfac_block(layer, A, G) for layer, A, G in zip(self.layers, stats["A"], stats["G"])]
        if self.diagonal is not None:
            blocks.append(diagonal_block(stats["D"][0]))
        return blocks

    @property
    def parts(self) -> list[Layer | DiagonalPart]:
        """The owners of the blocks, in order (the factored layers, then the exact-diagonal part if any)."""
        return self.layers + ([self.diagonal] if self.diagonal is not None else [])

    # -- products ----------------------------------------------------------------------------------------------
    def _blocks_now(self) -> list[KroneckerBlock]:
        self.compute()
        return self._blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks_now()
        self._check_vector(V)
        return _blockwise(self, blocks, V, lambda block, X: block.matmat(X))

    def higher_precision(self) -> LinearOperator | None:
        """None: the factors are accumulated in float32 or better already."""
        return None

    # -- what the structure makes cheap ----------------------------------------------------------------------
    def inverse(self, damping: float = 0.0, heuristic_damping: bool = False) -> KFACInverse:
        r"""The inverse of the damped operator, as an operator.

        With ``heuristic_damping=False`` it is exactly :math:`(K + \delta I)^{-1}`, through the factors'
        eigendecompositions: :math:`(Q_G \otimes Q_A)(\Lambda_G \otimes \Lambda_A + \delta I)^{-1}(Q_G \otimes
        Q_A)^\top` per block. With ``heuristic_damping=True`` each block is instead
        :math:`(G + \sqrt\delta/\pi\, I)^{-1} \otimes (A + \pi\sqrt\delta\, I)^{-1}` with :math:`\pi^2 =
        (\operatorname{tr} A / d_A) / (\operatorname{tr} G / d_G)` (Martens & Grosse 2015, Sec. 6.3), the
        factored damping of K-FAC optimizers (normalization layers' blocks keep the exact damping).

        Args:
            damping: :math:`\delta \ge 0`.
            heuristic_damping: Use the π-corrected factored damping.

        Returns:
            A symmetric positive definite operator (a :class:`~curvature.operators.KFACInverse`).

        Raises:
            ValueError: On a negative damping, or a singular damped operator (pass a positive ``damping``).
        """
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}.")
        if not isinstance(heuristic_damping, bool):
            raise TypeError(f"heuristic_damping must be True or False, got {heuristic_damping!r}.")
        blocks = self._blocks_now()
        for layer, block in zip(self.parts, blocks):
            if block.smallest_denominator(damping, heuristic_damping) <= 0:
                raise ValueError(
                    f"the damped K-FAC block of {layer.name!r} is singular (a zero eigenvalue{'' if damping else ''}"
                    f"); pass damping > 0 (e.g. damping=1e-3 times the trace over the dimension)."
                )
        return KFACInverse(self, blocks, damping, heuristic_damping)

    def logdet(self, damping: float = 0.0) -> torch.Tensor:
        r""":math:`\log\det(K + \delta I) = \sum_{\text{blocks}} \sum_{ij} \log(\lambda^G_i \lambda^A_j + \delta)`.

        Returns ``-inf`` for a singular operator without damping.
        """
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}.")
        return sum(block.logdet(damping) for block in self._blocks_now()).to(self.dtype)

    def trace(self) -> torch.Tensor:
        r""":math:`\operatorname{tr} K = \sum_{\text{blocks}} \operatorname{tr} G \cdot \operatorname{tr} A`."""
        return sum(block.trace() for block in self._blocks_now()).to(self.dtype)

    def frobenius_norm(self) -> torch.Tensor:
        r""":math:`\|K\|_F = (\sum_{\text{blocks}} \|G\|_F^2 \|A\|_F^2)^{1/2}`."""
        return sum(block.squared_frobenius() for block in self._blocks_now()).sqrt().to(self.dtype)

    def eigh(self) -> list[BlockEigen]:
        """The eigendecomposition of every block (:class:`~curvature.operators.kronecker.blocks.BlockEigen`)."""
        out = []
        for layer, block in zip(self.parts, self._blocks_now()):
            _, qr, _, qc = block.eigen()
            out.append(BlockEigen(layer.name, tuple(self.param_names[i] for i in layer.indices),
                                  block.eigenvalues(), qr, qc))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The factors, by layer name (and the options they were computed with)."""
        return {
            "fisher_type": self.fisher_type, "kfac_approx": self.kfac_approx,
            "blocks": {layer.name: block.state() for layer, block in zip(self.parts, self._blocks_now())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Use saved factors (of the same layers) for the current parameters, instead of computing them.

        Raises:
            ValueError: If the layers, shapes or options differ.
        """
        if not isinstance(state, dict) or "blocks" not in state:
            raise TypeError("state must be a dict returned by state_dict().")
        for option in ("fisher_type", "kfac_approx"):
            if state.get(option) != getattr(self, option):
                raise ValueError(f"the state was computed with {option}={state.get(option)!r}, this operator uses "
                                 f"{getattr(self, option)!r}.")
        names = [layer.name for layer in self.parts]
        if list(state["blocks"]) != names:
            raise ValueError(f"the state holds the layers {list(state['blocks'])}, this operator has {names}.")
        blocks = []
        for layer in self.parts:
            saved = {k: v.to(self.device, self._factor_dtype) for k, v in state["blocks"][layer.name].items()}
            blocks.append(self._block_from_state(layer, saved))
        self._sync_with_model()
        self._blocks, self._factors_key = blocks, self._fingerprint()

    def _block_from_state(self, layer: Layer | DiagonalPart, saved: dict[str, torch.Tensor]) -> KroneckerBlock:
        if layer.kind == "diagonal":
            return diagonal_block(saved["col"].reshape(-1))
        return KroneckerBlock(saved["row"], saved["col"], saved.get("scaling"), heuristic=layer.kind == "kronecker")


class KFACInverse(LinearOperator):
    """The inverse of a damped K-FAC or EK-FAC operator, block by block (see :meth:`curvature.KFACOperator.inverse`)."""

    def __init__(self, op: KFACOperator, blocks: list[KroneckerBlock], damping: float, heuristic: bool) -> None:
        super().__init__(op.shape[0], op.dtype, op.device, is_symmetric=True, is_psd=True)
        self.op, self.blocks, self.damping, self.heuristic = op, blocks, damping, heuristic

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return _blockwise(self.op, self.blocks, V, lambda block, X: block.solve(X, self.damping, self.heuristic))


def _blockwise(op: KFACOperator, blocks: list[KroneckerBlock], V: torch.Tensor,
               apply: Callable[[KroneckerBlock, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``apply(block, X)`` to each layer's part of the columns of ``V``."""
    k = V.shape[1]
    pieces = [c.reshape(k, *s) for c, s in zip(V.T.split(op._sizes, dim=1), op._shapes)]
    out = [None] * len(pieces)
    shapes = dict(enumerate(op._shapes))
    for layer, block in zip(op.parts, blocks):
        X = layer.to_matrix({i: pieces[i] for i in layer.indices}).to(op._factor_dtype)
        Y = apply(block, X).to(V.dtype)
        for i, t in layer.from_matrix(Y, shapes).items():
            out[i] = t
    return torch.cat([t.reshape(k, -1) for t in out], dim=1).T.contiguous()


def _unit_columns(S: torch.Tensor, unit_dims: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The columns of a unit-wise square root ``S`` (``(k, *z.shape)``), one per unit position and column.

    ``S``'s column ``j`` holds the roots of every unit at once; backpropagating it whole would add cross terms
    between the units of a sample, so each unit position gets its own columns.
    """
    z_shape = S.shape[1:]
    positions = [d for d in range(1, len(z_shape)) if d not in unit_dims]
    if not positions:
        yield from S
        return
    for index in itertools.product(*(range(z_shape[d]) for d in positions)):
        mask = torch.zeros(z_shape[1:], dtype=S.dtype, device=S.device)
        where = [slice(None)] * (len(z_shape) - 1)
        for d, i in zip(positions, index):
            where[d - 1] = i
        mask[tuple(where)] = 1
        for column in S:
            yield column * mask


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


def diagonal_block(diagonal: torch.Tensor) -> KroneckerBlock:
    """The exact-diagonal block: both factors diagonal, the row factor the number 1."""
    return KroneckerBlock(torch.ones(1, 1, dtype=diagonal.dtype, device=diagonal.device), diagonal.reshape(1, -1),
                          heuristic=False)


def _backward(z: torch.Tensor, inputs: list[torch.Tensor], columns: list[torch.Tensor]
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


def kfac_block(layer: Layer, A: torch.Tensor, G: torch.Tensor) -> KroneckerBlock:
    """The K-FAC block of a layer from its input statistic ``A`` and gradient statistic ``G``."""
    if layer.kind == "embedding":
        return KroneckerBlock(A, G)
    if layer.kind == "norm":
        copies = A.shape[-1] // G.shape[-1]
        M = A * G.repeat(1, copies, copies)
        return KroneckerBlock(torch.ones(1, 1, 1, dtype=M.dtype, device=M.device), M, heuristic=False)
    return KroneckerBlock(G, A)
