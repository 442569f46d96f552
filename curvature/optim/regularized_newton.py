"""Gradient-regularized Newton with exact or approximate Hessians (Semenov, Jaggi & Doikov 2025)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._checks import check_count
from .._closure import Closure, evaluate
from .._flat import flatten
from ._base import CurvatureArg, CurvatureOptimizer, PreconditionerArg, StateRecord, assign, kept_factors
from .functional import loss_rounding, regularized_newton_accepts, regularized_newton_step

__all__ = ["RegularizedNewton", "RegularizedNewtonState"]


@dataclass(frozen=True)
class RegularizedNewtonState(StateRecord):
    r"""What :class:`RegularizedNewton` keeps per parameter group, as entries of ``optimizer.state[first_param]``.

    ``RegularizedNewtonState.read(optimizer.state[p])`` reads them (``p``: the group's first trainable
    parameter); the state itself stays a dict, so ``state_dict`` round trips are torch's.

    Attributes:
        gamma: :math:`\gamma` of the next step; None (not kept) in the ``lipschitz`` form.
        lipschitz: :math:`L` of the next step in the ``lipschitz`` form; None (not kept) otherwise.
        step: The steps taken.
        num_matvecs: The curvature products spent over all steps.
        attempts: The solves of the last step.
        regularization: The last attempt's :math:`\lambda = \|g\| / \gamma` (0 when the gradient was zero).
    """

    gamma: Optional[float] = None
    lipschitz: Optional[float] = None
    step: int = 0
    num_matvecs: int = 0
    attempts: Optional[int] = None
    regularization: Optional[float] = None


class RegularizedNewton(CurvatureOptimizer):
    r"""Gradient-regularized Newton method with an adaptive regularization (Semenov, Jaggi & Doikov 2025).

    Each step computes, with :math:`g = \nabla f(x)`,

    .. math::

        \lambda = \frac{\|g\|}{\gamma}, \qquad \Delta = -(B + \lambda I)^{-1} g, \qquad
        \text{accept if } f(x) - f(x + \Delta) \ge \frac{\|\nabla f(x + \Delta)\|^2}{8 \lambda}

    and on acceptance doubles :math:`\gamma` (a bolder step next time); otherwise it halves :math:`\gamma` and
    solves again, at most ``max_attempts`` times (Semenov, Jaggi & Doikov 2025, "Gradient-Normalized
    Smoothness for Optimization with Approximate Hessians", arXiv:2506.13710, Algorithm 1; reference code
    epfml/grad-norm-smooth). ``B`` is the Hessian of the closure's loss (``curvature="hessian"``) or an
    approximation built by a factory for the group's parameters: ``lambda params:
    curvature.GGNOperator(model, loss_fn, data, params=params)`` (or ``FisherOperator``,
    ``EmpiricalFisherOperator``, or the Kronecker-factored :class:`~curvature.KFACOperator` and
    :class:`~curvature.EKFACOperator`: the approximate Hessians the paper's analysis covers, whose factors are
    computed once per step, a rejected attempt reinstating them). The system is solved by CG
    (:func:`curvature.optim.functional.regularized_newton_step`), warm-started from the previous attempt;
    when CG meets negative curvature (an indefinite Hessian with too small :math:`\lambda`) the attempt
    counts as rejected without evaluating it.

    With ``lipschitz=L`` the regularization is :math:`\lambda = \sqrt{L \|g\|}` (Mishchenko 2023, "Regularized
    Newton method with global O(1/k²) convergence", SIAM J. Optim.; Doikov, Mishchenko & Nesterov 2024,
    "Super-universal regularized Newton method", SIAM J. Optim.), the special case
    :math:`\gamma = \sqrt{\|g\|/L}`: the same test, with :math:`L` multiplied by 4 on rejection and divided by
    4 on acceptance (so that :math:`\gamma` halves or doubles at a fixed gradient); :math:`L` is the state
    carried between steps instead of :math:`\gamma`.

    If no attempt passes the test, the parameters stay where they were and a ``RuntimeWarning`` says so.

    Closure calls per group and step: one with gradient (and Hessian graph), one with gradient per evaluated
    attempt, and, with ``curvature="hessian"``, one more (with Hessian graph) before each new solve after a
    rejected attempt moved the parameters: at most ``2 * max_attempts``; two when the first attempt passes.
    Products: CG's iterations plus one per attempt. ``.grad`` is never read or written. Several parameter
    groups are stepped one after the other, each with its own :math:`\gamma` and curvature block.

    Args:
        params: Parameters or parameter groups.
        gamma: Initial :math:`\gamma > 0`.
        lipschitz: None for the :math:`\gamma` form; an initial :math:`L > 0` for
            :math:`\lambda = \sqrt{L \|g\|}`.
        curvature: ``"hessian"`` or a callable ``params -> operator``.
        preconditioner: None, or a callable ``(params, shift) -> operator`` approximating
            :math:`(B + \lambda I)^{-1}` for preconditioned CG, called for every solve with its regularization
            :math:`\lambda`: e.g. ``lambda params, shift: K.inverse(shift)`` for a
            :class:`~curvature.KFACOperator` ``K``.
        cg_tol: CG's relative residual tolerance in (0, 1); None for the forcing sequence
            :math:`\min(\tfrac12, \sqrt{\|g\|})`.
        cg_max_iter: Cap on CG iterations per solve; None for :math:`10 P`.
        max_attempts: Most solves per step.

    Raises:
        TypeError, ValueError: On a hyperparameter out of range or a group of mixed dtype or device.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 3).double()
        >>> x, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
        >>> opt = RegularizedNewton(model.parameters())
        >>> for _ in range(12):
        ...     loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> grad = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        >>> float(torch.cat([g.flatten() for g in grad]).norm()) < 1e-8
        True
    """

    def __init__(
        self,
        params: Any,
        gamma: float = 1.0,
        lipschitz: Optional[float] = None,
        *,
        curvature: CurvatureArg = "hessian",
        preconditioner: Optional[PreconditionerArg] = None,
        cg_tol: Optional[float] = None,
        cg_max_iter: Optional[int] = None,
        max_attempts: int = 40,
    ) -> None:
        defaults = dict(gamma=gamma, lipschitz=lipschitz, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
                        max_attempts=max_attempts)
        super().__init__(params, defaults, curvature, preconditioner)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._positive(group, "gamma")
        if group["lipschitz"] is not None:
            self._positive(group, "lipschitz")
        self._cg_options(group)
        check_count(group["max_attempts"], "max_attempts")

    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor], closure: Closure) -> torch.Tensor:
        start, op, params = self._prepare(closure, params)
        reinstate = kept_factors(op)
        first_loss = start.loss
        state = self._group_state(params)
        lipschitz_form = group["lipschitz"] is not None
        last = RegularizedNewtonState.read(state, gamma=group["gamma"], lipschitz=group["lipschitz"] or 0.0)
        gamma = float(last.gamma)
        lipschitz = float(last.lipschitz)
        grad_norm = float(start.grad.norm())
        origin = flatten(p.detach() for p in params).clone()
        x0: Optional[torch.Tensor] = None
        accepted, stale, matvecs, attempts = grad_norm == 0.0, False, 0, 0
        regularization = 0.0
        while not accepted and attempts < group["max_attempts"]:
            attempts += 1
            if lipschitz_form:
                gamma = math.sqrt(grad_norm / lipschitz)
            if stale:  # a rejected trial moved the parameters and so invalidated the Hessian's graph
                start = self._start(closure, params)
                op, stale = start.hessian, False
                grad_norm = float(start.grad.norm())  # the same for a deterministic closure
                if lipschitz_form:
                    gamma = math.sqrt(grad_norm / lipschitz)
            regularization = grad_norm / gamma
            step = regularized_newton_step(op, start.grad, gamma, x0=x0, tol=group["cg_tol"],
                                           preconditioner=self._preconditioner(params, regularization),
                                           max_iter=group["cg_max_iter"])
            matvecs += step.num_matvecs
            x0 = step.direction
            if not step.negative_curvature:
                assign(params, origin + step.direction)
                trial = evaluate(closure, params, order=1)
                trial_norm = float(trial.grad.norm()) if trial.grad is not None else float("nan")
                accepted = regularized_newton_accepts(start.value, trial.value, trial_norm, regularization,
                                                      loss_rounding(start.value, origin.dtype))
                if not accepted:
                    assign(params, origin)
                    stale = self.curvature == "hessian"
                    if reinstate is not None:  # K-FAC: the factors of this point, not a new pass over the data
                        reinstate()
            if accepted:
                gamma, lipschitz = 2.0 * gamma, lipschitz / 4.0
            else:
                gamma, lipschitz = 0.5 * gamma, 4.0 * lipschitz
        if not accepted:
            warnings.warn(
                f"RegularizedNewton: no step passed the acceptance test in {attempts} attempts; the parameters "
                "were left unchanged. A noisy closure (a new mini-batch per call) or a curvature that does not "
                "fit the loss can cause this.",
                RuntimeWarning,
                stacklevel=4,
            )
        RegularizedNewtonState(
            gamma=None if lipschitz_form else gamma, lipschitz=lipschitz if lipschitz_form else None,
            step=int(last.step) + 1, num_matvecs=int(last.num_matvecs) + matvecs, attempts=attempts,
            regularization=regularization,
        ).write(state)
        return first_loss
