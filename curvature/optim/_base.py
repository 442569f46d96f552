"""What the curvature-aware optimizers share: the closure, the curvature operator of a group, moves and checks.

An optimizer here is a ``torch.optim.Optimizer`` whose ``step(closure)`` differentiates the closure's loss
itself (DESIGN.md's closure contract) and never reads or writes ``.grad``. Each parameter group is updated in
turn with its own hyperparameters and state, holding the other groups fixed (block coordinate steps, so no
state or curvature couples two groups; with one group this is the plain method). Parameters with
``requires_grad=False`` are skipped.

Every closure call runs the model's forward pass, so a model whose forward pass updates buffers (batch norm in
train mode) updates them at every trial point too; evaluate such models in eval mode inside the closure, or
accept the extra updates. A curvature factory is called once per group and its operator reused: an operator
over a fixed batch stays on that batch while the closure's batch changes.

A step may be taken under ``torch.no_grad()`` or ``torch.inference_mode()``: it runs with inference mode off
(:func:`no_grad_step`) and differentiates the closure with autograd recording (:func:`evaluate`), so it takes
exactly the step taken outside them, and the state it keeps holds normal tensors. The closure contract
itself (evaluation, the Hessian through the loss's graph) is :mod:`curvature._closure`, shared with the
regularizers.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch

from .._checks import check_count, check_scalar, common_dtype_device
from .._closure import Closure, Point, evaluate, no_grad_step
from ..operators import CurvatureOperator, KFACOperator, LinearOperator

__all__ = ["CurvatureArg", "CurvatureOptimizer", "Point", "StateRecord", "evaluate", "kept_factors", "no_grad_step",
           "try_steps"]

CurvatureArg = Union[str, Callable[[list[torch.Tensor]], Any]]
Record = TypeVar("Record", bound="StateRecord")


class StateRecord:
    """Base of the frozen dataclasses that name what an optimizer keeps per parameter group between steps.

    torch keeps an optimizer's state as plain dicts of tensors and numbers (``state_dict`` saves them,
    ``load_state_dict`` and ``torch.load(..., weights_only=True)`` read them back), so a record is never stored
    itself: it is read from, and written into, the group's state dict entry by entry under its field names,
    and ``state_dict`` round trips are those of the dicts.
    """

    @classmethod
    def read(cls: type[Record], state: Mapping[str, Any], **initial: Any) -> Record:
        """The record the last step wrote into ``state``.

        Args:
            state: The group's state dict (``optimizer.state[first_param]``).
            **initial: Values for the entries not in ``state`` (before the first step), by field name; other
                missing entries take the field's default.

        Returns:
            The record.
        """
        written = {f.name: state[f.name] for f in fields(cast(Any, cls)) if f.name in state}
        return cls(**{**initial, **written})

    def write(self, state: dict[str, Any]) -> None:
        """Write every field that is not None into ``state`` under its name, in field order.

        Args:
            state: The group's state dict (``optimizer.state[first_param]``).
        """
        for f in fields(cast(Any, self)):
            value = getattr(self, f.name)
            if value is not None:
                state[f.name] = value


@torch.no_grad()
def assign(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat vector into the parameters, in order."""
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def try_steps(closure: Closure, params: list[torch.Tensor], origin: torch.Tensor, direction: torch.Tensor,
              alpha: float, shrink: float, tries: int, accept: Callable[[float, float], bool]) -> tuple[float, float]:
    """Move to ``origin + alpha * direction``, shrinking ``alpha`` until ``accept(loss, alpha)`` holds.

    At most ``tries`` closure calls (value only). If no trial is accepted the parameters go back to ``origin``
    (bit for bit) and the step length is 0.

    Returns:
        ``(step length taken, loss at the first trial)``.
    """
    first = float("nan")
    for trial in range(tries):
        assign(params, origin + alpha * direction)
        value = evaluate(closure, params, order=0).value
        if trial == 0:
            first = value
        if accept(value, alpha):
            return alpha, first
        alpha *= shrink
    assign(params, origin)
    return 0.0, first


#: A preconditioner factory: ``(params, shift) -> operator`` approximating :math:`(B + \text{shift}\, I)^{-1}`.
PreconditionerArg = Callable[[list, float], Any]


