r"""Dense float64 ground truth for small models: the definitions, computed the slow, obvious way.

Every function copies the model and the loss to float64, concatenates all batches into one, and
differentiates the *full-data* loss with ``torch.func.grad`` and ``torch.func.vjp``, one basis vector
at a time. They share no code path with the operators (no batch weighting, no closed-form loss
Hessians, no kept graphs), which is what makes them a reference.

They deliberately avoid ``torch.func.hessian`` and ``jacrev`` of ``jacrev``: in torch 2.13 those
return a Hessian 4.7% off for a model with ``nn.LayerNorm`` (checked against central finite
differences of the gradient, which agree with the loop used here to 1e-10).

Memory is :math:`O(P^2 + O^2)` for :math:`P` parameters and :math:`O` output entries: meant for tests,
examples and users checking a claim on a small model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from torch.func import grad, vjp
from torch.utils import _pytree as pytree

from ._func import model_outputs
from .operators.curvature import select_parameters
from .operators.data import Data, to_device

__all__ = ["REFERENCES", "empirical_fisher", "fisher", "ggn", "gradient", "hessian_matrix"]


def _cat(parts: list[Any]) -> Any:
    """Concatenate batches (tensors, or matching dicts, tuples and lists of them) along the batch dimension.

    Entries that are None (batches without targets) stay None.

    Raises:
        TypeError: On an entry that is neither a tensor nor None.
    """

    def cat(first: Any, *rest: Any) -> Any:
        if first is None:
            return None
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"cannot concatenate batches of type {type(first).__name__}.")
        return torch.cat([first, *rest])

    return pytree.tree_map(cat, parts[0], *parts[1:])


def _sample(obj: Any, n: int) -> Any:
    """Sample ``n`` of a batch of targets (a tensor or a container of tensors), keeping the batch dimension."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t[n:n + 1], obj)


def _to64(obj: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.double() if t.is_floating_point() else t, obj)


def _jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian ``(fn(x).numel(), x.numel())`` by one reverse pass per output entry (no vmap)."""
    out, pullback = vjp(fn, x)
    basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
    return torch.stack([pullback(row.reshape(out.shape))[0].reshape(-1) for row in basis])


class _Setup:
    """The float64 copy of the problem and a function of the flat parameter vector."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any) -> None:
        self.names = [n for n, _ in select_parameters(model, params)]
        batches = list(Data(data))
        device = next(model.parameters()).device
        self.inputs = to_device(_to64(_cat([b[0] for b in batches])), device)
        self.targets = to_device(_to64(_cat([b[1] for b in batches])), device)
        self.model = copy.deepcopy(model).double()
        self.loss_fn = copy.deepcopy(loss_fn).double() if isinstance(loss_fn, nn.Module) else loss_fn
        named = dict(self.model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.theta = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.state = {n: p.detach() for n, p in named.items()}
        self.state.update(self.model.named_buffers())

    def outputs(self, theta: torch.Tensor) -> torch.Tensor:
        state = dict(self.state)
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            size = shape.numel()
            state[name] = theta[offset:offset + size].reshape(shape)
            offset += size
        return model_outputs(self.model, state, self.inputs)

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.outputs(theta), self.targets)

    def per_sample_losses(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.outputs(theta)
        y = self.targets
        return torch.stack([self.loss_fn(z[n:n + 1], None if y is None else _sample(y, n)) for n in range(z.shape[0])])


def gradient(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any = None) -> torch.Tensor:
    r"""The gradient :math:`\nabla_\theta L` of the full-data loss, in float64.

    What :meth:`curvature.CurvatureOperator.gradient` computes batch by batch; the arguments are those of
    :func:`hessian_matrix`. Returns the ``(P,)`` float64 gradient.
    """
    s = _Setup(model, loss_fn, data, params)
    return grad(s.loss)(s.theta)


def hessian_matrix(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any = None
) -> torch.Tensor:
    r"""Dense Hessian :math:`\nabla^2_\theta L` of the full-data loss, in float64.

    Args:
        model: The model (copied; never modified).
        loss_fn: The loss; its reduction applies to all data at once.
        data: One batch or an iterable of batches (concatenated).
        params: None or an iterable of parameters or names, as for the operators.

    Returns:
        The ``(P, P)`` float64 Hessian.
    """
    s = _Setup(model, loss_fn, data, params)
    return _jacobian(grad(s.loss), s.theta)


def ggn(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any = None) -> torch.Tensor:
    r"""Dense generalized Gauss-Newton :math:`J^\top (\nabla^2_z L) J` of the full-data loss, in float64.

    Args:
        model: The model (copied; never modified).
        loss_fn: The loss; its Hessian in output space is taken by autodiff, not in closed form.
        data: One batch or an iterable of batches (concatenated).
        params: None or an iterable of parameters or names.

    Returns:
        The ``(P, P)`` float64 GGN.
    """
    s = _Setup(model, loss_fn, data, params)
    z = s.outputs(s.theta).detach()
    jac = _jacobian(s.outputs, s.theta)
    loss_hessian = _jacobian(grad(lambda out: s.loss_fn(out, s.targets)), z)
    return jac.T @ loss_hessian @ jac


def fisher(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any = None) -> torch.Tensor:
    r"""Dense exact Fisher of the likelihood behind ``MSELoss`` / ``CrossEntropyLoss`` / ``BCEWithLogitsLoss``.

    For these exponential-family likelihoods (Gaussian, categorical, Bernoulli, with the outputs as natural
    parameters) the Fisher equals the GGN (Martens 2020, arXiv:1412.1193, Sec. 9), so this is :func:`ggn`, in
    float64. For ``BCEWithLogitsLoss`` both are :math:`\sigma(z)(1 - \sigma(z))` per entry, whatever the targets.

    Args:
        model: The model.
        loss_fn: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (without weights).
        data: One batch or an iterable of batches.
        params: None or an iterable of parameters or names.

    Returns:
        The ``(P, P)`` float64 Fisher.
    """
    return ggn(model, loss_fn, data, params)


def empirical_fisher(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, params: Any = None,
    reduction: str | None = None,
) -> torch.Tensor:
    r"""Dense empirical Fisher :math:`c \sum_n \nabla\ell_n \nabla\ell_n^\top` from per-sample Jacobians.

    Args:
        model: The model.
        loss_fn: The loss; :math:`\ell_n` is ``loss_fn`` on sample :math:`n` alone.
        data: One batch or an iterable of batches.
        params: None or an iterable of parameters or names.
        reduction: ``"mean"`` (:math:`c = 1/N`) or ``"sum"`` (:math:`c = 1`); default
            ``loss_fn.reduction``.

    Returns:
        The ``(P, P)`` float64 empirical Fisher.

    Raises:
        ValueError: If the reduction is unknown.
    """
    reduction = reduction or getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError("pass reduction='mean' or 'sum' for a loss without a .reduction attribute.")
    s = _Setup(model, loss_fn, data, params)
    grads = _jacobian(s.per_sample_losses, s.theta)
    scale = 1.0 / grads.shape[0] if reduction == "mean" else 1.0
    return scale * grads.T @ grads


#: The dense reference of each registered curvature operator, by its name
#: (:data:`curvature.operators.registry.OPERATORS`); a test checks that every operator has one.
REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "hessian": hessian_matrix,
    "ggn": ggn,
    "fisher": fisher,
    "empirical_fisher": empirical_fisher,
}
