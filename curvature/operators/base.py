"""Matrix-free linear operators: the one interface every estimator and solver relies on.

An operator only multiplies. Subclasses implement :meth:`LinearOperator._matmat` for a ``(P, k)`` matrix;
the base class brings validation, ``@`` on vectors and matrices, the product counter, lazy algebra
(``+``, ``-``, scalar ``*``), damping, :meth:`~LinearOperator.to_dense` and
:meth:`~LinearOperator.to_scipy`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from .._checks import check_operand, check_scalar

__all__ = ["HALF", "IdentityOperator", "LinearOperator", "identity_like"]

HALF = (torch.float16, torch.bfloat16)  # the dtypes whose products higher_precision() can refine


class LinearOperator(ABC):
    """A square matrix ``A`` of shape ``(P, P)`` known only through products ``A @ v``.

    Attributes:
        shape: ``(P, P)``.
        dtype: The dtype of products.
        device: The device of products.
        is_symmetric: True when ``A`` is known to be symmetric.
        is_psd: True when ``A`` is known to be positive semi-definite.
        num_matvecs: Products spent so far; a ``(P, k)`` matmat counts ``k``.
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        is_symmetric: bool = True,
        is_psd: bool = False,
    ) -> None:
        self.shape = (int(size), int(size))
        self.dtype = dtype
        self.device = torch.device(device)
        self.is_symmetric = is_symmetric
        self.is_psd = is_psd
        self.num_matvecs = 0

    # -- the one method subclasses implement -------------------------------------------------------
    @abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A @ V`` for a validated ``(P, k)`` matrix ``V``."""

    # -- products ----------------------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply by a matrix.

        Args:
            V: Tensor of shape ``(P, k)`` with the operator's dtype and device.

        Returns:
            ``A @ V`` of shape ``(P, k)``.

        Raises:
            ValueError: If ``V`` is not of shape ``(P, k)``.
        """
        check_operand(V, self.shape[1], self.dtype, self.device, "V")
        if V.ndim != 2:
            raise ValueError(f"matmat needs a matrix of shape ({self.shape[1]}, k), got {tuple(V.shape)}.")
        if V.shape[1] == 0:
            return V.new_zeros(self.shape[0], 0)
        out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Multiply by a vector.

        Args:
            v: Tensor of shape ``(P,)`` with the operator's dtype and device.

        Returns:
            ``A @ v`` of shape ``(P,)``.

        Raises:
            ValueError: If ``v`` is not of shape ``(P,)``.
        """
        check_operand(v, self.shape[1], self.dtype, self.device, "v")
        if v.ndim != 1:
            raise ValueError(f"matvec needs a vector of shape ({self.shape[1]},), got {tuple(v.shape)}.")
        out = self._matmat(v.unsqueeze(1)).squeeze(1)
        self.num_matvecs += 1
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor) and v.ndim == 1:
            return self.matvec(v)
        check_operand(v, self.shape[1], self.dtype, self.device, "v")
        return self.matmat(v)

    # -- dense and scipy views -------------------------------------------------------------------
    def to_dense(self, chunk_size: int = 256) -> torch.Tensor:
        """Materialize the operator as a dense ``(P, P)`` tensor by multiplying identity columns.

        Costs ``P`` products and ``P**2`` memory: meant for small models and tests.

        Args:
            chunk_size: Number of identity columns multiplied at once.

        Returns:
            The dense matrix.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
        size = self.shape[1]
        columns = []
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            E = torch.zeros(size, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            columns.append(self.matmat(E))
        return torch.cat(columns, dim=1)

    def to_scipy(self) -> Any:
        """Wrap the operator as a ``scipy.sparse.linalg.LinearOperator``.

        NumPy inputs are converted to the operator's dtype and device and the products back to NumPy,
        so ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=1)`` works out of the box.

        Returns:
            A scipy ``LinearOperator`` of the same shape.
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def apply(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)
            return (self @ t).detach().cpu().numpy()

        return ScipyLinearOperator(
            shape=self.shape, matvec=apply, rmatvec=apply if self.is_symmetric else None,
            matmat=apply, dtype=np_dtype,
        )

    # -- lazy algebra ------------------------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            raise TypeError(
                f"can only add another LinearOperator to {type(self).__name__}, got {type(other).__name__}; "
                "for a shift use op + c * curvature.identity_like(op) or op.damped(c)."
            )
        return SumOperator(self, other)

    def __radd__(self, other: Any) -> LinearOperator:
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        return self.__add__(other)

    def __sub__(self, other: Any) -> LinearOperator:
        return self + (-1.0) * other

    def __neg__(self) -> LinearOperator:
        return (-1.0) * self

    def __mul__(self, scale: Any) -> LinearOperator:
        return ScaledOperator(self, check_scalar(scale, "scale"))

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> LinearOperator:
        divisor = check_scalar(scale, "scale")
        if divisor == 0:
            raise ValueError("cannot divide an operator by zero.")
        return ScaledOperator(self, 1.0 / divisor)

    def damped(self, damping: float) -> LinearOperator:
        """Return ``A + damping * I`` (Levenberg-Marquardt / Tikhonov damping), evaluated lazily.

        Args:
            damping: The shift; a non-negative shift keeps a PSD operator PSD.

        Returns:
            The damped operator.
        """
        return self + check_scalar(damping, "damping") * identity_like(self)

    def higher_precision(self) -> LinearOperator | None:
        """The same operator with its products evaluated in float32, for a float16 or bfloat16 operator.

        A half-precision product is only as exact as its dtype (and, for a model near a minimum, can be far
        less: a half-precision forward pass rounds the softmax probabilities the curvature depends on). The
        estimators use this view to certify what they report with a few float32 products; operators that
        cannot provide it return None (the default), and so does any operator already in float32 or float64.

        Returns:
            A float32 operator, or None.
        """
        return None

    def __repr__(self) -> str:
        flags = [f for f, on in (("symmetric", self.is_symmetric), ("psd", self.is_psd)) if on]
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device}"
            f"{', ' + ', '.join(flags) if flags else ''})"
        )


def _check_compatible(a: LinearOperator, b: LinearOperator) -> None:
    if a.shape != b.shape:
        raise ValueError(f"cannot combine operators of shapes {a.shape} and {b.shape}.")
    if a.dtype != b.dtype:
        raise TypeError(f"cannot combine operators of dtypes {a.dtype} and {b.dtype}.")
    if a.device != b.device:
        raise ValueError(f"cannot combine operators on devices {a.device} and {b.device}.")


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``P``."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(size, dtype, device, is_symmetric=True, is_psd=True)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()

    def higher_precision(self) -> IdentityOperator | None:  # noqa: D102 (see LinearOperator)
        if self.dtype not in HALF:
            return None
        return IdentityOperator(self.shape[0], torch.float32, self.device)


def identity_like(op: LinearOperator) -> IdentityOperator:
    """Return the identity with the shape, dtype and device of ``op``.

    Args:
        op: Any square operator.

    Returns:
        The matching :class:`IdentityOperator`, for ``op + c * identity_like(op)``.
    """
    return IdentityOperator(op.shape[0], op.dtype, op.device)


class ScaledOperator(LinearOperator):
    """``scale * A`` for a real scalar ``scale``."""

    def __init__(self, op: LinearOperator, scale: float) -> None:
        super().__init__(
            op.shape[0], op.dtype, op.device, is_symmetric=op.is_symmetric, is_psd=op.is_psd and scale >= 0
        )
        self.op, self.scale = op, scale

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * self.op.matmat(V)

    def higher_precision(self) -> LinearOperator | None:  # noqa: D102 (see LinearOperator)
        inner = self.op.higher_precision()
        return None if inner is None else ScaledOperator(inner, self.scale)


class SumOperator(LinearOperator):
    """``A + B``, evaluated lazily."""

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        _check_compatible(a, b)
        super().__init__(
            a.shape[0], a.dtype, a.device,
            is_symmetric=a.is_symmetric and b.is_symmetric, is_psd=a.is_psd and b.is_psd,
        )
        self.a, self.b = a, b

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.a.matmat(V) + self.b.matmat(V)

    def higher_precision(self) -> LinearOperator | None:  # noqa: D102 (see LinearOperator)
        a, b = self.a.higher_precision(), self.b.higher_precision()
        return None if a is None or b is None else SumOperator(a, b)
