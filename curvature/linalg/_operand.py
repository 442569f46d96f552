"""The view of an operator that every estimator and solver works through.

An estimator accepts anything with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator, a
:class:`~curvature.LinearOperator` built from others, or a dense symmetric ``torch.Tensor``. :class:`Operand`
checks that object once, multiplies through it and counts the products the estimator spends, so results
report their own cost whatever the operator keeps count of.

Reading a value from a GPU makes the host wait for every kernel queued before it (a host synchronisation).
An estimator that reads one per product keeps the GPU idle between products, so the estimators here create
their :class:`Operand` with ``deferred=True``: the finiteness of each product is then accumulated on the
device and read, together with whatever else the estimator needs on the host, in one transfer
(:meth:`Operand.fetch`) at its end or at its convergence checks.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_finite

__all__ = ["CHECK_EVERY", "Operand", "until_check"]

CHECK_EVERY = 8  # the most products an adaptive estimator runs between two host reads of its state
_HINT = "check the model, loss and data for NaN or overflow."


def until_check(done: int) -> int:
    """The number of iterations to run before an adaptive method next reads its state on the host.

    One iteration at a time for the first four, then half as many as are done, up to :data:`CHECK_EVERY`:
    checks after iterations 1, 2, 3, 4, 6, 9, 13, 19, 27, 35, ... A method that stops early (a warm start,
    a tiny operator) stops where it would with a check per iteration, and a long run reads its state once
    per :data:`CHECK_EVERY` iterations, for at most ``CHECK_EVERY - 1`` iterations too many (which cost
    products but, undone on the device, do not change the result).

    Args:
        done: Iterations done so far.

    Returns:
        How many to run before the next check, at least 1.
    """
    return min(CHECK_EVERY, max(1, done // 2))


class Operand:
    """A validated square symmetric operator with a product counter.

    Args:
        op: The operator: any object with ``@``, a square ``.shape``, a floating ``.dtype`` and a
            ``.device``.
        name: The argument's name, for error messages.
        deferred: Check the finiteness of products on the device and raise at the next :meth:`fetch` or
            :meth:`check` instead of after each product (which reads a value on the host per product).

    Raises:
        TypeError: If ``op`` lacks ``@``, a shape, a floating dtype or a device.
        ValueError: If it is not square, is empty, or says it is not symmetric.
    """

    def __init__(self, op: Any, name: str = "op", *, deferred: bool = False) -> None:
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
        self.deferred = deferred
        self._finite: torch.Tensor | None = None  # with deferred checks: all products so far finite (device)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply ``(P,)`` or ``(P, k)`` by the operator, count ``k`` products and check the result."""
        out = self.op @ V
        if not isinstance(out, torch.Tensor) or out.shape != V.shape:
            raise ValueError(
                f"{self.name} @ v returned {getattr(out, 'shape', type(out).__name__)} for an operand of shape "
                f"{tuple(V.shape)}; an operator must map (P,) to (P,) and (P, k) to (P, k)."
            )
        if self.deferred:
            finite = torch.isfinite(out).all()
            self._finite = finite if self._finite is None else self._finite & finite
        else:
            check_finite(out, f"a product with {self.name}", _HINT)
        self.num_matvecs += 1 if V.ndim == 1 else V.shape[1]
        return out

    def fetch(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Bring ``tensors`` to the host as float64 in one transfer, and check the products so far.

        The tensors are flattened and concatenated on the device, together with the deferred finiteness flag,
        and read at once: one host synchronisation, however many values an estimator needs. Meant for small
        tensors (coefficients, scalars), not for vectors of the operator's size.

        Args:
            tensors: Real or boolean tensors on the operator's device (integers up to ``2**53`` are exact).

        Returns:
            The tensors as float64 CPU tensors, in their shapes.

        Raises:
            ValueError: If a product since the operand was created held NaN or Inf.
        """
        values = self.fetch_floats(*tensors)
        out, start = [], 0
        for t in tensors:
            out.append(torch.tensor(values[start : start + t.numel()], dtype=torch.float64).reshape(t.shape))
            start += t.numel()
        return out

    def fetch_floats(self, *tensors: torch.Tensor) -> list[float]:
        """Like :meth:`fetch`, but return the entries of all ``tensors``, flattened, as one list of floats.

        Raises:
            ValueError: If a product since the operand was created held NaN or Inf.
        """
        flag = self._finite if self._finite is not None else torch.ones((), dtype=torch.bool, device=self.device)
        parts = [t.detach().reshape(-1).to(device=self.device, dtype=torch.float64) for t in (*tensors, flag)]
        values = torch.cat(parts).tolist()
        if not values.pop():
            raise ValueError(f"a product with {self.name} contains NaN or Inf; {_HINT}")
        return values

    def check(self) -> None:
        """Raise if a product held NaN or Inf: one host synchronisation with deferred checks, none without.

        Raises:
            ValueError: If one did.
        """
        if self._finite is not None:
            self.fetch_floats()

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