def kept_factors(op: Any) -> Optional[Callable[[], None]]:
    """For a K-FAC or EK-FAC operator: a function that reinstates its factors at the current parameters.

    Its factors are recomputed whenever the parameters are written, also when a rejected trial point is written
    back bit for bit (the write is what the operator sees). Called after such a write-back, the function returned
    hands the operator the factors of this point again (:meth:`~curvature.KFACOperator.load_state_dict`), so a
    rejected attempt costs no pass over the data. None for other operators.
    """
    if not isinstance(op, KFACOperator):
        return None
    state = op.state_dict()  # computes the factors here, now (the first product would)
    return lambda: op.load_state_dict(state)


def check_curvature(curvature: Any) -> CurvatureArg:
    """Check the ``curvature`` argument of an optimizer: ``"hessian"`` or a factory of operators."""
    if isinstance(curvature, str):
        if curvature != "hessian":
            raise ValueError(
                f"curvature must be 'hessian' or a callable params -> operator, got {curvature!r}; for the GGN "
                "use curvature=lambda params: curvature.GGNOperator(model, loss_fn, data, params=params)."
            )
        return curvature
    if isinstance(curvature, LinearOperator) or isinstance(curvature, torch.Tensor) or not callable(curvature):
        raise TypeError(
            "curvature must be 'hessian' or a callable that builds the operator for a list of parameters, e.g. "
            "lambda params: curvature.GGNOperator(model, loss_fn, data, params=params); got "
            f"{type(curvature).__name__}."
        )
    return curvature


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that build a curvature operator from a closure.

    Subclasses implement :meth:`_group_step` for one group and declare their hyperparameter checks in
    :meth:`_check_group`.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], curvature: CurvatureArg,
                 preconditioner: Optional[PreconditionerArg] = None) -> None:
        self.curvature = check_curvature(curvature)
        if preconditioner is not None and (isinstance(preconditioner, (LinearOperator, torch.Tensor))
                                           or not callable(preconditioner)):
            raise TypeError(
                "preconditioner must be None or a callable (params, shift) -> operator approximating the inverse of "
                "the shifted curvature, e.g. lambda params, shift: K.inverse(shift) for K = "
                f"curvature.KFACOperator(model, loss_fn, data); got {type(preconditioner).__name__}."
            )
        self.preconditioner = preconditioner
        self._operators: dict[tuple[int, ...], tuple[Any, list[torch.Tensor]]] = {}
        super().__init__(params, defaults)

    def _preconditioner(self, params: list[torch.Tensor], shift: float) -> Any:
        """The preconditioner of this step's CG (None without a factory)."""
        if self.preconditioner is None:
            return None
        return self.preconditioner(list(params), shift)

    # -- groups ----------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its hyperparameters, dtype and device.

        Raises:
            TypeError, ValueError: On a hyperparameter out of range, or parameters of mixed dtype or device.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        trainable = [p for p in group["params"] if p.requires_grad]
        if trainable:
            common_dtype_device(trainable, "the parameters of a group")
        self._check_group(group)

    @abstractmethod
    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (raise ``TypeError``/``ValueError``)."""

    @staticmethod
    def _positive(group: dict[str, Any], name: str, allow_zero: bool = False) -> None:
        value = check_scalar(group[name], name)
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}.")

    @staticmethod
    def _cg_options(group: dict[str, Any]) -> None:
        if group["cg_tol"] is not None:
            tol = check_scalar(group["cg_tol"], "cg_tol")
            if not 0 < tol < 1:
                raise ValueError(f"cg_tol must be in (0, 1) or None (the forcing sequence), got {tol}.")
        if group["cg_max_iter"] is not None:
            check_count(group["cg_max_iter"], "cg_max_iter")

    # -- the step ----------------------------------------------------------------------------------
    @no_grad_step
    def step(self, closure: Optional[Closure] = None) -> torch.Tensor:  # type: ignore[override]
        """Take one step of every parameter group.

        Under ``torch.no_grad()`` or ``torch.inference_mode()`` the step is the one taken outside them.

        Args:
            closure: Re-evaluates the model and returns the scalar loss with its graph, without calling
                ``backward`` (see the class docstring for how often it is called).

        Returns:
            The loss at the start of the step (detached).

        Raises:
            TypeError: If no callable closure is given or it returns something other than a tensor.
            ValueError: If the loss is not a scalar, has no graph, was already differentiated (the closure
                called ``backward``), or is not finite at the start of a group's step, or its gradient is not
                finite; the parameters and the state of every group are then restored.
        """
        if closure is None or not callable(closure):
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that returns the loss without calling backward, "
                "e.g. optimizer.step(lambda: loss_fn(model(x), y))."
            )
        groups = [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]
        groups = [(group, params) for group, params in groups if params]
        if not groups:
            return evaluate(closure, [], order=0).loss
        saved = [[p.detach().clone() for p in params] for _, params in groups]
        # The groups' state (damping, gamma, ...): values are replaced, never mutated, so shallow copies do.
        saved_state = {p: dict(self.state[p]) for _, params in groups for p in params if p in self.state}
        first: Optional[torch.Tensor] = None
        try:
            for group, params in groups:
                loss = self._group_step(group, params, closure)
                first = loss if first is None else first
        except BaseException:
            for (_, params), copies in zip(groups, saved):
                for p, c in zip(params, copies):
                    p.copy_(c)
                    if p in saved_state:
                        self.state[p] = saved_state[p]
                    else:
                        self.state.pop(p, None)
            raise
        return cast(torch.Tensor, first)

    @abstractmethod
    def _group_step(self, group: dict[str, Any], params: list[torch.Tensor], closure: Closure) -> torch.Tensor:
        """Update one group's parameters in place and return the loss at its start."""

    # -- helpers for subclasses -------------------------------------------------------------------
    def _start(self, closure: Closure, params: list[torch.Tensor]) -> Point:
        """Evaluate the closure with its gradient (and Hessian graph); refuse a non-finite loss or gradient."""
        point = evaluate(closure, params, order=2 if self.curvature == "hessian" else 1)
        if not math.isfinite(point.value):
            raise ValueError(
                f"the closure returned a non-finite loss ({point.value}) at the current parameters; the step "
                "was not taken and the parameters are unchanged. Check the data and the model's outputs, lower "
                "the step size or raise the damping."
            )
        if not point.finite:
            raise ValueError(
                "the gradient of the loss holds NaN or Inf at the current parameters; the step was not taken "
                "and the parameters are unchanged."
            )
        return point

    def _prepare(self, closure: Closure, params: list[torch.Tensor]) -> tuple[Point, Any, list[torch.Tensor]]:
        """Evaluate the start of a group's step: the point, the curvature operator there, and the layout.

        The layout is the order of the parameters in flat vectors: the group's, or, for a curvature operator
        from the factory, the operator's own (the same tensors, in ``model.parameters()`` order).
        """
        if self.curvature == "hessian":
            point = self._start(closure, params)
            return point, point.hessian, params
        op, params = self._factory_operator(params)
        return self._start(closure, params), op, params

    def _factory_operator(self, params: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """Build (once per group) the operator of the curvature factory and its parameter order."""
        key = tuple(sorted(id(p) for p in params))
        if key not in self._operators:
            op = cast(Callable[[list[torch.Tensor]], Any], self.curvature)(list(params))
            order = params
            if isinstance(op, CurvatureOperator):
                if sorted(id(p) for p in op.params) != list(key):
                    raise ValueError(
                        "the curvature factory built an operator over other parameters than the group's; pass "
                        "params=params to the operator."
                    )
                order = list(op.params)  # the operator's layout (model order) decides the flat vectors'
            size = sum(p.numel() for p in params)
            shape = tuple(getattr(op, "shape", ()))
            if shape != (size, size):
                raise ValueError(
                    f"the curvature factory returned an operator of shape {shape} for a group of {size} "
                    "parameters; it must build the operator over exactly the parameters it is given, in order."
                )
            self._operators[key] = (op, order)
        return self._operators[key]

    def _group_state(self, params: list[torch.Tensor]) -> dict[str, Any]:
        """The group's state lives with its first trainable parameter (so ``state_dict`` carries it)."""
        return self.state[params[0]]
