r"""The checked, counted view of a solver's preconditioner :math:`M \approx A^{-1}`.

:func:`~curvature.linalg.solve.solve` accepts a preconditioner: any object with ``@`` (a
:class:`~curvature.LinearOperator` such as a K-FAC or diagonal inverse, or a dense tensor) approximating the
inverse of the system matrix, symmetric positive definite. :class:`Preconditioner` checks it once, before any
product, multiplies through it in the solver's working precision, counts the products, and turns what the
solver finds on the device (a residual :math:`r \ne 0` with :math:`r^\top M r \le 0`, a NaN) into a
``ValueError`` at the solver's next host read.

Positive definiteness is known only from a flag: an object with ``is_psd=True`` is taken to be positive
(semi-)definite, one flagged ``is_psd=False`` is refused, and one without the flag (a dense tensor, a plain
object with ``@``) is accepted and watched: the preconditioned recurrences compute :math:`r^\top M r` anyway,
so a non-positive value costs nothing to detect. A flag of True is watched the same way (a singular PSD
preconditioner breaks down like an indefinite one).
"""

from __future__ import annotations

from typing import Any

import torch

from ._operand import Operand

__all__ = ["Preconditioner"]

_SPD = (
    "preconditioned CG and MINRES need a symmetric positive definite preconditioner M approximating A⁻¹ "
    "(e.g. a damped K-FAC inverse, or the inverse of a positive diagonal)"
)


class Preconditioner:
    r"""A validated symmetric positive definite preconditioner with a product counter.

    Args:
        M: The preconditioner: an object with ``@``, ``.shape``, ``.dtype`` and ``.device``.
        operand: The solver's view of the system matrix, whose size, device and dtypes ``M`` must match.

    Attributes:
        view: The :class:`~curvature.linalg._operand.Operand` of ``M`` (deferred finiteness checks).

    Raises:
        TypeError: If ``M`` lacks ``@``, a shape, a floating dtype or a device, or its dtype is neither the
            operator's nor the working dtype.
        ValueError: If its shape or device differ from the operator's, or it is not symmetric (flagged
            ``is_symmetric=False``, or a dense tensor that is not symmetric to rounding), or it is flagged
            ``is_psd=False``.
    """

    def __init__(self, M: Any, operand: Operand) -> None:
        if all(hasattr(M, a) for a in ("__matmul__", "shape", "dtype", "device")):
            _check_matches(M, operand)  # before Operand reads a dense tensor to test its symmetry
        view = Operand(M, "preconditioner", deferred=True, symmetric=False)
        if not view.is_symmetric:
            how = ("flagged is_symmetric=False" if getattr(M, "is_symmetric", True) is False
                   else "a dense tensor with ‖M − Mᵀ‖_F above √u ‖M‖_F")
            raise ValueError(
                f"preconditioner is not symmetric ({how}); {_SPD}. If the asymmetry is rounding, pass "
                "(M + M.T) / 2."
            )
        flag = getattr(M, "is_psd", None)
        if flag is not None and not flag:
            raise ValueError(
                f"preconditioner is flagged is_psd=False; {_SPD}. If it is positive definite, say so: "
                "LinearOperator(..., is_psd=True), or set preconditioner.is_psd = True (an object without the flag, "
                "such as a dense tensor, is accepted and checked as the solver runs)."
            )
        self.view = view

    @property
    def num_applications(self) -> int:
        """Products with the preconditioner so far."""
        return self.view.num_matvecs

    def __matmul__(self, r: torch.Tensor) -> torch.Tensor:
        """``M @ r`` for a vector in the working dtype, returned in the working dtype and counted.

        The vector is cast to the preconditioner's dtype for the product where the two differ (a bfloat16
        preconditioner of a bfloat16 operator); a float32 preconditioner of a half-precision operator gets the
        float32 vector as it is.
        """
        return self.view @ r

    def flags(self, broken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the solver's next host read must include: the products' finiteness and its breakdown flag."""
        return self.view.finite(), broken

    def verify(self, finite: float, broken: float, method: str) -> None:
        """Raise if a product with the preconditioner held NaN or Inf, or if ``method`` found it not positive definite.

        Args:
            finite: The value read for :meth:`flags`'s first tensor.
            broken: The value read for its second: some residual ``r ≠ 0`` had ``rᵀ M r ≤ 0``.
            method: ``"cg"`` or ``"minres"``, for the message.

        Raises:
            ValueError: In either case: the iterates no longer mean anything, so no result is returned.
        """
        if not finite:
            raise ValueError(
                "a product with preconditioner contains NaN or Inf; check how the preconditioner is built (an "
                "inverse of a singular matrix, a division by a zero diagonal entry)."
            )
        if broken:
            raise ValueError(
                f"preconditioner is not positive definite: method={method!r} met a vector r ≠ 0 ("
                f"{'a residual' if method == 'cg' else 'a residual or Lanczos vector'}) with rᵀ M r ≤ 0, where M is "
                f"the preconditioner; {_SPD}. Check its sign, and damp it if it is singular (a PSD "
                "preconditioner with a null space breaks down too). No solution is returned: its iterates would "
                "not mean anything."
            )


def _check_matches(M: Any, operand: Operand) -> None:
    """Refuse a preconditioner whose shape, device or dtype does not fit the operator, naming the fix."""
    shape = tuple(M.shape)
    if shape != (operand.size, operand.size):
        raise ValueError(
            f"preconditioner has shape {shape}, but the operator has shape ({operand.size}, {operand.size}); pass "
            "a square preconditioner for the same parameters."
        )
    if torch.device(M.device) != operand.device:
        raise ValueError(
            f"preconditioner is on {M.device} but the operator is on {operand.device}; build it (or move a dense "
            "tensor with .to()) on the operator's device."
        )
    if M.dtype not in (operand.dtype, operand.work_dtype):
        allowed = " or ".join(dict.fromkeys(str(d).replace("torch.", "") for d in (operand.dtype, operand.work_dtype)))
        raise TypeError(
            f"preconditioner has dtype {M.dtype} but the operator has dtype {operand.dtype} (the solver works in "
            f"{operand.work_dtype}); pass a preconditioner in {allowed} (a dense tensor: .to(); an operator: build "
            "it in that dtype)."
        )
