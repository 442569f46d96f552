"""The view of an operator that every estimator and solver works through.

An estimator accepts anything with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator, a
:class:`~curvature.LinearOperator` built from others, or a dense symmetric ``torch.Tensor``. :class:`Operand`
checks that object once, multiplies through it and counts the products the estimator spends, so results
report their own cost whatever the operator keeps count of.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_finite

__all__ = ["Operand"]


class Operand:
    """A validated square symmetric operator with a product counter.

    Args:
        op: The operator: any object with ``@``, a square ``.shape``, a floating ``.dtype`` and a
            ``.device``.
        name: The argument's name, for error messages.

    Raises:
        TypeError: If ``op`` lacks ``@``, a shape, a floating dtype or a device.
        ValueError: If it is not square, is empty, or says it is not symmetric.
    """

    def __init__(self, op: Any, name: str = "op") -> None:
        if not hasattr(op, "__matmul__") or not all(hasattr(op, a) for a in ("shape", "dtype", "device")):
            raise TypeError(
                f"{name} must support `@` and have .shape, .dtype and .device (a curvature operator or a dense "
                f"torch.Tensor), got {type(op).__name__}; wrap numpy or scipy matrices with torch.as_tensor."
            )
        shape = tuple(op.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{name} must be square, got shape {shape}.")
        if shape[0] == 0:
            raise ValueError(f"{name} has shape {shape}: there is nothing to estimate; check the params selection.")
        if not isinstance(op.dtype, torch.dtype) or not op.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating torch dtype, got {op.dtype}.")
        if getattr(op, "is_symmetric", True) is False:
            raise ValueError(
                f"{name} is not symmetric; these estimators and solvers assume a symmetric operator "
                "(Hessian, GGN, Fisher, or sums and damped versions of them)."
            )
        self.op = op
        self.name = name
        self.size = int(shape[0])
        self.dtype = op.dtype
        self.device = torch.device(op.device)
        self.is_psd = bool(getattr(op, "is_psd", False))
        self.num_matvecs = 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply ``(P,)`` or ``(P, k)`` by the operator, count ``k`` products and check the result."""
        out = self.op @ V
        if not isinstance(out, torch.Tensor) or out.shape != V.shape:
            raise ValueError(
                f"{self.name} @ v returned {getattr(out, 'shape', type(out).__name__)} for an operand of shape "
                f"{tuple(V.shape)}; an operator must map (P,) to (P,) and (P, k) to (P, k)."
            )
        check_finite(out, f"a product with {self.name}", "check the model, loss and data for NaN or overflow.")
        self.num_matvecs += 1 if V.ndim == 1 else V.shape[1]
        return out

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zero tensor with the operator's dtype and device."""
        return torch.zeros(*shape, dtype=self.dtype, device=self.device)

    def check_vector(self, v: Any, name: str) -> torch.Tensor:
        """Check that ``v`` is a ``(P,)`` tensor matching the operator and return it, detached from autograd.

        Raises:
            TypeError: If ``v`` is not a tensor or its dtype differs.
            ValueError: If its shape or device differ or it is not finite.
        """
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({self.size},), got {type(v).__name__}.")
        if v.shape != (self.size,):
            raise ValueError(f"{name} has shape {tuple(v.shape)}, but the operator needs ({self.size},).")
        if v.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {v.dtype} but the operator has dtype {self.dtype}; use .to().")
        if v.device != self.device:
            raise ValueError(f"{name} is on {v.device} but the operator is on {self.device}; use .to().")
        check_finite(v, name, f"pass a finite {name}.")
        return v.detach()
