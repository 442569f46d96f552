"""The base of every model curvature operator: parameters, data, weighting, graph reuse, safety.

A concrete operator implements two hooks for *one* batch: :meth:`CurvatureOperator._prepare` builds what
the products need (an autograd graph, kept alive) and :meth:`CurvatureOperator._apply` multiplies ``k``
vectors through it. This class brings everything else: choosing and flattening parameters, validating
the model and the first batch before any real work, iterating the data and weighting uneven batches,
caching the per-batch graphs while the parameters are unchanged, and leaving the model exactly as it was.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_map

from .._checks import check_finite, common_dtype_device, no_graph_reason
from .._func import model_outputs
from .._modes import autograd_enabled, differentiable_attention, float32_precision, recordable
from .base import HALF, LinearOperator
from .data import (
    Data,
    ShardReduction,
    batch_size,
    floating_tensors,
    resolve_process_group,
    split_batch,
    to_device,
    unwrap_model,
)
from .losses import (
    check_additive,
    check_targets,
    infer_reduction,
    known_count,
    loss_kind,
    mean_count,
    resolve_reduction,
)

__all__ = ["CurvatureOperator", "select_parameters"]

ParamsArg = Optional[Iterable[Any]]


def select_parameters(model: nn.Module, params: ParamsArg) -> list[tuple[str, nn.Parameter]]:
    """Resolve ``params`` to ``(name, parameter)`` pairs in ``model.parameters()`` order.

    Args:
        model: The model.
        params: None for every trainable parameter; an iterable of parameters, parameter names or
            ``(name, parameter)`` pairs (``module.parameters()``, ``module.named_parameters()``); or a submodule
            of ``model``, for its trainable parameters.

    Returns:
        The selected named parameters.

    Raises:
        ValueError: If a name or tensor is not a trainable parameter of ``model``, is named twice, or the
            selection is empty.
        TypeError: If ``params`` is a single string or holds something that is neither a name nor a tensor.
    """
    named = list(model.named_parameters())
    if params is None:
        selected = [(n, p) for n, p in named if p.requires_grad]
        if not selected:
            raise ValueError("the model has no trainable parameters (every requires_grad is False).")
        return selected
    if isinstance(params, (str, torch.Tensor)):
        raise TypeError("params must be an iterable of parameters or names, e.g. ['fc.weight'] or [model.fc.weight].")
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
        if not params:
            raise ValueError("params is a module without trainable parameters; name the parameters to take.")
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    aliases = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}  # tied weights
    chosen: set[str] = set()
    for item in params:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            item = item[1]  # a (name, parameter) pair of named_parameters(): its name may be a submodule's
        if isinstance(item, str):
            item = aliases.get(item, item)  # a tied weight's second name means its first
            if item not in by_name:
                raise ValueError(
                    f"params names {item!r}, which is not a parameter of the model; its parameters are "
                    f"{[n for n, _ in named][:12]}{' ...' if len(named) > 12 else ''}."
                )
            name = item
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError("params holds a tensor that is not a parameter of the model.")
            name = by_id[id(item)]
        else:
            raise TypeError(
                f"params entries must be parameter names or tensors, got {type(item).__name__}; pass e.g. "
                "model.fc.parameters(), ['fc.weight'] or the submodule model.fc."
            )
        if not by_name[name].requires_grad:
            raise ValueError(
                f"params names {name!r}, which is frozen (requires_grad=False) and so not a trainable "
                "parameter; leave it out, or unfreeze it with requires_grad_(True)."
            )
        if name in chosen:
            raise ValueError(f"params names {name!r} twice.")
        chosen.add(name)
    if not chosen:
        raise ValueError("params is empty; pass None for every trainable parameter.")
    return [(n, p) for n, p in named if n in chosen]


def check_deterministic(model: nn.Module) -> None:
    """Refuse a model whose train-mode layers would make the curvature random or change its buffers.

    Args:
        model: The model.

    Raises:
        ValueError: If a dropout layer with ``p > 0`` or a batch-norm layer is in training mode.
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        label = f"{name or 'the model'} ({type(module).__name__})"
        if isinstance(module, _DropoutNd) and module.p > 0:
            raise ValueError(
                f"{label} is in training mode and drops units at random, so the curvature would be random; "
                "call model.eval() first (curvature never changes the mode for you)."
            )
        if isinstance(module, _BatchNorm):
            raise ValueError(
                f"{label} is in training mode: it normalizes with batch statistics and updates its running "
                "statistics on every forward pass; call model.eval() first."
            )


