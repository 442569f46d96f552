r"""Gradient regularization (Karakida et al. 2023, arXiv:2210.02720) as an optimizer wrapper, like SAM.

:func:`penalized_gradient` is the gradient of :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2` by finite differences
or double backward; :class:`GradientRegularization` steps a base optimizer with it, and
:func:`curvature.regularizers.gradient_norm_penalty` returns it.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch

from .._checks import check_scalar
from .._closure import Closure, checked_point, gradient_at, no_grad_step
from .._flat import split
from ._wrapper import WrappedOptimizer

__all__ = ["DEFAULT_STEP", "METHODS", "GradientRegularization", "penalized_gradient"]

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


@no_grad_step
def penalized_gradient(closure: Closure, params: list[torch.Tensor], gamma: float, method: str = "forward",
                       h: Optional[float] = None) -> tuple[torch.Tensor, list[torch.Tensor], list[bool]]:
    r"""The loss and the gradient :math:`g + \gamma H g` of :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2`.

    The methods, the step rule and the errors are those of :func:`curvature.regularizers.gradient_norm_penalty`
    (``params``: tensors that require grad); the parameters are moved in place and restored bit for bit.

    Returns:
        ``(loss, grads, unused)``: the loss at the parameters (detached), the penalized gradient (one detached
        tensor per parameter) and, per parameter, whether the loss does not use it.
    """
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

    def at(sign: float) -> list[torch.Tensor]:
        where = f"at the finite-difference point ({'+' if sign > 0 else '-'}h; lower h?)"
        return gradient_at(closure, params, saved, g, where, alpha=sign * eps)

    c = gamma / eps  # g + γ H g with H g ≈ (∇L(θ + εg) − g) / ε is g + c (∇L(θ + εg) − g): one lerp per tensor
    if method == "forward":
        return loss, [torch.lerp(t, a, c) for t, a in zip(g, at(1.0))], unused
    if method == "backward":
        return loss, [torch.lerp(t, b, -c) for t, b in zip(g, at(-1.0))], unused
    plus, minus = at(1.0), at(-1.0)
    return loss, [t + (c / 2) * (a - b) for t, a, b in zip(g, plus, minus)], unused


class GradientRegularization(WrappedOptimizer):
    r"""A base optimizer stepping with the gradient of :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2`.

    Each ``step(closure)`` computes :func:`~curvature.regularizers.gradient_norm_penalty` over the parameters of
    all groups (one penalty: ``gamma``, ``method`` and ``h`` are the same for every group), writes it into ``.grad``
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
        loss, grads, unused = penalized_gradient(closure, params, self._own["gamma"], self._own["method"],
                                                 self._own["h"])
        self._set_grads(params, grads, unused)
        self.base_optimizer.step()
        return loss
