"""The base of every model curvature operator: the subclass contract and the product loop.

A concrete operator implements two hooks for *one* batch, and may override three more:

* ``_prepare(leaves, outputs, targets, index)`` builds what the products of the batch need (an autograd
  graph, kept alive), from ``outputs`` computed by the model with the parameter ``leaves``;
* ``_apply(ctx, vs, last_use=False)`` multiplies ``k`` vectors (one ``(k, *shape)`` tensor per parameter)
  by the batch's curvature through that context;
* optionally ``_check_loss_supported()`` (refuse a loss at construction), ``_known_psd()`` (the
  ``is_psd`` flag) and ``_fresh_product(...)`` (a cheaper one-vector path when no graph is kept).

:class:`~curvature.operators.hessian.HessianOperator` is the example: ten lines. This module brings the rest
of the product: preparing batches (device, constants for autograd), the loop over batches with their weights
(:meth:`CurvatureOperator._local_sum`), kept graphs (:class:`~curvature.operators.graph_cache.GraphCache`), the
float32 view of half-precision models, and the reduction over a process group
(:mod:`curvature.operators.distributed`). Parameter selection and following the model between products are
in :mod:`curvature.operators.guards`; the checks before and during products in
:mod:`curvature.operators.validation`; batches in :mod:`curvature.operators.data`; losses and their weighting
in :mod:`curvature.operators.losses`.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .._checks import check_finite, common_dtype_device
from .._func import model_outputs
from .._modes import autograd_enabled, differentiable_attention, float32_precision, recordable
from .._tree import map_leaves
from .base import HALF, LinearOperator
from .data import Data, batch_size, floating_tensors, tensor_to_device
from .distributed import ShardReduction, all_reduce_product, resolve_process_group, unwrap_model
from .graph_cache import GraphCache
from .guards import (
    OUT_OF_MEMORY,
    ParamsArg,
    _ModelTracking,
    batch_error,
    check_deterministic,
    constant,
    require_graph,
    select_parameters,
    tensor_slots,
)
from .losses import loss_for, resolve_reduction
from .validation import _BatchValidation

__all__ = ["CurvatureOperator", "require_graph", "select_parameters"]


class CurvatureOperator(_ModelTracking, _BatchValidation, LinearOperator):
    """Base class for curvature operators of ``loss_fn(model(inputs), targets)`` over ``data``.

    The operator acts on flat vectors over the selected parameters, concatenated in
    ``model.parameters()`` order. With ``reduction="mean"`` the batch products are weighted by their
    share of the loss's normalizer, so the operator is exactly the curvature of the mean loss over all
    data, whatever the batch sizes; with ``"sum"`` they are added.

    Args:
        model: The model; its parameters, buffers, ``.grad``, mode and the RNG are left untouched.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        data: One ``(inputs, targets)`` batch or a re-iterable of them (list, ``DataLoader``).
        params: None (all trainable parameters) or an iterable of parameters or names.
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces a batch. Inferred from
            ``loss_fn.reduction``, or for other callables from the first batch.
        keep_graph: Keep each batch's autograd graph between products so that a product costs one or
            two backward passes instead of a full forward-backward-backward. Default: True for a single
            batch, False for an iterable (memory would grow with the data). Graphs are rebuilt when the
            parameters or buffers change, in place or through ``p.data``.
        vectorize: Push the ``k`` columns of a ``matmat`` through the graph at once (vmap) instead of in
            a loop. Default: True on accelerators, False on CPU, where the loop measured faster.
        process_group: Data-parallel curvature over ``torch.distributed`` ranks. None (default): this
            process's ``data`` is all the data. ``"auto"``: the group of a ``DistributedDataParallel``
            model, else the default group, when ``torch.distributed`` is initialized (else None). Or a
            ``ProcessGroup``. Each rank passes its own shard as ``data`` (a loader with a
            ``DistributedSampler`` or any per-rank iterable; a rank's shard may be empty) and the operator
            is the curvature of the loss over the union of the shards: each product all-reduces the
            ranks' weighted partial products once (``ShardReduction``).
            Every rank must build the operator and multiply the same vectors together, as with any
            collective; estimators then need identically seeded generators on every rank. A
            ``DistributedSampler`` pads shards with repeated samples unless ``drop_last=True`` or the data
            divides evenly: the union then counts those samples twice.
        verify: Checks that read values on the host at every product: the kept graphs are keyed on the
            parameters' contents as well as their version counters (catching writes through ``p.data``),
            every product is checked finite, and in a process group a rank whose vector differs raises.
            Default: True on CPU, False on accelerators, where each such read stalls the device queue;
            without them, call :meth:`clear_cache` after writing parameters through ``.data``, and a
            vector that differs between ranks turns the product into NaN instead of raising.
        allow_tf32: Let float32 products on CUDA use TensorFloat-32 matmuls and convolutions (faster on
            Ampere and later GPUs, about 1e-3 relative error). Off by default, whatever the global flags say
            (PyTorch enables it for cuDNN convolutions by default); the flags are restored after each product.

    Raises:
        TypeError: On a model that is not a module, a loss that is not callable, bad data or mixed dtypes.
        ValueError: On an empty selection, empty data, a non-scalar or non-finite loss, mismatched
            targets, or a model whose train-mode layers make the curvature random.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        params: ParamsArg = None,
        *,
        reduction: str | None = None,
        keep_graph: bool | None = None,
        vectorize: bool | None = None,
        process_group: Any = None,
        verify: bool | None = None,
        allow_tf32: bool = False,
    ) -> None:
        wrapper = model
        model, wrapper_group = unwrap_model(model)
        if model is not wrapper and params is not None and not isinstance(params, (str, torch.Tensor, nn.Module)):
            params = [p.removeprefix("module.") if isinstance(p, str) else p for p in params]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        lazy = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if is_lazy(t)]
        if lazy:
            raise ValueError(
                f"the model's {lazy[:3]}{' ...' if len(lazy) > 3 else ''} are not initialized yet (lazy modules such "
                "as nn.LazyLinear): run one forward pass of the model first, then build the operator."
            )
        inference = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_inference()]
        if inference:
            raise ValueError(
                f"the model's {inference[:3]}{' ...' if len(inference) > 3 else ''} are inference tensors: they were "
                "created under torch.inference_mode() and can never be differentiated. Create (or load) the model "
                "outside inference mode; the operators compute correctly when called under inference mode."
            )
        self.model = model
        self.loss_fn = loss_fn
        self._loss_object = loss_for(loss_fn)  # what the operators know of the loss: closed forms, counts, checks
        named = select_parameters(model, params)
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        dtype, device = common_dtype_device(self._params, "the selected parameters")
        check_deterministic(model)
        self._data = Data(data)
        # Where the model registers its parameters and buffers: the tensors whose changes invalidate kept
        # graphs, rebound by name if the objects are replaced (e.g. load_state_dict(assign=True)).
        self._slots = tensor_slots(model)
        self._modules_list = list(model.modules())
        self._modes = tuple(m.training for m in self._modules_list)
        self.reduction = resolve_reduction(loss_fn, reduction)
        self._check_loss_supported()
        self._sizes = [p.numel() for p in self._params]
        self._shapes = [p.shape for p in self._params]
        super().__init__(sum(self._sizes), dtype, device, is_symmetric=True,
                         is_psd=self._known_psd())
        for flag, value in (("keep_graph", keep_graph), ("vectorize", vectorize), ("verify", verify)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{flag} must be True, False or None (automatic), got {value!r}.")
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be True or False, got {allow_tf32!r}.")
        self.allow_tf32 = allow_tf32
        self.keep_graph = self._data.single if keep_graph is None else keep_graph
        self.vectorize = self.device.type != "cpu" if vectorize is None else vectorize
        self.verify = self.device.type == "cpu" if verify is None else verify
        self.process_group = resolve_process_group(process_group, wrapper_group)
        self._shards = ShardReduction(self.process_group, self.device) if self.process_group is not None else None
        self._additive: set[int] = set()  # batches whose weighting check_additive has confirmed
        self._sample_shape: tuple[int, ...] | None = None  # outputs per sample, where the weighting depends on it
        self._compute_dtype: torch.dtype | None = None  # float32 inside the products of higher_precision()
        self._graphs = GraphCache()
        self._validate()


    #: The operator's name in the registry (``operator="..."`` in :func:`curvature.sharpness`, the monitor and
    #: the command) and its title in plots and reports; see :mod:`curvature.operators.registry`.
    name: ClassVar[str]
    title: ClassVar[str]

    # -- hooks for subclasses ----------------------------------------------------------------------
    def _check_loss_supported(self) -> None:
        """Raise if this operator cannot be built for ``self.loss_fn`` (default: any loss works)."""

    def _known_psd(self) -> bool:
        return False

    @abstractmethod
    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        """Build what the products of one batch need, from outputs computed with ``leaves``."""

    @abstractmethod
    def _apply(self, ctx: Any, vs: list[torch.Tensor], last_use: bool = False) -> list[torch.Tensor]:
        """Return the batch curvature times ``vs`` (one ``(k, *shape)`` tensor per parameter).

        With ``last_use`` the context is not used again (no kept graphs): its graph may be freed on the way.
        """

    def _fresh_product(self, leaves: list[torch.Tensor], inputs: Any, targets: Any, index: int,
                       vs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Optionally, a cheaper path for one vector when no graph is kept: the product and the detached outputs.

        Returns None to use the default (:meth:`_prepare` then :meth:`_apply`).
        """
        return None

    def _batch_weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """The batch's share of the normalizer of a mean loss."""
        return self._loss_object.mean_count(targets, inputs, outputs)

    #: Whether batches are weighted by the loss's own count (checked with ``check_additive``); False for an
    #: operator defined through per-sample losses, whose weights are sample counts whatever the loss averages.
    _weights_by_loss = True

    # -- batches -------------------------------------------------------------------------------------
    def _prepare_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Move a batch to the device; constants for autograd (detached, and normal copies of inference tensors).

        One walk over each tree; for a float32 product of a half-precision model (``_compute_dtype``) the floating
        data is cast too.
        """
        cast = self._compute_dtype

        def leaf(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            t = constant(tensor_to_device(t, self.device))
            return t.to(cast) if cast is not None and t.is_floating_point() else t

        inputs, targets = map_leaves(leaf, inputs), map_leaves(leaf, targets)
        if cast is not None:
            return inputs, targets
        for t in floating_tensors(inputs):
            if t.dtype != self.dtype:
                raise TypeError(
                    f"the inputs have dtype {t.dtype} but the model's parameters have {self.dtype}; convert "
                    f"the data (e.g. x.to({self.dtype})) or the model."
                )
        return inputs, targets

    def _state(self, leaves: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = {n: p.detach() for n, p in self.model.named_parameters()}
        state.update(self.model.named_buffers())
        if self._compute_dtype is not None:
            state = {n: t.to(self._compute_dtype) if t.is_floating_point() else t for n, t in state.items()}
        if leaves is not None:
            state.update(zip(self.param_names, leaves))
        return state

    def _loss(self, outputs: torch.Tensor, targets: Any, index: int) -> torch.Tensor:
        """``loss_fn(outputs, targets)`` of batch ``index``; an error names the batch."""
        try:
            return self.loss_fn(outputs, targets)
        except OUT_OF_MEMORY:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise batch_error(err, f"batch {index} of data: loss_fn(outputs, targets) raised") from err

    def _forward(self, where: str, state: dict[str, torch.Tensor], inputs: Any) -> Any:
        """Call the model functionally; an error of its forward pass names the batch."""
        try:
            return model_outputs(self.model, state, inputs)
        except OUT_OF_MEMORY:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise batch_error(err, f"{where} does not fit the model: its forward pass raised") from err

    def _weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        return self._batch_weight(targets, inputs, outputs) if self.reduction == "mean" else 1.0

    def _leaves(self) -> list[torch.Tensor]:
        """Fresh leaves sharing storage with the selected parameters: the graph never reaches the model."""
        if self._compute_dtype is not None:  # float32 copies, for higher_precision()
            return [p.detach().to(self._compute_dtype).requires_grad_(True) for p in self._params]
        return [p.detach().requires_grad_(True) for p in self._params]

    def _context(self, index: int, inputs: Any, targets: Any, leaves: list[torch.Tensor]) -> tuple[Any, float]:
        """What the products of one batch need (:meth:`_prepare`), and the batch's weight."""
        with torch.enable_grad():
            outputs = self._forward(f"batch {index} of data", self._state(leaves), inputs)
            self._check_batch(index, outputs, targets, inputs)
            return self._prepare(leaves, outputs, targets, index), self._weight(targets, inputs, outputs.detach())

    def _kept_contexts(self) -> Iterable[tuple[Any, float]]:
        return self._graphs.contexts(self._fingerprint(), self._build_contexts)

    def _fresh_batches(self) -> Iterator[tuple[int, Any, Any, list[torch.Tensor]]]:
        """Each non-empty batch of a pass over the data, prepared: ``(index, inputs, targets, fresh leaves)``.

        The pass is counted (``Data.count_pass``) when it is complete.
        """
        batches = 0
        for index, batch in enumerate(self._data):
            if batch_size(batch[0]) == 0:  # an empty batch adds nothing
                continue
            inputs, targets = self._prepare_batch(*batch)
            batches += 1
            yield index, inputs, targets, self._leaves()
        self._data.count_pass(batches)

    def _build_contexts(self) -> Iterable[tuple[Any, float]]:
        with self._rng_preserved():
            for index, inputs, targets, leaves in self._fresh_batches():
                yield self._context(index, inputs, targets, leaves)

    def _batch_products(self, vs: list[torch.Tensor]) -> Iterable[tuple[list[torch.Tensor], float]]:
        """Yield each batch's curvature times ``vs`` with the batch's weight."""
        if self.keep_graph:
            for ctx, weight in self._kept_contexts():
                yield self._apply(ctx, vs), weight
            return
        with self._rng_preserved():
            yield from self._fresh_batch_products(vs)

    def _fresh_batch_products(self, vs: list[torch.Tensor]) -> Iterable[tuple[list[torch.Tensor], float]]:
        single = vs[0].shape[0] == 1
        for index, inputs, targets, leaves in self._fresh_batches():
            fresh = self._fresh_product(leaves, inputs, targets, index, vs) if single else None
            if fresh is None:
                ctx, weight = self._context(index, inputs, targets, leaves)
                columns = self._apply(ctx, vs, last_use=True)
            else:
                columns, outputs = fresh
                weight = self._weight(targets, inputs, outputs)
            yield columns, weight

    # -- the product ---------------------------------------------------------------------------------
    def _local_sum(self, pairs: Iterable[tuple[list[torch.Tensor], float]],
                   k: int) -> tuple[torch.Tensor | None, float | None, float, int]:
        """Sum this process's weighted batch results: ``(sum, first_weight, weight_sum, batches)``.

        ``pairs`` yields each batch's columns and weight (``_batch_products`` or ``_batch_gradients``). The
        scaling is deferred: while ``first_weight`` is not None, ``sum`` is the first batch's product still
        unscaled (one batch needs no scaling at all); ``sum`` is None for data without a batch.
        """
        total: torch.Tensor | None = None
        first_weight: float | None = None
        weight_sum, batches = 0.0, 0
        with torch.enable_grad():
            for columns, weight in pairs:
                # Products come out of autograd.grad without a graph: no no_grad() needed here.
                flat = torch.cat([c.reshape(k, -1) for c in columns], dim=1) if len(columns) > 1 \
                    else columns[0].reshape(k, -1)
                if total is None:
                    total, first_weight = flat, weight
                else:
                    if first_weight is not None:
                        total = total.mul(first_weight)
                        first_weight = None
                    total.add_(flat, alpha=weight)
                weight_sum += weight
                batches += 1
        return total, first_weight, weight_sum, batches

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._sync_with_model()
        with autograd_enabled():  # under torch.no_grad() or torch.inference_mode() too
            return self._product(recordable(V))

    def higher_precision(self) -> LinearOperator | None:
        """This operator with its products computed in float32, for a float16 or bfloat16 model (else None).

        Each product casts the parameters, buffers and floating data to float32 on the fly (the model's own
        tensors are untouched) and uses no kept graph: the curvature of the same model, free of the rounding of
        a half-precision forward and backward pass, at about twice the cost of a half-precision product. The
        estimators use it to certify half-precision results with a few products
        (:func:`curvature.eigenvalues`, :func:`curvature.solve`). None also when ``loss_fn`` is a module with
        half-precision tensors of its own (a ``weight=``), which a float32 product cannot use.

        Returns:
            A float32 :class:`~curvature.operators.base.LinearOperator`, or None.
        """
        if self.dtype not in HALF:
            return None
        if isinstance(self.loss_fn, nn.Module) and any(
            t.is_floating_point() and t.dtype != torch.float32
            for t in itertools.chain(self.loss_fn.parameters(), self.loss_fn.buffers())
        ):
            return None
        return _Float32Products(self)

    def _float32_product(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a float32 ``(P, k)`` matrix, with everything cast to float32 (see :meth:`higher_precision`)."""
        self._sync_with_model()
        saved = self._compute_dtype, self.keep_graph
        self._compute_dtype, self.keep_graph = torch.float32, False
        try:
            with autograd_enabled():
                return self._product(recordable(V))
        finally:
            self._compute_dtype, self.keep_graph = saved

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        vs = [chunk.reshape(k, *shape) for chunk, shape in zip(V.T.split(self._sizes, dim=1), self._shapes)]
        if self._shards is None:
            self._check_vector(V)
        check = self._check_vector if self._shards is not None else None
        return self._weighted_total(lambda: self._batch_products(vs), V, check, "the curvature product").T.contiguous()

    def _weighted_total(self, pairs: Callable[[], Iterable[tuple[list[torch.Tensor], float]]], V: torch.Tensor,
                        check: Callable[[torch.Tensor], None] | None, what: str) -> torch.Tensor:
        """The weighted sum over the data of the batch results ``pairs()``, ``(k, P)``, normalized like the loss.

        ``V`` (``(P, k)``) is what every rank of a process group must share (its digest is compared); ``check``
        runs on it inside the error handling of a process group.
        """
        error: Exception | None = None
        dtype = self._compute_dtype or self.dtype
        with float32_precision(self.device, dtype, self.allow_tf32), differentiable_attention():
            try:
                if check is not None:
                    check(V)
                total, first_weight, weight_sum, batches = self._local_sum(pairs(), V.shape[1])
            except Exception as err:
                if self._shards is None:
                    raise
                error, total, first_weight, weight_sum, batches = err, None, None, 0.0, 0
        if self._shards is None:
            self._check_totals(weight_sum, batches, "")
            if first_weight is None and self.reduction == "mean":
                total = total.div_(weight_sum)
        else:
            total = self._reduce(total, first_weight, weight_sum, batches, V, error)
        if self.verify:
            check_finite(
                total, what,
                "the loss or its derivatives are not finite at these parameters; check the data and the "
                "model's outputs (a log of 0?), or compute in float64.",
            )
        return total

    # -- the gradient --------------------------------------------------------------------------------
    def gradient(self) -> torch.Tensor:
        r"""The gradient of the loss over the whole data at the current parameters, as a flat vector ``(P,)``.

        .. math:: g = \nabla_\theta L(\theta), \qquad L = \frac{\sum_b w_b L_b}{\sum_b w_b}

        for a mean loss (each batch weighted by the loss's own count, as the operator weights its products;
        ``L = Σ_b L_b`` for a summed one), over the selected parameters in flat-vector order, in the operator's
        dtype. It costs one forward and one backward pass over the data and no product (``num_matvecs`` is
        unchanged); the Hessian with ``keep_graph`` reads each batch's gradient from its kept graph instead,
        without a pass once the graphs are built (by an earlier product at the same parameters). In a process
        group the ranks' gradients are all-reduced once, as a product is. The model is left unchanged (its
        ``.grad`` included).

        Returns:
            The gradient, ``(P,)``.

        Raises:
            ValueError: If the loss or its gradient is not finite (with ``verify``), or what a product raises
                about the data.
        """
        self._sync_with_model()
        shared = torch.zeros(self.shape[0], 1, dtype=self.dtype, device=self.device)  # the same on every rank
        with autograd_enabled():
            return self._weighted_total(self._batch_gradients, shared, None, "the gradient")[0]

    def _batch_gradients(self) -> Iterable[tuple[list[torch.Tensor], float]]:
        """Yield each batch's loss gradient (one ``(1, *shape)`` tensor per parameter) with the batch's loss weight.

        One forward and one backward pass per batch; subclasses whose kept graphs hold the gradient override it.
        """
        with self._rng_preserved():
            for index, inputs, targets, leaves in self._fresh_batches():
                with torch.enable_grad():
                    outputs = self._forward(f"batch {index} of data", self._state(leaves), inputs)
                    self._check_batch(index, outputs, targets, inputs)
                    loss = self._loss(outputs, targets, index)
                    require_graph(loss, "the loss", outputs)
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                yield self._gradient_columns(leaves, grads), self._loss_weight(targets, inputs, outputs.detach())

    @staticmethod
    def _gradient_columns(leaves: list[torch.Tensor], grads: Iterable[torch.Tensor | None]) -> list[torch.Tensor]:
        """One batch's gradient as ``(1, *shape)`` columns, detached; zeros for parameters the loss does not use."""
        return [(torch.zeros_like(leaf) if g is None else g.detach()).unsqueeze(0) for leaf, g in zip(leaves, grads)]

    def _loss_weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """The batch's share of the loss's own normalizer (whatever the operator weights its products by)."""
        return self._loss_object.mean_count(targets, inputs, outputs) if self.reduction == "mean" else 1.0

    def _reduce(self, total: torch.Tensor | None, first_weight: float | None, weight_sum: float, batches: int,
                V: torch.Tensor, error: Exception | None) -> torch.Tensor:
        """All-reduce this rank's weighted partial product over the process group and normalize it.

        A rank whose products raised (``error``) joins the all-reduce with a failure flag, then raises its
        own error; with ``verify`` the other ranks raise naming it, without it their product is NaN
        (:func:`~curvature.operators.distributed.all_reduce_product`).
        """
        total, totals = all_reduce_product(self._shards, total, first_weight, weight_sum, batches, V,
                                           failed=error is not None, verify=self.verify)
        if error is not None:
            raise error
        # The global weight and batch count are read on the host (one synchronisation) only when they can
        # have changed: at every product over a loader, once per set of kept graphs.
        graphs = self._graphs
        if not (self.keep_graph and graphs.complete and graphs.checked_key == graphs.key):
            global_weight, global_batches = totals.tolist()
            self._check_totals(global_weight, global_batches, " on every rank of the process group")
            graphs.checked_key = graphs.key if self.keep_graph else None
        return total.div_(totals[0]) if self.reduction == "mean" else total

    def clear_cache(self) -> None:
        """Free the kept autograd graphs; the next product rebuilds them."""
        self._graphs.clear()

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The selected parameters (the model's own tensors, named by ``param_names``), in flat-vector order."""
        return tuple(self._params)


class _Float32Products(LinearOperator):
    """A half-precision curvature operator with its products computed in float32 (:meth:`higher_precision`)."""

    def __init__(self, op: CurvatureOperator) -> None:
        super().__init__(op.shape[0], torch.float32, op.device, is_symmetric=op.is_symmetric, is_psd=op.is_psd)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op._float32_product(V)
        self.op.num_matvecs += V.shape[1]  # products of the same operator: counted there too
        return out
