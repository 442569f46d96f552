r"""Gradient regularization :math:`L + \tfrac{\gamma}{2}\|\nabla L\|^2` by finite differences (Karakida et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch

from .._closure import no_grad_step
from ..optim.gradient_regularization import METHODS, GradientRegularization, penalized_gradient

__all__ = ["METHODS", "GradientRegularization", "gradient_norm_penalty"]


def _params(params: Iterable[Any]) -> list[torch.Tensor]:
    """The tensors of ``params`` that require grad (the regularizers' ``params`` argument, checked)."""
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
    _, result, unused = penalized_gradient(closure, params, gamma, method, h)
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
