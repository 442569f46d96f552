"""Guards: which parameters an operator sees, which models it refuses, and how it notices that the model changed.

Everything here protects the rule that computing curvature never changes the model and never returns a number
for a model it does not describe: parameter selection (:func:`select_parameters`), refusal of random or
batch-dependent layers (:func:`check_deterministic`, :func:`check_batch_statistics`), tensors without a graph
(:func:`require_graph`), errors that name their batch (:func:`batch_error`), and ``_ModelTracking``, the part
of :class:`~curvature.operators.curvature.CurvatureOperator` that follows the model between products (replaced
tensors, mode switches, in-place writes) and keeps the global RNG as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .._checks import common_dtype_device, no_graph_reason
from .._modes import recordable

__all__ = [
    "batch_error",
    "check_batch_statistics",
    "check_deterministic",
    "require_graph",
    "select_parameters",
]

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


def tensor_slots(model: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Where each parameter and buffer is registered: checking these is a cheap replacement test."""
    slots = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            slots.extend((store, key, t) for key, t in store.items() if t is not None)
    return slots


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


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


def constant(t: Any) -> Any:
    """A batch tensor as a constant for autograd: detached, and a normal copy if made under inference mode."""
    return recordable(t.detach()) if isinstance(t, torch.Tensor) else t


def rng_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class _ModelTracking:
    """Following the model between products: replaced tensors, mode switches, in-place writes, the global RNG.

    A mixin of :class:`~curvature.operators.curvature.CurvatureOperator`: it uses the operator's ``model``,
    ``param_names``, ``_params``, ``_slots``, ``_modules_list``, ``_modes``, ``dtype``, ``device`` and
    ``verify``, and its ``_validate`` and ``clear_cache``.
    """

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
            self._params, self._slots = params, tensor_slots(self.model)
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
