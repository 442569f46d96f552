"""Saddle-free Newton in a Krylov subspace (Dauphin et al. 2014)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .._checks import check_count
from .._closure import Closure
from .._flat import flatten
from ._base import CurvatureArg, CurvatureOptimizer, StateRecord, assign, try_steps
from .functional import loss_rounding, saddle_free_newton_step

__all__ = ["SaddleFreeNewton", "SaddleFreeNewtonState"]


@dataclass(frozen=True)
class SaddleFreeNewtonState(StateRecord):
    r"""What :class:`SaddleFreeNewton` keeps per parameter group, as entries of ``optimizer.state[first_param]``.

    ``SaddleFreeNewtonState.read(optimizer.state[p])`` reads them (``p``: the group's first trainable
    parameter); the state itself stays a dict, so ``state_dict`` round trips are torch's.

    Attributes:
        step: The steps taken.
        num_matvecs: The curvature products spent over all steps.
        step_length: The step length :math:`\alpha` taken by the last step (0 when no trial was accepted).
        min_ritz_value: The smallest Ritz value of the last step's Krylov space (NaN when it was empty).
    """

    step: int = 0
    num_matvecs: int = 0
    step_length: Optional[float] = None
    min_ritz_value: Optional[float] = None


class SaddleFreeNewton(CurvatureOptimizer):
    r"""Saddle-free Newton: Newton's step with the curvature's eigenvalues replaced by their absolute values.

    Each step runs ``krylov_dim`` Lanczos steps on the curvature ``B`` (the Hessian by default) from the
    gradient, giving an orthonormal basis :math:`V` of :math:`\mathcal{K}_k(B, g)` and
    :math:`V^\top B V = U \Theta U^\top`, and moves

    .. math:: \theta \leftarrow \theta - \alpha\, V U \big(|\Theta| + \delta I\big)^{-1} U^\top V^\top g

    (:func:`curvature.optim.functional.saddle_free_newton_step`). Along a direction of negative curvature
    the step goes downhill, away from a saddle point, with a length set by the curvature's magnitude; Newton's
    step :math:`-B^{-1} g` goes towards the saddle instead, and gradient descent leaves it only as fast as
    :math:`(1 + \alpha |\lambda_{\min}|)^t` (Dauphin, Pascanu, Gulcehre, Cho, Ganguli & Bengio 2014,
    "Identifying and attacking the saddle point problem in high-dimensional non-convex optimization",
    NeurIPS, arXiv:1406.2572, Algorithm 1). The damping :math:`\delta` keeps the step finite where the
    curvature is nearly zero. With ``backtrack=True`` (the default) the step length :math:`\alpha` starts at
    ``lr`` and halves until :math:`f(\theta + \alpha d) \le f(\theta) + 10^{-4} \alpha\, g^\top d` (Armijo),
    at most ``max_backtracks`` times; if none passes, the parameters stay.

    Backtracking matters away from the toy problems: where the curvature along the step changes quickly (a
    deep linear network near its saddle), full saddle-free steps overshoot and the loss can grow by orders
    of magnitude, while the backtracked steps reach the global minimum (measured in
    ``tests/test_optim_problems.py``).

    Closure calls per group and step: one differentiated twice (gradient and Hessian products), plus one
    value-only call per trial with ``backtrack=True`` (at most ``2 + max_backtracks``); one without. Products:
    ``krylov_dim`` (fewer if the Krylov space is exhausted). Memory: ``krylov_dim`` vectors of size ``P``.
    ``.grad`` is never read or written; parameter groups are stepped one after the other.

    Args:
        params: Parameters or parameter groups.
        lr: Step length :math:`\alpha` (the first one tried with backtracking).
        damping: :math:`\delta \ge 0` added to the absolute Ritz values.
        krylov_dim: Dimension ``k`` of the Krylov subspace (capped at the group's size).
        curvature: ``"hessian"`` or a callable ``params -> operator``.
        backtrack: Armijo backtracking on the step length.
        max_backtracks: Most halvings of the step length.

    Raises:
        TypeError, ValueError: On a hyperparameter out of range or a group of mixed dtype or device.

    Example:
        >>> xy = torch.nn.Parameter(torch.tensor([1.0, 1e-3], dtype=torch.float64))
        >>> f = lambda: xy[0] ** 2 - xy[1] ** 2 + xy[1] ** 4 / 4  # a saddle at 0, minima at (0, ±√2)
        >>> opt = SaddleFreeNewton([xy], damping=1e-8)
        >>> for _ in range(15):
        ...     loss = opt.step(f)
        >>> xy.detach().round(decimals=8).tolist()
        [0.0, 1.41421356]
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1e-4,
        krylov_dim: int = 20,
        *,
        curvature: CurvatureArg = "hessian",
        backtrack: bool = True,
        max_backtracks: int = 20,
    ) -> None:
        defaults = dict(lr=lr, damping=damping, krylov_dim=krylov_dim, backtrack=backtrack,
                        max_backtracks=max_backtracks)
        super().__init__(params, defaults, curvature)

    def _check_group(self, group: dict[str, Any]) -> None:
        self._positive(group, "lr")
        self._positive(group, "damping", allow_zero=True)
        check_count(group["krylov_dim"], "krylov_dim")
        if not isinstance(group["backtrack"], bool):
            raise TypeError(f"backtrack must be a bool, got {type(group['backtrack']).__name__}.")
        check_count(group["max_backtracks"], "max_backtracks", minimum=0)

    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor], closure: Closure) -> torch.Tensor:
        start, op, params = self._prepare(closure, params)
        state = self._group_state(params)
        last = SaddleFreeNewtonState.read(state)
        step = saddle_free_newton_step(op, start.grad, num_steps=group["krylov_dim"], damping=group["damping"])
        origin = flatten(p.detach() for p in params).clone()
        alpha = float(group["lr"])
        if group["backtrack"]:  # Armijo, halving
            slope = float(torch.dot(start.grad, step.direction))
            slack = loss_rounding(start.value, origin.dtype)
            alpha, _ = try_steps(closure, params, origin, step.direction, alpha, 0.5, group["max_backtracks"] + 1,
                                 lambda value, a: value <= start.value + 1e-4 * a * slope + slack)
        else:
            assign(params, origin + alpha * step.direction)
        SaddleFreeNewtonState(
            step=int(last.step) + 1, num_matvecs=int(last.num_matvecs) + step.num_matvecs, step_length=alpha,
            min_ritz_value=float(step.ritz_values[0]) if step.ritz_values.numel() else float("nan"),
        ).write(state)
        return start.loss
