"""Optimizers that wrap a base optimizer (SAM, gradient regularization): shared groups, state and checks.

The wrapper computes a modified gradient, writes it into ``.grad`` and lets the base optimizer (SGD,
Adam, ...) take the step. The base optimizer is built on the wrapper's own parameter groups, so both see
the same groups and hyperparameters, and ``state_dict`` is the base optimizer's (momentum buffers
included) with the wrapper's hyperparameters in its groups.

The closure is evaluated by :func:`curvature._closure.checked_point`, which applies the regularizers' rule
(:func:`curvature._checks.check_uses_params`): a loss that depends on none of the parameters is refused.
Steps are decorated with :func:`curvature._closure.no_grad_step`, so that under ``torch.no_grad()`` or
``torch.inference_mode()`` they take the step taken outside them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch

from .._closure import Closure

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that modify the gradient and delegate the step to a base optimizer.

    Args:
        params: Parameters or parameter groups.
        base_optimizer: The base optimizer's class (``torch.optim.SGD``, ...).
        defaults: The wrapper's own hyperparameters (defaults for every group).
        base_kwargs: Keyword arguments of the base optimizer (``lr=0.1, momentum=0.9``, ...).

    Raises:
        TypeError: If ``base_optimizer`` is not an optimizer class (an instance, say).
    """

    def __init__(self, params: Any, base_optimizer: Any, defaults: dict[str, Any],
                 base_kwargs: dict[str, Any]) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, with its arguments passed as "
                f"keywords (lr=0.1, momentum=0.9), got {type(base_optimizer).__name__}"
                f"{' (an instance: pass its class)' if isinstance(base_optimizer, torch.optim.Optimizer) else ''}."
            )
        self._own = dict(defaults)
        super().__init__(params, {**defaults, **base_kwargs})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (to the base optimizer too) after checking the wrapper's hyperparameters."""
        for key, value in self._own.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # during construction, before the base optimizer exists
            super().add_param_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate the wrapper's hyperparameters of a group (raise ``TypeError``/``ValueError``)."""

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its groups carry the wrapper's hyperparameters too."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` into the base optimizer (and so into the wrapper)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def _trainable(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        return [(g, ps) for g, ps in groups if ps]

    @staticmethod
    def _set_grads(params: Iterable[torch.Tensor], grads: Iterable[Optional[torch.Tensor]],
                   unused: Optional[list[bool]] = None) -> None:
        """Replace ``.grad`` by the given gradients (what the base optimizer reads).

        A parameter the loss does not use gets ``.grad = None``, as ``backward`` leaves it, so that the base
        optimizer skips it (no weight decay or momentum step on it).
        """
        flags = unused if unused is not None else [False] * len(list(params))
        for p, g, skip in zip(params, grads, flags):  # fresh tensors from autograd: no copy needed
            p.grad = None if g is None or skip else g.detach()

    @staticmethod
    def _check_closure(closure: Optional[Closure], name: str) -> Closure:
        if closure is None or not callable(closure):
            raise TypeError(
                f"{name}.step needs a closure that returns the loss without calling backward, e.g. "
                "optimizer.step(lambda: loss_fn(model(x), y))."
            )
        return closure
