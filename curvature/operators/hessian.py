"""The Hessian of the loss with respect to the parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._func import vjp_columns
from .curvature import CurvatureOperator, require_graph

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the loss over the whole data.

    .. math:: H v = \nabla_\theta \big( \nabla_\theta L(\theta)^\top v \big)

    Each batch's gradient is computed once with its graph (``create_graph=True``); every product is then
    one backward pass through that graph (Pearlmutter 1994, "Fast exact multiplication by the Hessian").
    With ``keep_graph`` (the default for a single batch) the graph is reused across products, so a
    product costs about one gradient; without it, a product costs one forward and two backward passes,
    and a ``matmat`` with ``k`` columns pays the forward and first backward only once per batch.

    Works for any scalar ``loss_fn(outputs, targets)``. The Hessian is symmetric but in general
    indefinite, so ``is_psd`` is False. Arguments as in
    :class:`~curvature.operators.curvature.CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H = HessianOperator(model, torch.nn.MSELoss(), (x, y))
        >>> H.shape
        (4, 4)
    """

    name = "hessian"
    title = "Hessian"

    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        loss = self._loss(outputs, targets, index)
        require_graph(loss, "the loss", outputs)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return leaves, grads

    def _apply(self, ctx: Any, vs: list[torch.Tensor], last_use: bool = False) -> list[torch.Tensor]:
        leaves, grads = ctx
        return vjp_columns(grads, leaves, vs, vectorize=self.vectorize, retain_graph=not last_use)

    def _batch_gradients(self) -> Iterable[tuple[list[torch.Tensor], float]]:
        """Each batch's gradient read from its kept graph (no pass once the graphs are built), else computed."""
        if not self.keep_graph:
            return super()._batch_gradients()
        return ((self._gradient_columns(*ctx), weight) for ctx, weight in self._kept_contexts())
