"""The closure contract: evaluate a closure's loss, gradient and Hessian, and restore the parameters.

Optimizers (:mod:`curvature.optim`) and closure-based regularizers (:mod:`curvature.regularizers`) take a
closure that runs the forward pass and returns the scalar loss with its graph, without calling ``backward``;
they differentiate it themselves (:func:`evaluate`; :func:`checked_point` also refuses non-finite values and a
loss that uses none of the parameters) and never read ``.grad``. Steps are decorated with
:func:`no_grad_step`, so that under ``torch.no_grad()`` or ``torch.inference_mode()`` they take the step taken
outside them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, cast

import torch

from ._checks import check_uses_params, common_dtype_device, no_graph_reason
from ._flat import flatten, split
from ._func import gradient, vjp_columns
from ._modes import autograd_enabled
from .operators import LinearOperator

__all__ = ["Closure", "GraphHessian", "Point", "checked_point", "closure_gradient", "evaluate", "gradient_at",
           "no_grad_step", "restore"]

Closure = Callable[[], torch.Tensor]
F = TypeVar("F", bound=Callable[..., Any])
# The start of autograd's error when a graph is differentiated after its saved tensors were freed.
FREED_GRAPH = "backward through the graph a second time"


def no_grad_step(fn: F) -> F:
    """Decorate an optimizer step or a regularizer: run it under ``torch.no_grad()`` with inference mode off.

    ``torch.no_grad()`` alone is not enough under ``torch.inference_mode()``: the tensors a step keeps (saved
    parameters, optimizer state such as momentum buffers, ``.grad``) would be inference tensors, which a later
    step outside inference mode cannot update in place, and the closure's loss could not be differentiated.
    With inference mode off for the call, a step under ``torch.inference_mode()`` is exactly the step taken
    outside it; the autograd work inside runs in :func:`curvature._modes.autograd_enabled` (:func:`evaluate`).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return cast(F, wrapper)


class GraphHessian(LinearOperator):
    r"""The Hessian of one evaluated loss: :math:`H v = \nabla_\theta (\nabla_\theta L^\top v)` through its graph.

    Built from the gradient computed with ``create_graph=True``; each product is one backward pass through
    that graph (Pearlmutter 1994), by :func:`curvature._func.vjp_columns`. Valid only while the parameters are
    unchanged: an in-place update makes autograd refuse the graph.

    Args:
        grads: The gradient with its graph, one tensor per parameter (tensors without a graph contribute
            nothing: parameters the loss does not use, or uses only linearly).
        params: The parameters, in the order of the flat vectors.
    """

    def __init__(self, grads: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        dtype, device = common_dtype_device(params, "the group's parameters")
        super().__init__(sum(p.numel() for p in params), dtype, device, is_symmetric=True, is_psd=False)
        self._grads, self._params = grads, params

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        columns = vjp_columns(self._grads, self._params, split(V.T, self._params), vectorize=False)
        return flatten(columns, batch_dims=1).T.contiguous()


@dataclass
class Point:
    """The closure evaluated at the current parameters of a group.

    Attributes:
        loss: The loss, detached.
        value: The loss as a float.
        grads: The gradient, one tensor per parameter (None when not asked for or when the loss is not
            finite); zeros for parameters the loss does not use.
        hessian: The Hessian through the loss's graph (only when asked for).
        unused: For each parameter, whether the loss does not depend on it (its gradient is then a zero).
    """

    loss: torch.Tensor
    value: float
    grads: Optional[list[torch.Tensor]] = None
    hessian: Optional[GraphHessian] = None
    unused: list[bool] = field(default_factory=list)
    _flat: Optional[torch.Tensor] = field(default=None, init=False, repr=False)

    @property
    def grad(self) -> Optional[torch.Tensor]:
        """The gradient as one flat vector (concatenated on first use)."""
        if self.grads is None:
            return None
        if self._flat is None:
            self._flat = flatten(self.grads)
        return self._flat

    @property
    def finite(self) -> bool:
        """True when the loss and (if computed) the gradient are finite.

        One reduction: a NaN or Inf entry makes the sum non-finite; only a non-finite sum, which overflow alone
        can cause, is checked entry by entry.
        """
        if not math.isfinite(self.value):
            return False
        if self.grads is None:
            return True
        total = torch.stack([g.sum() for g in self.grads]).sum()
        return bool(torch.isfinite(total)) or all(bool(torch.isfinite(g).all()) for g in self.grads)


def evaluate(closure: Closure, params: list[torch.Tensor], order: int) -> Point:
    """Call the closure and differentiate its loss ``order`` times (0: value, 1: gradient, 2: Hessian too).

    The closure runs with autograd recording (:func:`curvature._modes.autograd_enabled`), also when the caller
    is under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Raises:
        TypeError: If the closure does not return a floating-point tensor.
        ValueError: If the loss is not a scalar, or (for ``order >= 1``) has no graph (the message says why:
            a detach, ``torch.no_grad()`` or ``torch.inference_mode()`` inside the closure), or its graph was
            already freed because the closure called ``backward`` on it.
    """
    with autograd_enabled():
        loss = closure()
        if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
            raise TypeError(
                f"the closure must return the loss as a floating-point tensor, got {type(loss).__name__}; "
                "e.g. def closure(): return loss_fn(model(x), y)"
            )
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}; reduce it.")
        value = float(loss.detach())
        point = Point(loss=loss.detach().reshape(()), value=value)
        if order == 0 or not math.isfinite(value):
            return point
        if not loss.requires_grad:
            raise ValueError(
                f"the closure's loss has no graph: {no_graph_reason(loss)}. Return the loss with its graph and do "
                "not call backward: the optimizer differentiates it."
            )
        try:
            grads, point.unused = gradient(loss, params, create_graph=order >= 2)
        except RuntimeError as error:
            if FREED_GRAPH not in str(error):
                raise
            raise ValueError(
                "the closure's loss was already differentiated and its graph freed: the closure calls "
                "loss.backward() (the torch.optim.LBFGS style), or returns a loss computed once outside it. The "
                "closure must compute the loss and return it without calling backward: the optimizer "
                "differentiates it, e.g. optimizer.step(lambda: loss_fn(model(x), y)). The parameters are "
                "unchanged."
            ) from error
        point.grads = [g.detach() for g in grads]
    if order >= 2:
        point.hessian = GraphHessian(grads, params)
    return point


