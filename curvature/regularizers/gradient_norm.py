r"""Gradient regularization :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2` by finite differences (Karakida et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, cast

import torch

from .._checks import check_scalar
from ..optim._wrapper import Closure, WrappedOptimizer, checked_point, closure_gradient, no_grad_step, restore, split

__all__ = ["METHODS", "GradientRegularization", "gradient_norm_penalty"]

METHODS = ("forward", "backward", "central", "exact")
DEFAULT_STEP = 0.01  # the smallest ascent step of Karakida et al.'s grid {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}


def _check_options(gamma: Any, method: Any, h: Any) -> tuple[float, str, float]:
    gamma = check_scalar(gamma, "gamma")
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    h = DEFAULT_STEP if h is None else check_scalar(h, "h")
    if not h > 0:
        raise ValueError(f"h must be positive (the length of the finite-difference step), got {h}.")
    return gamma, method, h


def _params(params: Iterable[Any]) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, e.g. model.parameters() or [w, b].")
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError("params holds no tensor that requires grad.")
    return out


@no_grad_step
def gradient_norm_penalty(
    closure: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    gamma: float,
    method: str = "forward",
    h: Optional[float] = None,
    accumulate: bool = False,
) -> list[torch.Tensor]:
    r"""The gradient of :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2`, by finite differences or double backward.

    .. math::

        \nabla\Big(L + \frac{\gamma}{2}\|\nabla L\|^2\Big) = g + \gamma H g, \qquad g = \nabla L(\theta)

    The Hessian-gradient product comes from gradients at a point a distance :math:`h` along :math:`\pm g`,
    :math:`\epsilon = h / \|g\|` (Karakida, Takase, Hayase & Osawa 2023, "Understanding Gradient
    Regularization in Deep Learning: Efficient Finite-Difference Computation and Implicit Bias", ICML,
    arXiv:2210.02720):

    * ``"forward"`` (their F-GR, an ascent step): :math:`H g \approx (\nabla L(\theta + \epsilon g) - g)/\epsilon`,
      error :math:`O(h)`, two gradients. With :math:`\gamma = \epsilon` it is SAM's gradient
      :math:`\nabla L(\theta + h\, g/\|g\|)`; the paper finds it generalizes best, more so for larger steps.
    * ``"backward"`` (B-GR, a descent step): :math:`(g - \nabla L(\theta - \epsilon g))/\epsilon`, error
      :math:`O(h)`, two gradients.
    * ``"central"``: :math:`(\nabla L(\theta + \epsilon g) - \nabla L(\theta - \epsilon g))/(2\epsilon)`, error
      :math:`O(h^2)`, three gradients.
    * ``"exact"``: double backward, :math:`H g = \nabla(\tfrac12\|\nabla L\|^2)` (Drucker & LeCun 1992), the
      reference; about the cost of three gradients and the memory of a double-backward graph.

    The step rule: the point is moved by a length ``h`` in parameter space, whatever the scale of the
    gradient (the paper's grid of ascent steps is 0.01 to 0.5; the default 0.01 is its smallest, close to the
    exact gradient; larger ``h`` strengthens the implicit bias the paper describes, at the price of a larger
    deviation from the exact penalty's gradient). The parameters are moved in place and restored bit for bit.

    A loss that depends on none of ``params`` is refused (the rule of every regularizer here); parameters
    that only part of the loss leaves unused get a zero gradient. Under ``torch.no_grad()`` or
    ``torch.inference_mode()`` the result is the one computed outside them.

    Args:
        closure: Returns the loss with its graph, without calling ``backward``; called two or three times.
        params: The parameters (tensors requiring grad; others are skipped).
        gamma: :math:`\gamma \ge 0`.
        method: ``"forward"``, ``"backward"``, ``"central"`` or ``"exact"``.
        h: The finite-difference step length (positive); None for 0.01. Ignored by ``"exact"``.
        accumulate: Also add the result into ``.grad`` (creating it where None), like ``backward``.

    Returns:
        One gradient tensor per parameter (detached).

    Raises:
        TypeError: If the closure does not return a tensor or ``params`` is a single tensor.
        ValueError: On a bad option, no parameters, a loss without a graph, already differentiated (the closure
            called ``backward``) or depending on none of ``params``, or a non-finite loss or gradient (the
            parameters are then unchanged).

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> closure = lambda: (w**4).sum() / 4  # g = w³, H = diag(3w²), g + γHg = w³ + 3γ w⁵
        >>> [round(v, 6) for v in gradient_norm_penalty(closure, [w], gamma=0.1, method="exact")[0].tolist()]
        [1.3, 17.6]
        >>> [round(v, 6) for v in gradient_norm_penalty(closure, [w], 0.1, method="central", h=1e-4)[0].tolist()]
        [1.3, 17.6]
    """
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}.")
    params = _params(params)
    _, result, unused = _penalty_gradient(closure, params, gamma, method, h)
    if accumulate:
        with torch.no_grad():
            for p, g, skip in zip(params, result, unused):
                if skip:  # the loss does not use it: leave .grad as backward would
                    continue
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
    return result


def _penalty_gradient(closure: Closure, params: list[torch.Tensor], gamma: Any, method: Any,
                      h: Any) -> tuple[torch.Tensor, list[torch.Tensor], list[bool]]:
    """The loss, the penalized loss's gradient (:func:`gradient_norm_penalty`) and which parameters are unused."""
    gamma, method, h = _check_options(gamma, method, h)
    if method == "exact":  # H g through the gradient's own graph: one more backward pass
        point = checked_point(closure, params, "at the current parameters", order=2)
        g = cast(torch.Tensor, point.grad)
        return point.loss, split(g + gamma * (cast(Any, point.hessian) @ g), params), point.unused
    start = checked_point(closure, params, "at the current parameters")
    loss, g, unused = start.loss, cast(list, start.grads), start.unused
    norm = float(torch.sqrt(sum((t * t).sum() for t in g)))
    if norm == 0.0 or gamma == 0.0:
        return loss, g, unused
    eps = h / norm
    saved = [p.detach().clone() for p in params]

    def gradient_at(sign: float) -> list[torch.Tensor]:
        try:
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(t, alpha=sign * eps)
            where = f"at the finite-difference point ({'+' if sign > 0 else '-'}h; lower h?)"
            return closure_gradient(closure, params, where)[1]
        finally:
            restore(params, saved)

    c = gamma / eps  # g + γ H g with H g ≈ (∇L(θ + εg) − g) / ε is g + c (∇L(θ + εg) − g): one lerp per tensor
    if method == "forward":
        return loss, [torch.lerp(t, a, c) for t, a in zip(g, gradient_at(1.0))], unused
    if method == "backward":
        return loss, [torch.lerp(t, b, -c) for t, b in zip(g, gradient_at(-1.0))], unused
    plus, minus = gradient_at(1.0), gradient_at(-1.0)
    return loss, [t + (c / 2) * (a - b) for t, a, b in zip(g, plus, minus)], unused


class GradientRegularization(WrappedOptimizer):
    r"""A base optimizer stepping with the gradient of :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2`.

    Each ``step(closure)`` computes :func:`gradient_norm_penalty` over the parameters of all groups (one
    penalty: ``gamma``, ``method`` and ``h`` are the same for every group), writes it into ``.grad``
    (replacing what was there) and calls the base optimizer's ``step`` (Karakida, Takase, Hayase & Osawa
    2023, arXiv:2210.02720). The closure returns the loss with its graph, without calling ``backward``; it is
    called two (``"forward"``, ``"backward"``), three (``"central"``) or one (``"exact"``) times. ``state_dict``
    is the base optimizer's.

    Args:
        params: Parameters or parameter groups.
        base_optimizer: The base optimizer's class, e.g. ``torch.optim.SGD``.
        gamma: :math:`\gamma \ge 0`.
        method: ``"forward"`` (default), ``"backward"``, ``"central"`` or ``"exact"``.
        h: The finite-difference step length; None for 0.01.
        **base_kwargs: The base optimizer's arguments.

    Raises:
        TypeError: If ``base_optimizer`` is not an optimizer class.
        ValueError: On a bad option, or groups that set different ``gamma``, ``method`` or ``h``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> optimizer = GradientRegularization(model.parameters(), torch.optim.SGD, gamma=0.1, lr=0.1)
        >>> loss = optimizer.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, params: Any, base_optimizer: Any, gamma: float = 0.1, method: str = "forward",
                 h: Optional[float] = None, **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer, dict(gamma=gamma, method=method, h=h), base_kwargs)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_options(group["gamma"], group["method"], group["h"])
        for key in ("gamma", "method", "h"):
            if group[key] != self._own[key]:
                raise ValueError(
                    f"every group must use the same {key} (one penalty over all parameters): got {group[key]!r} "
                    f"where the optimizer has {self._own[key]!r}."
                )

    @no_grad_step
    def step(self, closure: Optional[Closure] = None) -> torch.Tensor:  # type: ignore[override]
        """Compute the regularized gradient and take the base optimizer's step.

        Args:
            closure: Returns the loss with its graph, without calling ``backward``.

        Returns:
            The loss at the start of the step (detached).
        """
        closure = self._check_closure(closure, "GradientRegularization")
        params = [p for _, ps in self._trainable() for p in ps]
        loss, grads, unused = _penalty_gradient(closure, params, self._own["gamma"], self._own["method"],
                                                self._own["h"])
        self._set_grads(params, grads, unused)
        self.base_optimizer.step()
        return loss
