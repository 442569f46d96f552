"""The view of an operator that every estimator and solver works through.

An estimator accepts anything with ``@``, ``.shape``, ``.dtype`` and ``.device``: a curvature operator, a
:class:`~curvature.LinearOperator` built from others, or a dense ``torch.Tensor``. :class:`Operand`
checks that object once, multiplies through it and counts the products the estimator spends, so results
report their own cost whatever the operator keeps count of.

Working precision. An operator in float16 or bfloat16 computes its products in that dtype, but an estimator
must not do its own arithmetic there: a unit roundoff of 2⁻⁸ (bfloat16) makes a Gram-Schmidt step, a sum of a
hundred quadratic forms or a CG recurrence lose most of their digits. :class:`Operand` therefore separates two
dtypes: ``dtype``, the operator's, in which every product is evaluated (each operand is cast to it), and
``work_dtype = torch.promote_types(dtype, torch.float32)``, in which the products are returned and every
estimator keeps its vectors, bases and recurrences. For float32 and float64 operators the two are the same and
nothing is cast. What the products can deliver is then bounded by ``unit_roundoff`` (of ``dtype``), not by
the working precision: the estimators' rounding-level tests and error bounds use :meth:`Operand.noise`.

Symmetry. Eigenvalue methods and solvers assume a symmetric operator; stochastic trace, diagonal and
Frobenius-norm estimators do not. An estimator says which it needs (``symmetric=``); the check is what is
cheap: an operator's ``is_symmetric`` flag, and for a dense tensor a comparison with its transpose
(:func:`check_symmetric`). Other objects with ``@`` and no flag are trusted.

Reading a value from a GPU makes the host wait for every kernel queued before it (a host synchronisation).
An estimator that reads one per product keeps the GPU idle between products, so the estimators here create
their :class:`Operand` with ``deferred=True``: the finiteness of each product is then accumulated on the
device and read, together with whatever else the estimator needs on the host, in one transfer
(:meth:`Operand.fetch`) at its end or at its convergence checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_finite
from ..sampling import probes

__all__ = ["CHECK_EVERY", "NOISE", "WORK_NOISE", "Operand", "check_symmetric", "until_check"]

CHECK_EVERY = 8  # the most products an adaptive estimator runs between two host reads of its state
_HINT = "check the model, loss and data for NaN or overflow."
# The rounding level of the products (Operand.noise): in units of the operator's unit roundoff times ‖A‖, and
# of the working precision's machine epsilon times ‖A‖ (the level at which an invariant Krylov space's β or a
# converged residual stalls: up to about 10 ε ‖A‖ measured on small dense matrices; 100 leaves room for less
# exact products).
NOISE = 8.0
WORK_NOISE = 100.0


class PrecisionWarning(RuntimeWarning):
    """The tolerance asked for is below what the products' precision can certify; the result says not converged.

    Emitted by :func:`~curvature.eigenvalues` and :func:`~curvature.solve` with a
    message that names the dtype and the achievable tolerance. A ``RuntimeWarning``, so existing filters catch
    it; filter this class alone to silence just it (the optimizers do, for their inexact inner solves, whose
    ``converged`` flags they report).
    """


def until_check(done: int) -> int:
    """The number of iterations to run before an adaptive method next reads its state on the host.

    One iteration at a time for the first eight, then a quarter as many as are done, up to
    :data:`CHECK_EVERY`: checks after iterations 1, 2, ..., 8, 10, 12, 15, 18, 22, 27, 33, 41, 49, ... A method
    that stops early (a warm start, a tiny operator, a loose tolerance) stops where it would with a check per
    iteration, and a long run reads its state once per :data:`CHECK_EVERY` iterations; the iterations run past
    the one that stopped it (which cost products but, undone on the device, do not change the result) are at
    most a quarter of those done, and at most ``CHECK_EVERY - 1``. (Before the eigenvalue bounds stopped
    Lanczos after 5 to 10 products, checks came after 1, 2, 3, 4, 6, 9, 13, ...: up to half as many again.)

    Args:
        done: Iterations done so far.

    Returns:
        How many to run before the next check, at least 1.
    """
    return min(CHECK_EVERY, max(1, done // 4))


class Operand:
    """A validated square operator with a product counter and a working precision.

    Args:
        op: The operator: any object with ``@``, a square ``.shape``, a floating ``.dtype`` and a
            ``.device``.
        name: The argument's name, for error messages.
        deferred: Check the finiteness of products on the device and raise at the next :meth:`fetch` or
            :meth:`check` instead of after each product (which reads a value on the host per product).
        symmetric: Whether the estimator needs a symmetric operator: then an operator flagged
            ``is_symmetric=False``, or a dense tensor that is not symmetric (:func:`check_symmetric`), is
            refused. Without it, ``is_symmetric`` records what is known (the flag; for a dense tensor, the
            comparison with its transpose).

    Attributes:
        dtype: The operator's dtype: products are evaluated in it.
        work_dtype: ``torch.promote_types(dtype, torch.float32)``: products are returned in it, and estimators
            keep their vectors in it.
        unit_roundoff: The unit roundoff ``ε/2`` of ``dtype`` (``2⁻⁸`` for bfloat16, ``2⁻¹¹`` for float16).
        is_symmetric: False when the operator is known not to be symmetric.

    Raises:
        TypeError: If ``op`` lacks ``@``, a shape, a floating dtype or a device.
        ValueError: If it is not square, is empty, or (with ``symmetric=True``) is not symmetric.
    """

    def __init__(self, op: Any, name: str = "op", *, deferred: bool = False, symmetric: bool = True) -> None:
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
        is_symmetric = getattr(op, "is_symmetric", True) is not False
        if symmetric and not is_symmetric:
            raise ValueError(
                f"{name} is not symmetric (flagged is_symmetric=False); eigenvalue methods and solvers assume a "
                "symmetric operator (Hessian, GGN, Fisher, or sums and damped versions of them). Pass a "
                "symmetric one, e.g. (A + Aᵀ)/2; trace, diagonal and frobenius_norm accept non-symmetric ones."
            )
        if is_symmetric and isinstance(op, torch.Tensor):
            is_symmetric = check_symmetric(op, name, refuse=symmetric)
        self.op = op
        self.name = name
        self.size = int(shape[0])
        self.dtype = op.dtype
        self.work_dtype = torch.promote_types(op.dtype, torch.float32)
        self.unit_roundoff = torch.finfo(op.dtype).eps / 2
        self.is_symmetric = is_symmetric
        self.device = torch.device(op.device)
        self.is_psd = bool(getattr(op, "is_psd", False))
        self.num_matvecs = 0
        self.deferred = deferred
        self._finite: torch.Tensor | None = None  # with deferred checks: all products so far finite (device)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        """Multiply ``(P,)`` or ``(P, k)`` by the operator, count ``k`` products and check the result.

        ``V`` may be in ``dtype`` or ``work_dtype``: it is cast to ``dtype`` for the product (rounded, for a
        half-precision operator), and the product is returned in ``work_dtype``.
        """
        out = self.op @ (V if V.dtype == self.dtype else V.to(self.dtype))
        if not isinstance(out, torch.Tensor) or out.shape != V.shape:
            raise ValueError(
                f"{self.name} @ v returned {getattr(out, 'shape', type(out).__name__)} for an operand of shape "
                f"{tuple(V.shape)}; an operator must map (P,) to (P,) and (P, k) to (P, k)."
            )
        return self._counted(out, V)

    def _counted(self, out: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Count the product ``out`` of ``V`` and check it finite (deferred or now); return it in ``work_dtype``."""
        if out.dtype != self.work_dtype:
            out = out.to(self.work_dtype)
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
        parts = [t.detach().reshape(-1).to(device=self.device, dtype=torch.float64) for t in (*tensors, self.finite())]
        values = torch.cat(parts).tolist()
        if not values.pop():
            raise ValueError(f"a product with {self.name} contains NaN or Inf; {_HINT}")
        return values

    def finite(self) -> torch.Tensor:
        """Whether every product so far was finite, as a boolean 0-d tensor on the device (no host read).

        With deferred checks it is what :meth:`fetch` verifies; a caller that reads it together with another
        operand's values (a solver's preconditioner) verifies it itself. Without them it is always True.
        """
        if self._finite is None:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return self._finite

    def check(self) -> None:
        """Raise if a product held NaN or Inf: one host synchronisation with deferred checks, none without.

        Raises:
            ValueError: If one did.
        """
        if self._finite is not None:
            self.fetch_floats()

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zero tensor in the working dtype on the operator's device."""
        return torch.zeros(*shape, dtype=self.work_dtype, device=self.device)

    def probes(self, distribution: str, shape: tuple[int, ...] | int,
               generator: torch.Generator | None) -> torch.Tensor:
        """Probe vectors (:func:`curvature.sampling.probes`) representable in ``dtype``, in ``work_dtype``.

        They are drawn in the operator's dtype, as before there was a working precision, so that a product
        sees exactly the vector the estimator keeps (no rounding between the two).
        """
        return probes(distribution, shape, generator, self.dtype, self.device).to(self.work_dtype)

    def refined(self) -> Any | None:
        """The operator with float32 products, for a float16 or bfloat16 operator that offers one; else None.

        A dense half-precision tensor is its own float32 copy; an operator offers the view through
        ``higher_precision()`` (:meth:`curvature.LinearOperator.higher_precision`: a half-precision curvature
        operator computes its products with the model cast to float32). Estimators multiply through it a few
        times to certify what half-precision products cannot (:func:`~curvature.linalg.eigen.eigenvalues`,
        :func:`~curvature.linalg.solve.solve`); those products are counted in :attr:`num_matvecs`.

        Returns:
            An object with ``@`` in float32, or None.
        """
        if self.dtype not in (torch.float16, torch.bfloat16):
            return None
        if isinstance(self.op, torch.Tensor):
            return self.op.to(self.work_dtype)
        higher = getattr(self.op, "higher_precision", None)
        return higher() if callable(higher) else None

    def refined_product(self, refined: Any, V: torch.Tensor) -> torch.Tensor:
        """``refined @ V`` in the working dtype, counted and checked like every product."""
        return self._counted(refined @ V.to(self.work_dtype), V)

    def work(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` in the working dtype (no copy when it is already)."""
        return v.to(self.work_dtype)

    def noise(self, scale: float | torch.Tensor) -> float | torch.Tensor:
        r"""The rounding level of products for an operator of norm ``scale``: what results can be certified to.

        .. math::

            \eta = \max(\texttt{NOISE}\; u,\ \texttt{WORK\_NOISE}\; \varepsilon_w)\, \|A\|,

        with ``u`` the unit roundoff of the operator's dtype (``NOISE = 8``) and :math:`\varepsilon_w` the
        machine epsilon of the working dtype (``WORK_NOISE = 100``). Below it a computed ``β`` (an invariant
        Krylov space) or residual is rounding, and :func:`~curvature.linalg.eigen.eigenvalues` adds it to its
        error bounds. In float32 and float64 the second term is the larger: it is the rounding level the
        estimators used before there was a working precision, so their tests there are as they were. In
        float16 and bfloat16 the first is: the tests scale with what the products can deliver, not with the
        working precision, nor with ``ε`` of the half dtype (100 ε of bfloat16 is 0.8: every test passed at
        once). Both constants are measured (``benchmarks/precision.py``): over every Hessian and GGN of the
        registry, products in bfloat16 and float16 are within ``1.2 u ‖A‖`` of the float64 products, and
        Lanczos's top Ritz values on them within ``1.7 u ‖A‖`` of the float64 eigenvalues after 40 steps
        (``4.2 u ‖A‖`` on a CNN trained on the digits); in float64 within ``12 ε ‖A‖``, and within ``27 ε ‖A‖``
        on a dense 300 x 300 matrix after 8 thick restarts (its products' own rounding grows like ``√P ε``).
        It bounds the rounding of the products, not the curvature that a half-precision model computes
        instead of its float64 one near a minimum (see :func:`~curvature.linalg.eigen.eigenvalues`).

        Args:
            scale: An estimate of ``‖A‖`` (a float or a float64 tensor).

        Returns:
            ``η``, of the same type as ``scale``.
        """
        return max(NOISE * self.unit_roundoff, WORK_NOISE * torch.finfo(self.work_dtype).eps) * scale

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


def check_symmetric(A: torch.Tensor, name: str, *, refuse: bool = True) -> bool:
    r"""Whether a dense square tensor is symmetric to rounding; raise if not and ``refuse``.

    The test is :math:`\|A - A^\top\|_F \le \sqrt{u}\, \|A\|_F` with ``u`` the unit roundoff of the tensor's
    dtype (evaluated in at least float32, in row blocks, one host read). A matrix assembled from products in
    its own dtype is symmetric to a few ``u`` times ``‖A‖_F`` (a few hundred ``u`` for long reductions), so
    the margin of :math:`1/\sqrt{u}` (16 in bfloat16, 45 in float16, 4096 in float32, 10⁸ in float64) accepts
    rounding, while a genuinely non-symmetric matrix has :math:`\|A - A^\top\|_F` comparable to
    :math:`\|A\|_F`. What is accepted perturbs a symmetric method's results by at most about
    :math:`\|A - A^\top\|_2 / 2`: it works on the symmetric part. A float64 tensor assembled from float32
    products (asymmetry about 1e-7) is refused; symmetrize it. Sparse tensors are trusted.

    Args:
        A: The square tensor.
        name: The argument's name, for the message.
        refuse: Raise instead of returning False.

    Returns:
        Whether ``A`` passed.

    Raises:
        ValueError: If it did not and ``refuse``.
    """
    if A.layout != torch.strided or A.shape[0] == 0:
        return True
    A = A.detach()
    work = torch.promote_types(A.dtype, torch.float32)
    size = A.shape[0]
    rows = max(1, min(size, 2**22 // size))  # blocks of about 4M entries: bounded extra memory
    skew = torch.zeros((), dtype=torch.float64, device=A.device)
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for start in range(0, size, rows):
        block = A[start : start + rows].to(work)
        skew += (block - A[:, start : start + rows].T.to(work)).double().pow(2).sum()
        total += block.double().pow(2).sum()
    skew_norm, norm = torch.stack([skew, total]).sqrt().tolist()
    bound = math.sqrt(torch.finfo(A.dtype).eps / 2) * norm
    if skew_norm <= bound:
        return True
    if refuse:
        raise ValueError(
            f"{name} is not symmetric: ‖A - Aᵀ‖_F = {skew_norm:.3g} against ‖A‖_F = {norm:.3g} (at most "
            f"{bound:.3g}, √u ‖A‖_F for {A.dtype}, is taken for rounding). Eigenvalue methods and solvers need a "
            f"symmetric operator: if the asymmetry is rounding (e.g. a matrix assembled from lower-precision "
            f"products), pass ({name} + {name}.T) / 2; otherwise this method does not apply (trace, diagonal "
            "and frobenius_norm accept non-symmetric matrices)."
        )
    return False