def checked_point(closure: Closure, params: list[torch.Tensor], where: str, order: int = 1) -> Point:
    """Evaluate the closure with its gradient (``order=2``: and its Hessian graph); refuse non-finite values.

    Raises:
        TypeError: If the closure does not return a floating-point tensor.
        ValueError: If the loss is not a scalar, has no graph, was already differentiated (the closure called
            ``backward``), depends on none of ``params``, or it or its gradient is not finite.
    """
    point = evaluate(closure, params, order=order)
    if not math.isfinite(point.value):
        raise ValueError(f"the loss {where} is not finite ({point.value}); the parameters are unchanged.")
    if not point.finite:
        raise ValueError(f"the gradient {where} holds NaN or Inf; the parameters are unchanged.")
    check_uses_params(point.unused, f"the loss {where}", "params")
    return point


def closure_gradient(closure: Closure, params: list[torch.Tensor], where: str) -> tuple[torch.Tensor, list]:
    """The loss and its gradient, one tensor per parameter (zeros where unused); see :func:`checked_point`."""
    point = checked_point(closure, params, where)
    return point.loss, cast(list, point.grads)


@torch.no_grad()
def restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Copy saved values back into the parameters (bit for bit)."""
    for p, s in zip(params, saved):
        p.copy_(s)


def gradient_at(closure: Closure, params: list[torch.Tensor], saved: list[torch.Tensor],
                direction: list[torch.Tensor], where: str, alpha: float = 1.0) -> list[torch.Tensor]:
    r"""The gradient at :math:`\theta + \alpha d` (checked as by :func:`checked_point`); then restore :math:`\theta`.

    Args:
        closure: Returns the loss with its graph, without calling ``backward``; called once.
        params: The parameters :math:`\theta`, moved in place.
        saved: Copies of the parameters' values, written back afterwards (bit for bit), also on an error.
        direction: :math:`d`, one tensor per parameter.
        where: Where the point is, for error messages (``"at the perturbed point"``).
        alpha: The step :math:`\alpha` along ``direction``.

    Returns:
        The gradient there, one tensor per parameter (zeros where unused).

    Raises:
        TypeError, ValueError: As :func:`checked_point`.
    """
    try:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=alpha)
        return closure_gradient(closure, params, where)[1]
    finally:
        restore(params, saved)
