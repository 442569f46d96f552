"""Sharpness-aware minimization (Foret et al. 2021) and its adaptive variant ASAM (Kwon et al. 2021)."""

from __future__ import annotations

from typing import Any, Optional, cast

import torch

from .._checks import check_scalar
from .._closure import Closure, checked_point, gradient_at, no_grad_step
from ._wrapper import WrappedOptimizer

__all__ = ["SAM"]


class SAM(WrappedOptimizer):
    r"""Sharpness-aware minimization: the base optimizer's step with the gradient at the worst nearby point.

    .. math::

        \epsilon = \rho\, \frac{T^2 g}{\|T g\|}, \qquad
        \theta \leftarrow \operatorname{base\_step}\big(\theta,\ \nabla L(\theta + \epsilon)\big)

    with :math:`g = \nabla L(\theta)`. Plain SAM has :math:`T = I`, so :math:`\epsilon = \rho\, g / \|g\|`, the
    first-order solution of :math:`\max_{\|\epsilon\| \le \rho} L(\theta + \epsilon)` (Foret, Kleiner, Mobahi &
    Neyshabur 2021, "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR,
    arXiv:2010.01412). ``adaptive=True`` gives ASAM, with the element-wise scaling
    :math:`T = \operatorname{diag}(|\theta| + \eta)` that makes the neighbourhood invariant to rescaling the
    weights (Kwon, Kim, Park & Choi 2021, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML, arXiv:2102.11600); ``eta=0`` gives the :math:`T = |\theta|` of
    the widely used reference implementation. The norm is taken over every parameter of every group;
    ``rho`` (and ``adaptive``, ``eta``) may differ per group.

    Two ways to use it:

    * ``step(closure)``: the closure returns the loss with its graph, without calling ``backward`` (two calls
      per step, each differentiated once). SAM sets ``.grad`` to the gradient at the perturbed point
      (replacing what was there) and calls the base optimizer's ``step``; the parameters the base step
      starts from are the original ones, restored bit for bit. For gradient accumulation, let the closure
      sum (or average) the micro-batch losses.
    * ``first_step()`` / ``second_step()``, as in the widely used reference code: after ``loss.backward()``
      (accumulated over micro-batches if you like), ``first_step()`` moves to :math:`\theta + \epsilon`;
      after the second forward and backward, ``second_step()`` moves back and lets the base optimizer step
      with the new ``.grad``. Pass ``zero_grad=True`` to clear ``.grad`` after each.

    The base optimizer is built on SAM's parameter groups (``base_optimizer(self.param_groups,
    **base_kwargs)``), so learning-rate schedulers and ``state_dict`` work on either; ``state_dict`` is the base
    optimizer's (momentum buffers included), with ``rho`` and ``adaptive`` in its groups. Parameters with
    ``requires_grad=False`` are never perturbed or stepped; in ``first_step``, neither are those whose
    ``.grad`` is None.

    Batch norm in train mode updates its running statistics in both forward passes, the perturbed one included
    (as with ``first_step``/``second_step``); the reference implementation's users switch them off for the
    second pass, which the closure can do (set the momentum of the norm layers to 0 while perturbed).

    Like the regularizers, SAM refuses a loss that depends on none of ``params`` (its perturbation would be
    zero); parameters only part of the loss leaves unused get no ``.grad`` and no step. Every method may be
    called under ``torch.no_grad()`` or ``torch.inference_mode()``: it does what it does outside them.

    Cost: two forward and backward passes per step, and one copy of the parameters.

    Args:
        params: Parameters or parameter groups.
        base_optimizer: The base optimizer's class, e.g. ``torch.optim.SGD``.
        rho: The neighbourhood radius :math:`\rho > 0`.
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's :math:`\eta \ge 0` (0.01 in Kwon et al.).
        normalize: False gives unnormalized SAM, :math:`\epsilon = \rho\, T^2 g` (Andriushchenko & Flammarion
            2022, "Towards Understanding Sharpness-Aware Minimization", ICML), whose full-batch gradient descent
            at step size :math:`\eta` settles at :math:`\lambda_{\max} = (\sqrt{1 + 8\rho/\eta} - 1)/(2\rho)`
            instead of :math:`2/\eta` (Bartlett, Long & Bousquet 2023; ``examples/edge_of_stability.py``).
        **base_kwargs: The base optimizer's arguments (``lr=0.1, momentum=0.9``, ...).

    Raises:
        TypeError: If ``base_optimizer`` is not an optimizer class or ``adaptive`` or ``normalize`` is not a bool.
        ValueError: If ``rho`` is not positive or ``eta`` is negative.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> loss = optimizer.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> loss.shape, model.weight.grad is not None
        (torch.Size([]), True)
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        normalize: bool = True,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize),
                         base_kwargs)
        self._origin: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def _check_group(self, group: dict[str, Any]) -> None:
        if not check_scalar(group["rho"], "rho") > 0:
            raise ValueError(f"rho must be positive, got {group['rho']}.")
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be a bool, got {type(group['adaptive']).__name__}.")
        if check_scalar(group["eta"], "eta") < 0:
            raise ValueError(f"eta must be non-negative, got {group['eta']}.")
        if not isinstance(group["normalize"], bool):
            raise TypeError(f"normalize must be a bool, got {type(group['normalize']).__name__}.")

    # -- the perturbation ---------------------------------------------------------------------------------
    def perturbation(self, grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        r"""The ascent step :math:`\epsilon = \rho\, T^2 g / \|T g\|` (:math:`\rho\, T^2 g` unnormalized).

        Args:
            grads: One list of gradients per trainable group (in the order of ``param_groups``, only
                parameters with ``requires_grad``).

        Returns:
            :math:`\epsilon` in the same structure (zeros when the gradient is zero).
        """
        groups = self._trainable()
        scaled = []
        for (group, params), gs in zip(groups, grads):
            scale = [(p.detach().abs() + group["eta"]) if group["adaptive"] else None for p in params]
            scaled.append((group, scale, gs))
        norm = torch.sqrt(sum(
            ((g if t is None else t * g) ** 2).sum() for _, ts, gs in scaled for t, g in zip(ts, gs)
        ))
        out = []
        for group, ts, gs in scaled:
            factor = group["rho"] / (norm + 1e-12) if group["normalize"] else group["rho"]
            out.append([factor * (g if t is None else t * t * g) for t, g in zip(ts, gs)])
        return out

    # -- the two-pass step with a closure -------------------------------------------------------------------
    @no_grad_step
    def step(self, closure: Optional[Closure] = None) -> torch.Tensor:  # type: ignore[override]
        """Take one SAM step.

        Args:
            closure: Returns the loss with its graph, without calling ``backward``; called twice.

        Returns:
            The loss at the start of the step (detached).

        Raises:
            TypeError: If no closure is given or it returns something other than a tensor.
            ValueError: If the loss or its gradient is not finite, at the start or at the perturbed point, the
                loss has no graph, was already differentiated (the closure called ``backward``) or depends on
                none of the parameters; the parameters are then unchanged.
        """
        closure = self._check_closure(closure, "SAM")
        groups = self._trainable()
        params = [p for _, ps in groups for p in ps]
        start = checked_point(closure, params, "at the current parameters")
        loss, grads = start.loss, cast(list, start.grads)
        per_group, offset = [], 0
        for _, ps in groups:
            per_group.append(grads[offset:offset + len(ps)])
            offset += len(ps)
        saved = [p.detach().clone() for p in params]
        epsilon = [e for es in self.perturbation(per_group) for e in es]
        sharp = gradient_at(closure, params, saved, epsilon, "at the perturbed point (lower rho?)")
        self._set_grads(params, sharp, start.unused)
        self.base_optimizer.step()
        return loss

    # -- the reference code's interface -------------------------------------------------------------------
    @no_grad_step
    def first_step(self, zero_grad: bool = False) -> None:
        r"""Move to :math:`\theta + \epsilon` using the current ``.grad`` (from the user's ``backward``).

        Args:
            zero_grad: Clear ``.grad`` afterwards, ready for the second backward pass.

        Raises:
            RuntimeError: If called twice without :meth:`second_step` in between.
            ValueError: If a gradient holds NaN or Inf.
        """
        if self._origin is not None:
            raise RuntimeError("first_step was called twice; call second_step() after the second backward pass.")
        groups = self._trainable()
        moved = [p for _, ps in groups for p in ps if p.grad is not None]
        if any(not bool(torch.isfinite(p.grad).all()) for p in moved):
            raise ValueError("a gradient holds NaN or Inf; first_step did not move the parameters.")
        grads = [[p.grad if p.grad is not None else torch.zeros_like(p) for p in ps] for _, ps in groups]
        self._origin = [(p, p.detach().clone()) for p in moved]
        for (_, ps), es in zip(groups, self.perturbation(grads)):
            for p, e in zip(ps, es):
                if p.grad is not None:
                    p.add_(e)
        if zero_grad:
            self.zero_grad()

    @no_grad_step
    def second_step(self, zero_grad: bool = False) -> None:
        r"""Move back to :math:`\theta` and let the base optimizer step with the current ``.grad``.

        Args:
            zero_grad: Clear ``.grad`` after the base step.

        Raises:
            RuntimeError: If :meth:`first_step` was not called before.
        """
        if self._origin is None:
            raise RuntimeError("second_step needs first_step() first (after the first backward pass).")
        for p, value in self._origin:
            p.copy_(value)
        self._origin = None
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()