def check_batch_statistics(model: nn.Module) -> None:
    """Refuse batch-norm layers without running statistics, for curvature over several batches.

    Such a layer (``track_running_stats=False``) normalizes every batch with that batch's own statistics, in eval
    mode too, so the curvature over several batches would depend on how the data is batched. Over one batch it
    is the curvature of that batch's loss as written, which is well defined: this check is for several.

    Args:
        model: The model.

    Raises:
        ValueError: If the model holds one.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.running_mean is None and module.running_var is None:
            raise ValueError(
                f"{name or 'the model'} ({type(module).__name__}) has no running statistics "
                "(track_running_stats=False), so even in eval mode it normalizes each batch with that batch's own "
                "statistics: the curvature over several batches would depend on how the data is batched. Pass the "
                "data as one (inputs, targets) batch, or use a normalization whose outputs do not depend on the "
                "other samples (track_running_stats=True with estimated statistics, GroupNorm, LayerNorm)."
            )


def require_graph(t: torch.Tensor, what: str, *sources: torch.Tensor) -> None:
    """Refuse a tensor that does not depend on the parameters (detached, or built from constants).

    Args:
        t: The tensor computed from the parameter leaves.
        what: Its name for the message.
        sources: Tensors it was computed from (the model's outputs), inspected for the cause.

    Raises:
        ValueError: If ``t`` carries no autograd graph.
    """
    if not t.requires_grad:
        cause = next((s for s in sources if isinstance(s, torch.Tensor) and s.is_inference()), t)
        verb = "do" if what.endswith("s") else "does"
        raise ValueError(
            f"{what} {verb} not depend on the selected parameters: {no_graph_reason(cause)} (in the model or "
            "loss_fn); curvature needs them differentiable."
        )


def _tensor_slots(model: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Where each parameter and buffer is registered: checking these is a cheap replacement test."""
    slots = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            slots.extend((store, key, t) for key, t in store.items() if t is not None)
    return slots


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def batch_error(error: Exception, where: str) -> Exception:
    """An error that names the batch it came from (a ``TypeError`` stays one, anything else becomes a ``ValueError``).

    Args:
        error: What the model or the loss raised.
        where: The batch and the step, e.g. "batch 3 of data: the model's forward pass raised".

    Returns:
        The new exception, to be raised ``from error``.
    """
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = f"{where} {type(error).__name__}: {first}"
    return TypeError(message) if isinstance(error, TypeError) else ValueError(message)


def _constant(t: Any) -> Any:
    """A batch tensor as a constant for autograd: detached, and a normal copy if made under inference mode."""
    return recordable(t.detach()) if isinstance(t, torch.Tensor) else t


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class CurvatureOperator(LinearOperator):
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
        self._kind = loss_kind(loss_fn)
        named = select_parameters(model, params)
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        dtype, device = common_dtype_device(self._params, "the selected parameters")
        check_deterministic(model)
        self._data = Data(data)
        # Where the model registers its parameters and buffers: the tensors whose changes invalidate kept
        # graphs, rebound by name if the objects are replaced (e.g. load_state_dict(assign=True)).
        self._slots = _tensor_slots(model)
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
        self._cache: list[tuple[Any, float]] = []
        self._cache_complete = False
        self._cache_key: tuple[Any, ...] | None = None
        self._checked_key: tuple[Any, ...] | None = None  # the kept graphs whose global totals were checked
        self._validate()

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
        return mean_count(self._kind, self.loss_fn, targets, inputs, outputs)

    #: Whether batches are weighted by the loss's own count (checked with ``check_additive``); False for an
    #: operator defined through per-sample losses, whose weights are sample counts whatever the loss averages.
    _weights_by_loss = True

    # -- batches -------------------------------------------------------------------------------------
    def _prepare_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Move a batch to the device; constants for autograd (detached, and normal copies of inference tensors)."""
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        inputs, targets = tree_map(_constant, inputs), tree_map(_constant, targets)
        if self._compute_dtype is not None:  # a float32 product of a half-precision model: the data too
            cast = self._compute_dtype
            return tuple(tree_map(lambda t: t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                  else t, part) for part in (inputs, targets))  # type: ignore[return-value]
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

    def _sync_with_model(self) -> None:
        """Follow the model between products: replaced tensors and train/eval switches.

        A parameter or buffer *object* replaced since the last product is picked up by name (its shape,
        dtype and device must not change). A changed train/eval mode re-runs the checks of construction,
        so that switching to ``model.train()`` with dropout or batch norm is refused, never silently used.

        Raises:
            ValueError: If a selected parameter disappeared or changed shape, dtype or device, or the new
                mode makes the curvature random or changes the model.
        """
        if any(store.get(key) is not tensor for store, key, tensor in self._slots):
            named = dict(self.model.named_parameters())
            missing = [n for n in self.param_names if n not in named]
            if missing or any(named[n].shape != shape for n, shape in zip(self.param_names, self._shapes)):
                raise ValueError(
                    f"the model's parameters {missing or self.param_names} were removed or reshaped since this "
                    "operator was built; build a new operator."
                )
            params = [named[n] for n in self.param_names]
            if common_dtype_device(params, "the selected parameters") != (self.dtype, self.device):
                raise ValueError("the model's parameters changed dtype or device; build a new operator.")
            self._params, self._slots = params, _tensor_slots(self.model)
            self.clear_cache()
        changed = next((p for p in self._params if p.dtype != self.dtype or p.device != self.device), None)
        if changed is not None:  # model.double() / .to(...) convert the parameters in place
            raise ValueError(
                f"the model's parameters are now {changed.dtype} on {changed.device}, but this operator was built for "
                f"{self.dtype} on {self.device} (model.double(), .half() or .to() since?); build a new operator."
            )
        modes = tuple(m.training for m in self._modules_list)
        if modes != self._modes:
            check_deterministic(self.model)
            self._validate()
            self._modes = modes
            self.clear_cache()

    def _versions(self) -> tuple[Any, ...]:
        return tuple(t._version for _, _, t in self._slots)

    def _fingerprint(self) -> tuple[Any, ...]:
        """Version and content sum of every parameter and buffer: the key of the kept graphs.

        Versions catch in-place updates (optimizers, ``load_state_dict``); the sums also catch writes
        through ``p.data``, which bypass version counters. One O(P) reduction per product, read on the
        host: only with ``verify`` (see the class docstring). Replaced tensor objects and mode switches are
        handled before, by :meth:`_sync_with_model`.
        """
        if not self.verify:
            return self._versions(), None
        with torch.no_grad():
            sums = torch.stack([t.sum().to(self.dtype) for _, _, t in self._slots if t.numel()])
        return self._versions(), tuple(sums.tolist())

    def _rng_preserved(self) -> Any:
        """Restore the global RNG after iterating the data (a DataLoader draws its seed from it).

        Only the data iteration is wrapped: products through complete kept graphs skip the cost.
        """
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _validate_first_batch(self) -> None:
        versions_before = self._versions()
        buffers_before = {n: b.clone() for n, b in self.model.named_buffers()}
        with self._rng_preserved():  # the global RNG is restored on the way out, whatever happens
            first = self._data.first()
            self._data.check_fixed(first)
            inputs, targets = self._prepare_batch(*first)
            rng_before = _rng_state(self.device)
            with torch.no_grad():
                outputs = self._forward("the first batch of data", self._state(), inputs)
            draws_random = any(not torch.equal(a, b) for a, b in zip(rng_before, _rng_state(self.device)))
        if draws_random:
            raise ValueError(
                "the model's forward pass draws random numbers, so its curvature would be random; make it "
                "deterministic (model.eval(), no noise layers) before building a curvature operator."
            )
        if self._versions() != versions_before:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(buffers_before[name])
            raise ValueError(
                "the model's forward pass modifies its parameters or buffers (running statistics?); call "
                "model.eval() so that computing curvature leaves the model unchanged."
            )
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(outputs).__name__}.")
        if not outputs.is_floating_point():
            raise TypeError(f"the model returned {outputs.dtype} outputs; curvature needs floating-point outputs.")
        if outputs.ndim and outputs.shape[0] == 0:
            raise ValueError("the first batch of data holds no samples.")
        check_targets(self._kind, self.loss_fn, outputs, targets)
        if self.reduction == "mean" and self._kind != "other" and self._batch_weight(targets, inputs, outputs) == 0:
            raise ValueError("every target of the first batch is ignored (ignore_index), so its mean loss is 0/0.")
        with torch.no_grad():
            try:
                loss = self.loss_fn(outputs, targets)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise batch_error(err, "the first batch of data: loss_fn(outputs, targets) raised") from err
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}.")
        if not loss.is_floating_point():
            raise TypeError(
                f"loss_fn returned a {loss.dtype} tensor; curvature needs a floating-point loss (one that can be "
                "differentiated), e.g. without .long(), .argmax() or a count."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}; reduce the batch with "
                "'mean' or 'sum'."
            )
        check_finite(loss, "the loss on the first batch", "check the model's outputs and the data for NaN/Inf.")
        if self.reduction is None:
            inferred = infer_reduction(self.loss_fn, outputs, targets) if self._kind == "other" else None
            if inferred is None and not self._data.single:
                raise ValueError(
                    "cannot tell whether loss_fn averages or sums over a batch (the first batch has one "
                    "sample); pass reduction='mean' or reduction='sum'."
                )
            self.reduction = inferred or "mean"
        if self.reduction == "mean" and self._kind == "other" and self._batch_weight(targets, inputs, outputs) == 0:
            raise ValueError("the first batch's count (loss_fn.normalizer) is 0, so its mean loss is 0/0.")
        if not self._data.single or self._shards is not None:  # several batches: the batching must not matter
            self._check_samples_independent(inputs, outputs)
            if self._kind == "other" and self._weights_by_loss:
                check_additive(self.loss_fn, outputs, targets, inputs, self.reduction, "the first batch of data")
                if self.reduction == "mean" and not known_count(self.loss_fn):
                    self._sample_shape = tuple(outputs.shape[1:])

    def _check_samples_independent(self, inputs: Any, outputs: torch.Tensor) -> None:
        """Refuse a model whose outputs for a sample depend on the other samples of its batch.

        Such a model (a layer with batch statistics, attention across the batch) has a curvature that depends on
        how the data is batched, which an operator over several batches must not. Batch-norm layers without
        running statistics are refused by name (:func:`check_batch_statistics`); for any other model the first
        half of the first batch is run alone (no graph) and its outputs compared with the first half of the whole
        batch's, to the rounding of the dtype. Inputs that are not batch-first (a sequence-first transformer or
        RNN) show the same dependence along their first dimension and are refused too: nothing tells them apart
        from a model that mixes the samples of a batch, and accepting one of those would be silently wrong. A batch
        that cannot be split, or a model that cannot take half of it, is not checked.

        Raises:
            ValueError: If the outputs differ.
        """
        check_batch_statistics(self.model)
        change = self._half_batch_change(inputs, outputs)
        if change is None or change[0] <= change[1]:
            return
        n = outputs.shape[0]
        raise ValueError(
            f"the model's outputs for the first {n // 2} samples of the first batch change (by {change[0]:.3g}, "
            f"allowed {change[1]:.3g}) when the rest of the batch is left out: a sample's outputs depend on the "
            "other samples of its batch (a layer with batch statistics, attention across the batch, or inputs "
            "that are not batch-first, such as nn.Transformer or nn.LSTM without batch_first=True), so the "
            "curvature over several batches would depend on how the data is batched. Pass the data as one "
            "(inputs, targets) batch, or make the samples independent along the first dimension (batch_first=True, "
            "eval-mode normalization with running statistics)."
        )

    def _half_batch_change(self, inputs: Any, outputs: torch.Tensor) -> tuple[float, float] | None:
        """How much the first half of the batch changes when run alone: ``(change, allowed)``.

        None when the batch cannot be split by samples or the model cannot take the half.
        """
        if outputs.ndim == 0:
            return None
        n = outputs.shape[0]
        ok, part = split_batch(inputs, 0, n // 2, n)
        if n < 2 or not ok:
            return None
        try:
            with torch.no_grad(), self._rng_preserved():
                alone = model_outputs(self.model, self._state(), part)
        except (RuntimeError, ValueError, TypeError, IndexError):  # the model needs the whole batch: cannot tell
            return None
        together = outputs[: n // 2]
        if not isinstance(alone, torch.Tensor) or alone.shape != together.shape:
            return None
        change = float((alone - together).abs().max())
        if not math.isfinite(change):
            return None
        return change, math.sqrt(torch.finfo(outputs.dtype).eps) * float(together.abs().max())

    def _loss(self, outputs: torch.Tensor, targets: Any, index: int) -> torch.Tensor:
        """``loss_fn(outputs, targets)`` of batch ``index``; an error names the batch."""
        try:
            return self.loss_fn(outputs, targets)
        except _OUT_OF_MEMORY:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise batch_error(err, f"batch {index} of data: loss_fn(outputs, targets) raised") from err

    def _forward(self, where: str, state: dict[str, torch.Tensor], inputs: Any) -> Any:
        """Call the model functionally; an error of its forward pass names the batch."""
        try:
            return model_outputs(self.model, state, inputs)
        except _OUT_OF_MEMORY:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise batch_error(err, f"{where} does not fit the model: its forward pass raised") from err

    def _validate(self) -> None:
        if self._shards is None:
            self._validate_first_batch()
        else:
            self._validate_on_every_rank()

    def _validate_on_every_rank(self) -> None:
        """Validate each rank's first batch, then agree: every rank raises if any rank failed.

        One small all-reduce at construction, so that a bad shard on one rank raises everywhere instead of
        leaving the other ranks waiting in the first product's all-reduce. A rank with an empty shard
        passes; the ranks must agree on the reduction and the number of parameters.

        Raises:
            ValueError: If this rank's checks fail (its own error), another rank's did, every shard is
                empty, or the ranks disagree on the reduction or the parameter count.
        """
        error: Exception | None = None
        has_data = False
        try:  # any error, so that no rank is left waiting in the all-reduce below
            with self._rng_preserved():
                has_data = any(batch_size(inputs) > 0 for inputs, _ in self._data)
            if has_data:
                self._validate_first_batch()
        except Exception as err:
            error = err
        reduction = {None: 0, "mean": 1, "sum": 2}[self.reduction]
        table = self._shards.gather_rows(
            [float(error is not None), float(has_data), float(reduction), float(self.shape[0])], self.device)
        if error is not None:
            raise error
        failed = [r for r in range(len(table)) if table[r, 0]]
        if failed:
            raise ValueError(f"building the curvature operator failed on rank(s) {failed} of the process group; "
                             "see the error raised there.")
        if not table[:, 1].any():
            raise ValueError("data is empty on every rank of the process group: no rank yielded a batch.")
        if len(set(table[:, 3].tolist())) > 1:
            counts = sorted({int(n) for n in table[:, 3].tolist()})
            raise ValueError(f"the ranks' models have different numbers of selected parameters {counts}; every "
                             "rank must hold the same model.")
        known = {int(c) for c in table[:, 2].tolist()} - {0}
        if len(known) > 1:
            raise ValueError("the ranks inferred different reductions for loss_fn; pass reduction='mean' or 'sum'.")
        if not known:
            raise ValueError("cannot tell whether loss_fn averages or sums over a batch on any rank; pass "
                             "reduction='mean' or reduction='sum'.")
        self.reduction = {1: "mean", 2: "sum"}[known.pop()]

    def _check_batch(self, index: int, outputs: torch.Tensor, targets: Any, inputs: Any) -> None:
        """The per-batch checks of a product: targets against outputs; the loss's weighting, once per batch."""
        where = f"batch {index} of data"
        if self._kind != "other":
            try:
                check_targets(self._kind, self.loss_fn, outputs, targets)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}: {err}") from err
            return
        if self._sample_shape is not None and tuple(outputs.shape[1:]) != self._sample_shape:
            raise ValueError(
                f"{where} has outputs of {tuple(outputs.shape[1:])} per sample where the first batch had "
                f"{self._sample_shape}: loss_fn may average over entries rather than samples, and the operator "
                "weights each batch by its number of samples, which would then be wrong (7% off on sequences of "
                "2 and 9 tokens). Say what loss_fn divides by: curvature.NormalizedLoss(loss_fn, normalizer=lambda "
                "outputs, targets: outputs.shape[0]) for a mean over samples, or normalizer=lambda outputs, "
                "targets: outputs.numel() (or the tokens that count) for a mean over entries."
            )
        if (self.verify and self._weights_by_loss and index not in self._additive
                and (not self._data.single or self._shards is not None)):
            check_additive(self.loss_fn, outputs.detach(), targets, inputs, self.reduction, where)
            self._additive.add(index)

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
        key = self._fingerprint()
        if key != self._cache_key:
            self._cache, self._cache_complete, self._cache_key = [], False, key
        if self._cache_complete:
            yield from self._cache
            return
        self._cache = []
        with self._rng_preserved():
            for index, batch in enumerate(self._data):
                if batch_size(batch[0]) == 0:  # an empty batch adds nothing
                    continue
                inputs, targets = self._prepare_batch(*batch)
                entry = self._context(index, inputs, targets, self._leaves())
                self._cache.append(entry)
                yield entry
        self._data.count_pass(len(self._cache))
        self._cache_complete = True

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
        batches = 0
        for index, batch in enumerate(self._data):
            if batch_size(batch[0]) == 0:  # an empty batch adds nothing
                continue
            inputs, targets = self._prepare_batch(*batch)
            leaves = self._leaves()
            fresh = self._fresh_product(leaves, inputs, targets, index, vs) if single else None
            if fresh is None:
                ctx, weight = self._context(index, inputs, targets, leaves)
                columns = self._apply(ctx, vs, last_use=True)
            else:
                columns, outputs = fresh
                weight = self._weight(targets, inputs, outputs)
            batches += 1
            yield columns, weight
        self._data.count_pass(batches)

    # -- the product ---------------------------------------------------------------------------------
    def _local_sum(self, vs: list[torch.Tensor], k: int) -> tuple[torch.Tensor | None, float | None, float, int]:
        """Sum this process's batch products: ``(sum, first_weight, weight_sum, batches)``.

        The scaling is deferred: while ``first_weight`` is not None, ``sum`` is the first batch's product
        still unscaled (one batch needs no scaling at all); ``sum`` is None for data without a batch.
        """
        total: torch.Tensor | None = None
        first_weight: float | None = None
        weight_sum, batches = 0.0, 0
        with torch.enable_grad():
            for columns, weight in self._batch_products(vs):
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

    def _check_totals(self, weight_sum: float, batches: float, where: str) -> None:
        if not batches:
            raise ValueError(f"data is empty{where}: it yielded no (inputs, targets) batch.")
        if self.reduction == "mean" and weight_sum == 0:
            raise ValueError(f"every target in the data{where} is ignored (ignore_index, or a normalizer of 0), so "
                             "the mean loss is undefined.")

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._sync_with_model()
        with autograd_enabled():  # under torch.no_grad() or torch.inference_mode() too
            return self._product(recordable(V))

    def _check_vector(self, V: torch.Tensor) -> None:
        """With ``verify``, refuse a NaN or Inf in ``V`` before the product, so that it is not blamed on the model.

        In a process group it runs inside the product's error handling: a rank whose vector is not finite joins the
        all-reduce with its failure flag, and the others raise naming it instead of waiting for it.
        """
        if self.verify:
            check_finite(V, "the vector multiplied by the operator",
                         "pass a finite vector (the NaN or Inf is in v, not in the model or the data).")

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
        error: Exception | None = None
        dtype = self._compute_dtype or self.dtype
        if self._shards is None:
            self._check_vector(V)
        with float32_precision(self.device, dtype, self.allow_tf32), differentiable_attention():
            try:
                if self._shards is not None:
                    self._check_vector(V)
                total, first_weight, weight_sum, batches = self._local_sum(vs, k)
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
                total, "the curvature product",
                "the loss or its derivatives are not finite at these parameters; check the data and the "
                "model's outputs (a log of 0?), or compute in float64.",
            )
        return total.T.contiguous()

    def _reduce(self, total: torch.Tensor | None, first_weight: float | None, weight_sum: float, batches: int,
                V: torch.Tensor, error: Exception | None) -> torch.Tensor:
        """All-reduce this rank's weighted partial product over the process group and normalize it.

        A rank whose products raised (``error``) joins the all-reduce with a failure flag, then raises its
        own error; with ``verify`` the other ranks raise naming it, without it their product is NaN.
        """
        if total is not None and first_weight is not None:
            total = total.mul(first_weight)  # the other ranks' batches need the weights
        total, totals, digests, failures = self._shards(total, V, weight_sum, batches, failed=error is not None)
        if error is not None:
            raise error
        same = (digests == digests[self._shards.rank]).all() & (failures == 0).all()
        if self.verify:
            failed = [r for r, flag in enumerate(failures.tolist()) if flag]
            if failed:
                raise ValueError(f"the curvature product failed on rank(s) {failed} of the process group; see the "
                                 "error raised there.")
            if not bool(same):
                differ = [r for r in range(len(digests)) if not torch.equal(digests[r], digests[0])]
                raise ValueError(
                    f"the vector multiplied differs between the ranks of the process group (rank(s) {differ} "
                    "differ from rank 0), so their products cannot be added; every rank must multiply the "
                    "same vector: give estimators identically seeded generators on every rank, e.g. "
                    "torch.Generator().manual_seed(0), never generator=None."
                )
        else:  # no host read: a mismatch poisons the product instead
            total = total * torch.where(same, 1.0, torch.nan).to(total.dtype)
        # The global weight and batch count are read on the host (one synchronisation) only when they can
        # have changed: at every product over a loader, once per set of kept graphs.
        if not (self.keep_graph and self._cache_complete and self._checked_key == self._cache_key):
            global_weight, global_batches = totals.tolist()
            self._check_totals(global_weight, global_batches, " on every rank of the process group")
            self._checked_key = self._cache_key if self.keep_graph else None
        return total.div_(totals[0]) if self.reduction == "mean" else total

    def clear_cache(self) -> None:
        """Free the kept autograd graphs; the next product rebuilds them."""
        self._cache, self._cache_complete, self._cache_key, self._checked_key = [], False, None, None



class _Float32Products(LinearOperator):
    """A half-precision curvature operator with its products computed in float32 (:meth:`higher_precision`)."""

    def __init__(self, op: CurvatureOperator) -> None:
        super().__init__(op.shape[0], torch.float32, op.device, is_symmetric=op.is_symmetric, is_psd=op.is_psd)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.op._float32_product(V)
        self.op.num_matvecs += V.shape[1]  # products of the same operator: counted there too
        return out
