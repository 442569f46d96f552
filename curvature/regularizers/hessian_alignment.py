r"""Hessian and gradient alignment across training domains (Hemati et al. 2023), without forming Hessians."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch

from .._checks import (
    check_count,
    check_finite,
    check_generator,
    check_scalar,
    check_uses_params,
    common_dtype_device,
    no_graph_reason,
)
from .._flat import flatten, split
from .._func import gradient, vjp_batched, vjp_columns
from .._modes import autograd_enabled
from ..sampling import rademacher, resolve_generator

__all__ = ["ALIGNMENT_METHODS", "hessian_alignment_penalty"]

ALIGNMENT_METHODS = ("hgp", "hutchinson")
BLOCK = 16  # Hutchinson probes multiplied together in one batched double-backward call


def hessian_alignment_penalty(
    env_losses: Sequence[torch.Tensor],
    head_params: Iterable[torch.Tensor],
    method: str = "hgp",
    num_samples: int = 150,
    generator: Optional[torch.Generator] = None,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    detach_center: bool = False,
) -> torch.Tensor:
    r"""Penalize the spread across domains of the classifier head's Hessians and gradients.

    For ``E`` training domains with losses :math:`L_e(\theta)` (``env_losses``), head gradients
    :math:`g_e = \nabla_\theta L_e` and head Hessians :math:`H_e = \nabla^2_\theta L_e` (over ``head_params``
    only), and their averages :math:`\bar g = \frac1E \sum_e g_e`, :math:`\bar H = \frac1E \sum_e H_e` (the
    gradient and Hessian of the average loss):

    - ``"hgp"`` (Hessian-gradient product) aligns :math:`H_e g_e` with the product of the average loss,
      :math:`\bar H \bar g`:

      .. math::

          R_{\mathrm{HGP}} = \frac1E \sum_{e=1}^{E} \Big( \alpha \,\big\| H_e g_e - \bar H \bar g \big\|^2
              + \beta \,\| g_e - \bar g \|^2 \Big).

      Each product is exact, one double-backward pass (:math:`H_e g_e = \nabla_\theta \tfrac12 \|g_e\|^2`);
      :math:`\bar H \bar g = \frac1E \sum_e H_e \bar g` costs one more per domain.
    - ``"hutchinson"`` aligns the Hessian diagonals, estimated by Hutchinson's method (Bekas, Kokiopoulou &
      Saad 2007) from ``m = num_samples`` Rademacher probes :math:`v_s`:

      .. math::

          R_{\mathrm{Hutch}} = \frac1E \sum_{e=1}^{E} \Big( \alpha \,\| \hat d_e - \bar d \|^2
              + \beta \,\| g_e - \bar g \|^2 \Big), \qquad
          \hat d_e = \frac1m \sum_{s=1}^{m} v_s \odot H_e v_s, \qquad \bar d = \frac1E \sum_e \hat d_e,

      with :math:`\mathbb{E}\, \hat d_e = \operatorname{diag}(H_e)`. The same probes serve every domain
      (common random numbers), so :math:`\bar d` is also Hutchinson's estimate of
      :math:`\operatorname{diag}(\bar H)`, the differences :math:`\hat d_e - \bar d` carry no noise from the
      diagonals the domains share, and identical domains give exactly zero. The estimate is biased upwards by
      the off-diagonal part of the differences:
      :math:`\mathbb{E}\, R_{\mathrm{Hutch}} = R_{\mathrm{diag}} + \frac{\alpha}{E m} \sum_e
      \|\operatorname{offdiag}(H_e - \bar H)\|_F^2`, where :math:`R_{\mathrm{diag}}` uses the exact diagonals.

    From Hemati, Zhang, Estiri & Chen 2023, "Understanding Hessian Alignment for Domain Generalization"
    (ICCV 2023, arXiv:2308.11778): the spectral norm of the difference between the domains' head Hessians
    bounds the transfer measure between them; HGP and Hutchinson are their two efficient surrogates, added to
    the average loss with weights :math:`\alpha` (Hessian term) and :math:`\beta` (gradient term). The
    definitions above are the paper's objectives as its official code implements them
    (``HessianAlignment/domainbed/algorithms.py`` in ``huawei-noah/Federated-Learning``), with four
    deliberate differences: (1) it computes :math:`H_e g_e` as :math:`\|g_e\| \nabla \|g_e\|` with ``1e-16``
    added to the gradient, the same value up to that shift, but undefined at :math:`g_e = 0`, where the exact
    product used here is not; (2) it draws 300 independent probes
    per domain and a separate set for :math:`\operatorname{diag}(\bar H)`, where common probes remove the
    noise of the difference; (3) it treats the centres :math:`\bar g`, :math:`\bar H \bar g`, :math:`\bar d`
    as constants when differentiating, which ``detach_center=True`` reproduces (the value is the same; the
    gradient changes only for HGP's Hessian term, since deviations from a mean sum to zero); (4) its
    weights are tuned per dataset (DomainBed defaults :math:`\alpha = 10^{-4}, \beta = 5 \cdot 10^{-3}` for
    HGP), while the defaults here, :math:`\alpha = \beta = 1`, give the plain penalty to be scaled by the
    caller, as its Colored MNIST scripts use it.

    Cost: one gradient with its graph per domain, then for ``"hgp"`` two double-backward products per
    domain, for ``"hutchinson"`` ``num_samples`` products per domain (batched, 16 probes per call). All of
    them stay in the graph (``create_graph=True``) until the result is differentiated, which then costs a
    third-order pass through the head; memory is that of those graphs plus ``O(E P)`` for ``P`` head
    parameters (the probes are drawn 16 at a time; no ``P × P`` matrix is formed).

    A loss that depends on none of ``head_params`` is refused (the rule of every regularizer here); head
    parameters that a loss partly leaves unused add zeros, and a loss linear in the head only its gradient
    term. Called under ``torch.no_grad()`` or ``torch.inference_mode()`` with losses computed outside them, it
    returns the same value with its graph; a loss computed under inference mode has no graph and is refused.

    Args:
        env_losses: One scalar loss with its graph per training domain (at least two), e.g. the mean
            cross-entropy of each domain's batch.
        head_params: The classifier head's parameters, the only ones the Hessians and gradients are taken
            over (tensors not requiring grad are skipped). The result still depends on the feature extractor
            through the losses, and its gradient flows there too.
        method: ``"hgp"`` or ``"hutchinson"``.
        num_samples: The number of Rademacher probes ``m`` of ``"hutchinson"`` (ignored by ``"hgp"``). They are
            the rows of ``curvature.sampling.rademacher((m, P), generator, dtype, device)``, drawn 16 rows at a
            time (the same numbers), over the head parameters flattened and concatenated in the given order.
        generator: The source of the probes; None draws from a copy of torch's global generator without
            advancing it (:func:`curvature.sampling.resolve_generator`). In a training loop, pass one generator
            that lives across steps: with None, a loop that draws nothing else from the global generator reuses
            the same probes at every step, and the penalty is no longer unbiased across training.
        alpha: The weight :math:`\alpha \ge 0` of the Hessian term; 0 skips the second-order products.
        beta: The weight :math:`\beta \ge 0` of the gradient term.
        detach_center: Treat the domain averages as constants when differentiating, as the official code
            does; the value is unchanged.

    Returns:
        The penalty, a scalar tensor with a graph to every parameter the losses depend on.

    Raises:
        TypeError: If ``env_losses`` or ``head_params`` is a single tensor, not iterable, or holds something
            other than (floating-point) tensors, the parameters mix dtypes, or ``num_samples``, ``alpha``,
            ``beta`` or ``generator`` has the wrong type.
        ValueError: If there are fewer than two losses, a loss is not a finite scalar with a graph to the head,
            no parameter requires grad, one is listed twice or they live on several devices, ``method`` is
            unknown, ``num_samples`` is below 1, or ``alpha`` or ``beta`` is negative or not finite.

    Example:
        A linear head on two domains: the penalty is positive, and zero for two copies of one domain.

        >>> import torch.nn.functional as F
        >>> gen = torch.Generator().manual_seed(0)
        >>> W = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()
        >>> xs = [torch.randn(16, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
        >>> ys = [torch.randint(0, 3, (16,), generator=gen) for _ in range(2)]
        >>> losses = [F.cross_entropy(x @ W.T, y) for x, y in zip(xs, ys)]
        >>> bool(hessian_alignment_penalty(losses, [W]) > 0)
        True
        >>> same = [losses[0], losses[0]]
        >>> hessian_alignment_penalty(same, [W], method="hutchinson", num_samples=20, generator=gen).item()
        0.0
    """
    if not isinstance(method, str) or method not in ALIGNMENT_METHODS:
        raise ValueError(f"method must be one of {ALIGNMENT_METHODS}, got {method!r}.")
    check_count(num_samples, "num_samples")
    check_generator(generator)
    alpha = _weight(alpha, "alpha")
    beta = _weight(beta, "beta")
    params = _check_params(head_params)
    dtype, device = common_dtype_device(params, "head_params")
    losses = _check_losses(env_losses)
    with autograd_enabled():  # under inference mode too: the autograd work records, the result has its graph
        losses = [loss.reshape(()) for loss in losses]
        grads = [_gradient(loss, params, e) for e, loss in enumerate(losses)]
        flat = [flatten(parts) for parts in grads]
        g_center = _center(flat)
        if detach_center:
            g_center = g_center.detach()
        total = flat[0].new_zeros(())
        if beta > 0:
            total = total + beta * sum((g - g_center).pow(2).sum() for g in flat)
        if alpha > 0:
            if method == "hgp":
                curvatures = [_vjp(parts, params, split(g[None], params))[0] for parts, g in zip(grads, flat)]
                at_center = split(g_center[None], params)
                c_center = _center([_vjp(parts, params, at_center, graph=not detach_center)[0] for parts in grads])
            else:
                curvatures = _hutchinson_diagonals(grads, params, num_samples, resolve_generator(generator),
                                                   dtype, device)
                c_center = _center(curvatures)
            if detach_center:
                c_center = c_center.detach()
            total = total + alpha * sum((c - c_center).pow(2).sum() for c in curvatures)
        return total / len(losses)


def _weight(value: Any, name: str) -> float:
    value = check_scalar(value, name)
    if value < 0:
        raise ValueError(f"{name} must be non-negative (a weight of the penalty), got {value}.")
    return value


def _check_params(head_params: Iterable[Any]) -> list[torch.Tensor]:
    if isinstance(head_params, torch.Tensor):
        raise TypeError("head_params must be an iterable of tensors, e.g. model.classifier.parameters() or [W, b].")
    try:
        candidates = list(head_params)
    except TypeError:
        raise TypeError(
            f"head_params must be an iterable of tensors, e.g. model.classifier.parameters(), "
            f"got {type(head_params).__name__}."
        ) from None
    for i, p in enumerate(candidates):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"head_params[{i}] must be a tensor, got {type(p).__name__}.")
    params = [p for p in candidates if p.requires_grad]
    if not params:
        raise ValueError(
            "head_params holds no tensor that requires grad; pass the classifier head's trainable parameters."
        )
    if len({id(p) for p in params}) != len(params):
        raise ValueError("head_params lists a tensor more than once; pass each parameter once.")
    return params


def _check_losses(env_losses: Any) -> list[torch.Tensor]:
    if isinstance(env_losses, torch.Tensor):
        raise TypeError(
            "env_losses must be a list with one scalar loss per domain, e.g. [loss_a, loss_b], not one tensor."
        )
    try:
        losses = list(env_losses)
    except TypeError:
        raise TypeError(
            f"env_losses must be a list with one scalar loss per domain, got {type(env_losses).__name__}."
        ) from None
    if len(losses) < 2:
        raise ValueError(
            f"env_losses must hold the losses of at least two domains (alignment compares domains), got "
            f"{len(losses)}."
        )
    for e, loss in enumerate(losses):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"env_losses[{e}] must be a scalar tensor with its graph, got {type(loss).__name__}.")
        if loss.numel() != 1:
            raise ValueError(
                f"env_losses[{e}] must be a scalar, got shape {tuple(loss.shape)}; reduce it over the domain's "
                "batch first (e.g. reduction='mean')."
            )
        if not loss.is_floating_point():
            raise TypeError(f"env_losses[{e}] must be floating point, got {loss.dtype}.")
        check_finite(loss.detach(), f"env_losses[{e}]", "check the model's outputs and that domain's data.")
        if not loss.requires_grad:
            with autograd_enabled():  # the reason lies in how the loss was made, not in the caller's mode now
                reason = no_graph_reason(loss)
            raise ValueError(f"env_losses[{e}] has no graph: {reason}; pass the loss itself.")
    return losses


def _gradient(loss: torch.Tensor, params: list[torch.Tensor], e: int) -> list[torch.Tensor]:
    """The per-parameter gradient of one domain's loss with its graph; zeros where a parameter is unused."""
    grads, unused = gradient(loss, params, create_graph=True)
    check_uses_params(unused, f"env_losses[{e}]", "head_params")
    return grads


def _center(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The mean, as ``x_1 + mean(x_e - x_1)``: exactly ``x_1`` when all are equal, whatever the rounding."""
    first = vectors[0]
    return first + torch.stack([v - first for v in vectors]).mean(0)


def _vjp(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    vectors: list[torch.Tensor],
    batched: bool = False,
    graph: bool = True,
) -> torch.Tensor:
    """``H v_j`` for ``k`` vectors (``(k, *p.shape)`` per parameter) as ``(k, P)``, kept in the graph if ``graph``.

    ``batched``: one vmapped pass, which raises where vmap cannot batch an operation of the head; otherwise one
    double-backward pass per vector.
    """
    if batched:
        return flatten(vjp_batched(grads, params, vectors, create_graph=graph), batch_dims=1)
    return flatten(vjp_columns(grads, params, vectors, vectorize=False, create_graph=graph), batch_dims=1)


def _hutchinson_diagonals(
    grads: list[list[torch.Tensor]],
    params: list[torch.Tensor],
    num_samples: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """``mean_s v_s * (H_e v_s)`` for every domain ``e``, with the same probes ``v_s`` for all domains."""
    size = sum(p.numel() for p in params)
    sums = [grads[0][0].new_zeros(size) for _ in grads]
    batched: Optional[bool] = None  # decided by the first call: vmap may lack a batching rule for an op of the head
    for start in range(0, num_samples, BLOCK):
        V = rademacher((min(BLOCK, num_samples - start), size), generator, dtype, device)
        columns = split(V, params)
        for e, parts in enumerate(grads):
            HV = None
            if batched is not False:
                try:
                    HV = _vjp(parts, params, columns, batched=True)
                except (RuntimeError, NotImplementedError):
                    if batched:  # it worked before: a genuine error
                        raise
                batched = HV is not None
            if HV is None:  # one probe at a time
                HV = _vjp(parts, params, columns)
            sums[e] = sums[e] + (V * HV).sum(0)
    return [s / num_samples for s in sums]
