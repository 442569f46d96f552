r"""A differentiable Hutchinson estimate of the Hessian trace, for penalized training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch

from .._checks import (
    check_count,
    check_finite,
    check_generator,
    check_uses_params,
    common_dtype_device,
    no_graph_reason,
)
from .._flat import split
from .._func import gradient, vjp_columns
from .._modes import autograd_enabled
from ..sampling import probes, resolve_generator
from .gradient_norm import _params

__all__ = ["hessian_trace_penalty"]


def hessian_trace_penalty(
    loss: torch.Tensor,
    params: Iterable[torch.Tensor],
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}(\nabla^2_\theta L)`, differentiable in :math:`\theta`.

    .. math::

        \widehat{\operatorname{tr}}(H) = \frac{1}{m} \sum_{i=1}^{m} v_i^\top H v_i, \qquad
        v_i \in \{-1, +1\}^P \text{ i.i.d. Rademacher}, \qquad
        \mathbb{E}\,\widehat{\operatorname{tr}}(H) = \operatorname{tr}(H)

    (Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines"). Each :math:`H v_i` is a double-backward product kept in the graph (``create_graph=True``), so
    the returned scalar can be added to the loss and differentiated: its gradient is an unbiased estimate
    of :math:`\nabla_\theta \operatorname{tr}(H)` (a third derivative, never formed). Penalizing the trace
    steers training towards flat minima, as in Hessian-trace regularization for generalization and
    robustness (e.g. Liu et al. 2023, "Enhance diffusion to improve robust generalization"; Yao et al. 2020,
    PyHessian, for the trace as a sharpness measure).

    Cost: one gradient with its graph plus ``num_samples`` double-backward products, each kept alive until the
    result is differentiated: memory of about ``num_samples + 1`` backward graphs.

    A loss that depends on none of ``params`` is refused (the rule of every regularizer here); a loss linear in
    them has a zero Hessian and a penalty of 0. Called under ``torch.no_grad()`` or ``torch.inference_mode()``
    with a loss computed outside them, it returns the same value with its graph; a loss computed under
    inference mode has no graph and is refused.

    Args:
        loss: A scalar loss with its graph to ``params``.
        params: The tensors to take the Hessian over (those requiring grad).
        num_samples: The number of probe vectors :math:`m`.
        generator: The source of the probes; None draws from a copy of torch's global generator without
            advancing it (:func:`curvature.sampling.resolve_generator`). In a training loop, pass one generator
            that lives across steps: with None, a loop that draws nothing else from the global generator reuses
            the same probes at every step, and the penalty is no longer unbiased across training.

    Returns:
        A scalar tensor with a graph (the estimate).

    Raises:
        TypeError: If ``loss`` is not a tensor, ``params`` is a single tensor, or the generator is not one.
        ValueError: If ``loss`` is not a finite scalar with a graph (one computed under inference mode has none)
            or depends on none of ``params``, ``params`` is empty or mixes dtypes or devices, or ``num_samples``
            is below 1.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = (w**4).sum() / 4  # H = diag(3 w²), tr H = 15, the same for every Rademacher probe
        >>> penalty = hessian_trace_penalty(loss, [w], generator=torch.Generator().manual_seed(0))
        >>> penalty.item(), torch.autograd.grad(penalty, w)[0].tolist()  # d tr(H) / dw = 6 w
        (15.0, [6.0, 12.0])
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a scalar tensor with its graph, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}; reduce it first.")
    params = _params(params)
    dtype, device = common_dtype_device(params, "params")
    check_count(num_samples, "num_samples")
    check_generator(generator)
    check_finite(loss.detach(), "the loss", "check the model's outputs and the data for NaN/Inf.")
    if not loss.requires_grad:
        with autograd_enabled():  # the reason lies in how the loss was made, not in the caller's mode now
            reason = no_graph_reason(loss)
        raise ValueError(f"the loss has no graph: {reason}; pass the loss itself.")
    generator = resolve_generator(generator)
    with autograd_enabled():
        grads, unused = gradient(loss, params, create_graph=True)
        check_uses_params(unused, "the loss", "params")
        V = probes("rademacher", (sum(p.numel() for p in params), num_samples), generator, dtype, device)
        vs = split(V.T, params)  # probe i of parameter p: vs[p][i]
        hvs = vjp_columns(grads, params, vs, vectorize=False, create_graph=True)  # H v_i, one pass per probe
        total = loss.new_zeros(())
        for i in range(num_samples):
            total = total + sum((v[i] * hv[i]).sum() for v, hv in zip(vs, hvs))
        return total / num_samples
