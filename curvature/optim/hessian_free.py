"""Hessian-free optimization: truncated Newton-CG with Levenberg-Marquardt damping (Martens 2010)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._checks import check_count, check_scalar
from .._closure import Closure
from .._flat import flatten
from ._base import CurvatureArg, CurvatureOptimizer, PreconditionerArg, StateRecord, try_steps
from .functional import hessian_free_step, levenberg_marquardt_damping, loss_rounding, quadratic_model

__all__ = ["HessianFree", "HessianFreeState"]


@dataclass(frozen=True)
class HessianFreeState(StateRecord):
    r"""What :class:`HessianFree` keeps per parameter group, as entries of ``optimizer.state[first_param]``.

    ``HessianFreeState.read(optimizer.state[p])`` reads them (``p``: the group's first trainable parameter);
    the state itself stays a dict, so ``state_dict`` round trips are torch's.

    Attributes:
        damping: The damping :math:`\lambda` of the next step.
        direction: The last step's direction :math:`d` (the next CG's warm start), flat in the curvature's
            parameter order.
        step: The steps taken.
        num_matvecs: The curvature products spent over all steps.
        cg_iterations: CG's iterations in the last step.
        step_length: The step length :math:`\alpha` taken by the last step (0 when no trial was accepted).
        reduction_ratio: The last step's :math:`\rho` (NaN when the model predicted no decrease).
    """

    damping: Optional[float] = None
    direction: Optional[torch.Tensor] = None
    step: int = 0
    num_matvecs: int = 0
    cg_iterations: Optional[int] = None
    step_length: Optional[float] = None
    reduction_ratio: Optional[float] = None


class HessianFree(CurvatureOptimizer):
    r"""Hessian-free optimization: truncated Newton-CG on the damped curvature (Martens 2010).

    Each step solves :math:`(B + \lambda I)\, d = -g` by conjugate gradients
    (:func:`curvature.optim.functional.hessian_free_step`) and moves :math:`\theta \leftarrow \theta + \alpha d`:

    * ``B`` is the Hessian of the closure's loss (``curvature="hessian"``, products through its graph) or
      any operator a factory builds for the group's parameters, e.g. the Gauss-Newton matrix of Martens'
      paper: ``curvature=lambda params: curvature.GGNOperator(model, loss_fn, (x, y), params=params)``, or
      its Kronecker-factored approximation :class:`~curvature.KFACOperator` (:class:`~curvature.EKFACOperator`),
      whose factors are computed once per step.
    * CG is warm-started from ``warm_start`` times the previous step (Martens, Section 4.5), stops on the
      relative residual ``cg_tol`` (by default the forcing sequence :math:`\min(\tfrac12, \sqrt{\|g\|})`),
      after ``cg_max_iter`` iterations, or at a direction of negative curvature (an indefinite Hessian); when
      CG yields no descent direction the step is :math:`-g/\lambda`.
    * The damping follows the reduction ratio :math:`\rho = (f(\theta + \alpha d) - f(\theta)) / m(\alpha d)`,
      with :math:`m(d) = g^\top d + \tfrac12 d^\top B d` the undamped model: :math:`\lambda` times
      ``damping_increase`` when :math:`\rho < 1/4`, times ``damping_decrease`` when :math:`\rho > 3/4`
      (:func:`~curvature.optim.functional.levenberg_marquardt_damping`).
    * With ``backtrack=True`` the step length starts at ``lr`` and shrinks by 0.8 until the Armijo condition
      :math:`f(\theta + \alpha d) \le f(\theta) + 10^{-2} \alpha\, g^\top d` holds (Martens, Section 4.6),
      at most ``max_backtracks`` times. Without it the step :math:`\alpha = \text{lr}` is taken if it lowers the
      loss. A step that lowers nothing (or meets a non-finite loss) is not taken, and the damping grows.

    Martens, J. (2010). "Deep learning via Hessian-free optimization", ICML. Nocedal & Wright (2006),
    "Numerical Optimization", Section 7.1 (line-search Newton-CG).

    Closure calls per group and step: one differentiated twice (gradient and curvature products), then one
    value-only call per trial step: at most ``2 + max_backtracks``; two without backtracking.
    Products with ``B``: CG's iterations plus one or two. The optimizer never reads or writes ``.grad``.
    Several parameter groups are stepped one after the other, each with its own hyperparameters, damping
    and curvature block, holding the others fixed.

    Args:
        params: Parameters or parameter groups.
        lr: Initial step length :math:`\alpha` (1 is Newton's).
        damping: Initial :math:`\lambda \ge 0`.
        curvature: ``"hessian"`` or a callable ``params -> operator`` (see above).
        preconditioner: None, or a callable ``(params, damping) -> operator`` approximating
            :math:`(B + \lambda I)^{-1}` for preconditioned CG, called at every step with the current damping; the
            damped K-FAC inverse is the obvious one: ``K = curvature.KFACOperator(model, loss_fn, data)`` (its
            factors follow the parameters), ``preconditioner=lambda params, damping: K.inverse(damping)``.
        cg_tol: CG's relative residual tolerance in (0, 1); None for the forcing sequence.
        cg_max_iter: Cap on CG iterations per step (Martens used 250); None for :math:`10 P`.
        warm_start: Factor on the previous step used as CG's initial guess; 0 starts from zero.
        backtrack: Backtracking line search on the step length.
        max_backtracks: Most shrinkings of the step length.
        damping_increase: Factor (> 1) on :math:`\lambda` when the model fits poorly.
        damping_decrease: Factor (in (0, 1)) on :math:`\lambda` when it fits well.
        min_damping: Floor on :math:`\lambda`. The rule is multiplicative, so with ``damping=0`` and
            ``min_damping=0`` the damping never grows: on an indefinite Hessian pass ``min_damping > 0``.

    Raises:
        TypeError, ValueError: On a hyperparameter out of range or a group of mixed dtype or device.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
        >>> opt = HessianFree(model.parameters(), damping=1e-3)
        >>> for _ in range(6):
        ...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> grad = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))
        >>> float(torch.cat([g.flatten() for g in grad]).norm()) < 1e-8
        True
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        *,
        curvature: CurvatureArg = "hessian",
        preconditioner: Optional[PreconditionerArg] = None,
        cg_tol: Optional[float] = None,
        cg_max_iter: Optional[int] = 250,
        warm_start: float = 0.95,
        backtrack: bool = True,
        max_backtracks: int = 20,
        damping_increase: float = 1.5,
        damping_decrease: float = 2.0 / 3.0,
        min_damping: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr, damping=damping, cg_tol=cg_tol, cg_max_iter=cg_max_iter, warm_start=warm_start,
            backtrack=backtrack, max_backtracks=max_backtracks, damping_increase=damping_increase,
            damping_decrease=damping_decrease, min_damping=min_damping,
        )
        super().__init__(params, defaults, curvature, preconditioner)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._positive(group, "lr")
        self._positive(group, "damping", allow_zero=True)
        self._positive(group, "min_damping", allow_zero=True)
        self._cg_options(group)
        if not 0 <= check_scalar(group["warm_start"], "warm_start") <= 1:
            raise ValueError(f"warm_start must be in [0, 1], got {group['warm_start']}.")
        if not isinstance(group["backtrack"], bool):
            raise TypeError(f"backtrack must be a bool, got {type(group['backtrack']).__name__}.")
        check_count(group["max_backtracks"], "max_backtracks", minimum=0)
        if not check_scalar(group["damping_increase"], "damping_increase") > 1:
            raise ValueError(f"damping_increase must be above 1, got {group['damping_increase']}.")
        if not 0 < check_scalar(group["damping_decrease"], "damping_decrease") < 1:
            raise ValueError(f"damping_decrease must be in (0, 1), got {group['damping_decrease']}.")

    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor], closure: Closure) -> torch.Tensor:
        start, op, params = self._prepare(closure, params)
        state = self._group_state(params)
        last = HessianFreeState.read(state, damping=group["damping"])
        damping = float(last.damping)
        grad = start.grad
        x0 = None
        previous = last.direction
        if previous is not None and group["warm_start"] > 0 and previous.shape == grad.shape:
            x0 = group["warm_start"] * previous  # (a group whose trainable set changed starts CG from zero)
        step = hessian_free_step(op, grad, damping, x0=x0, tol=group["cg_tol"], max_iter=group["cg_max_iter"],
                                 preconditioner=self._preconditioner(params, damping))
        origin = flatten(p.detach() for p in params).clone()
        slope = float(torch.dot(grad, step.direction))
        slack = loss_rounding(start.value, origin.dtype)
        predicted = quadratic_model(grad, step.direction, step.curvature_product, float(group["lr"]))
        if group["backtrack"]:  # Armijo, shrinking by 0.8 (Martens, Section 4.6)
            tries = 1 + group["max_backtracks"]

            def accept(value: float, alpha: float) -> bool:
                return value <= start.value + 1e-2 * alpha * slope + slack
        else:  # the full step, if it lowers the loss
            tries = 1

            def accept(value: float, alpha: float) -> bool:
                return value < start.value + slack
        alpha, first = try_steps(closure, params, origin, step.direction, float(group["lr"]), 0.8, tries, accept)
        ratio = (first - start.value) / predicted if predicted < 0 else float("nan")
        if -predicted > slack:  # below the loss's rounding the ratio measures noise: keep the damping
            damping = levenberg_marquardt_damping(
                damping, ratio, group["damping_increase"], group["damping_decrease"], group["min_damping"]
            )
        HessianFreeState(
            damping=damping, direction=step.direction, step=int(last.step) + 1,
            num_matvecs=int(last.num_matvecs) + step.num_matvecs, cg_iterations=step.iterations, step_length=alpha,
            reduction_ratio=ratio,
        ).write(state)
        return start.loss
