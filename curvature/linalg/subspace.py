r"""Geometry of subspaces: how much of a vector or a subspace lies in another's span, and principal angles.

These are the measurements of the "tiny subspace" literature: Gur-Ari, Roberts & Dyer 2018 ("Gradient Descent
Happens in a Tiny Subspace", arXiv:1812.04754) track the fraction of the gradient inside the top-``k`` Hessian
eigenspace, :math:`\|P_{\text{top}}\, g\|^2 / \|g\|^2`, and how that eigenspace turns during training; Ben Arous et al.
(arXiv:2310.03010) the alignment of SGD with outlier eigenspaces. They only need tensors: a basis is the columns of a
``(P, m)`` tensor (``EigenResult.vectors``), orthonormalized here unless the caller says it already is.
"""

from __future__ import annotations

import torch

from .._checks import check_scalar

__all__ = ["orthonormal_basis", "principal_angles", "subspace_overlap"]


def _as_columns(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as columns ``(P, k)``: a real floating-point vector or matrix with ``P ≥ 1``, else an error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (a vector of shape (P,) or columns of shape (P, k)), got "
                        f"{type(x).__name__}.")
    if x.dim() not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"{name} must be a vector (P,) or a matrix of columns (P, k) with P ≥ 1, got shape "
                         f"{tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {x.dtype}"
                        f"{'; pass the real and imaginary parts as separate columns' if x.is_complex() else ''}.")
    return x.unsqueeze(1) if x.dim() == 1 else x


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf; check where the vectors come from.")


def _check_pair(A: torch.Tensor, B: torch.Tensor, a: str, b: str) -> None:
    """Two sets of columns that can be compared: the same length ``P``, one device, finite entries."""
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"{a} and {b} must have the same length P, got {A.shape[0]} and {B.shape[0]}.")
    if A.device != B.device:
        raise ValueError(f"{a} is on {A.device} but {b} is on {B.device}; move one of them, e.g. {b}.to({a}.device).")
    _check_finite(A, a)
    _check_finite(B, b)


def _basis(V: torch.Tensor, rtol: float | None = None, orthonormal: bool = False) -> torch.Tensor:
    """An orthonormal basis of ``span V`` in float64 (at least): :func:`orthonormal_basis` before its final cast.

    Kept in float64 for the callers here, so that the basis of float32 columns is not rounded back to float32
    (which would put angles of about 1e-8 between two copies of the same direction).
    """
    work = V.to(torch.promote_types(V.dtype, torch.float64))
    if orthonormal:
        return work
    U, s, _ = torch.linalg.svd(work, full_matrices=False)
    if rtol is None:
        rtol = max(V.shape) * torch.finfo(V.dtype).eps
    if s.numel() == 0 or float(s[0]) == 0:
        return U[:, :0]
    return U[:, s > rtol * s[0]]


def orthonormal_basis(vectors: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    r"""An orthonormal basis of the span of the columns of ``vectors`` (``(P, k)``), as ``(P, r)``, ``r ≤ k``.

    From the thin SVD :math:`V = U \Sigma W^\top`: the columns of ``U`` whose singular value exceeds
    ``rtol · σ_max`` (default ``max(P, k) · ε`` of the dtype, numpy's ``matrix_rank`` rule), so that dependent
    or zero columns do not add directions that are only rounding. Computed in at least float64 for float32 and
    lower inputs' accuracy, returned in the input's dtype (:func:`~curvature.subspace_overlap` and
    :func:`~curvature.principal_angles` keep the float64 basis, so that the basis of float32 columns is not
    rounded again).

    Args:
        vectors: A ``(P,)`` vector or ``(P, k)`` columns.
        rtol: The relative singular-value threshold in ``[0, 1)``; None for the default.

    Returns:
        ``(P, r)`` orthonormal columns; ``r = 0`` (shape ``(P, 0)``) when every column is zero.

    Raises:
        TypeError: If ``vectors`` is not a real floating-point tensor.
        ValueError: If it is not ``(P,)`` or ``(P, k)`` with ``P ≥ 1``, holds NaN or Inf, or ``rtol`` is out of
            range.
    """
    V = _as_columns(vectors, "vectors")
    _check_finite(V, "vectors")
    if rtol is not None:
        rtol = check_scalar(rtol, "rtol")
        if not 0 <= rtol < 1:
            raise ValueError(f"rtol must be in [0, 1) (a fraction of the largest singular value), got {rtol}.")
    return _basis(V, rtol).to(V.dtype)


def subspace_overlap(vectors: torch.Tensor, basis: torch.Tensor, *, orthonormal: bool = False,
                     reduce: str = "none") -> torch.Tensor:
    r"""The fraction of each vector's squared norm inside the span of ``basis``.

    .. math:: \operatorname{overlap}(v) = \frac{\|Q^\top v\|^2}{\|v\|^2} = \cos^2 \angle(v, \operatorname{span} Q)
              \in [0, 1],

    with ``Q`` an orthonormal basis of ``basis``'s columns (Gur-Ari, Roberts & Dyer 2018, arXiv:1812.04754, Eq. 2:
    the gradient's overlap with the top-``k`` Hessian eigenspace). A random unit vector in ``P`` dimensions has
    expected overlap ``k / P`` with a ``k``-dimensional subspace, which is the baseline to read it against.

    With ``reduce="subspace"`` the columns of ``vectors`` are a subspace themselves and the result is the fraction
    of it inside ``span(basis)``: :math:`\|Q_b^\top Q_v\|_F^2 / \dim(\operatorname{span} V) = \frac1r \sum_i
    \cos^2\theta_i` over the principal angles (1 when ``span V ⊆ span basis``, 0 when orthogonal). This is
    symmetric in the two subspaces when their dimensions agree.

    Args:
        vectors: A vector ``(P,)`` or columns ``(P, k)``.
        basis: The spanning columns ``(P, m)`` (or one vector ``(P,)``), e.g. ``EigenResult.vectors``.
        orthonormal: Whether ``basis`` already has orthonormal columns (skips the SVD).
        reduce: ``"none"``: one overlap per column of ``vectors``; ``"subspace"``: the overlap of their span.

    Returns:
        A float64 tensor: ``()`` for a vector or with ``reduce="subspace"``, else ``(k,)``. A zero vector has
        overlap NaN (no direction to measure).

    Raises:
        ValueError: On shapes that do not match (different ``P``), arguments on different devices, NaN or Inf
            entries, or an unknown ``reduce``.
        TypeError: On an argument that is not a real floating-point tensor.

    Example:
        >>> basis = torch.eye(4, dtype=torch.float64)[:, :2]
        >>> subspace_overlap(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64), basis)
        tensor(0.5000, dtype=torch.float64)
    """
    if reduce not in ("none", "subspace"):
        raise ValueError(f"reduce must be 'none' (one overlap per vector) or 'subspace', got {reduce!r}.")
    V = _as_columns(vectors, "vectors")
    B = _as_columns(basis, "basis")
    _check_pair(V, B, "vectors", "basis")
    Q = _basis(B, orthonormal=orthonormal)
    if reduce == "subspace":
        Qv = _basis(V)
        if Qv.shape[1] == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=V.device)
        return (Q.T @ Qv).pow(2).sum() / Qv.shape[1]
    V64 = V.to(Q.dtype)
    V64 = V64 / V64.abs().amax(0)  # scaled to max |v_i| = 1: no square under- or overflows (a zero column: NaN)
    result = (Q.T @ V64).pow(2).sum(0) / V64.pow(2).sum(0)
    return result[0] if vectors.dim() == 1 else result


def principal_angles(a: torch.Tensor, b: torch.Tensor, *, orthonormal: bool = False) -> torch.Tensor:
    r"""The principal angles between ``span(a)`` and ``span(b)``, ascending, in radians.

    With orthonormal bases :math:`Q_a, Q_b` and the singular values :math:`\sigma_1 \ge \dots` of
    :math:`Q_a^\top Q_b`, :math:`\theta_i = \arccos \sigma_i` (Björck & Golub 1973, "Numerical methods for
    computing angles between linear subspaces"). Small angles are computed from the sines instead (the singular
    values of :math:`(I - Q_a Q_a^\top) Q_b`), where the arccos of a cosine near 1 would lose half the digits
    (Knyazev & Argentati 2002). ``θ = 0`` for a shared direction, ``π/2`` for orthogonal ones; how far the top
    eigenspace turned between two measurements is ``principal_angles(previous, current)``.

    Args:
        a: Columns ``(P, k)`` (or a vector).
        b: Columns ``(P, m)`` (or a vector).
        orthonormal: Whether both already have orthonormal columns.

    Returns:
        ``min(r_a, r_b)`` angles (float64), ``r`` the ranks of the two sets of columns.

    Raises:
        ValueError: On different lengths ``P``, arguments on different devices, or NaN or Inf entries.
        TypeError: On an argument that is not a real floating-point tensor.

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> principal_angles(e[:, :2], e[:, 1:]).tolist()  # share e_1; e_0 ⟂ e_2
        [0.0, 1.5707963267948966]
    """
    A, B = _as_columns(a, "a"), _as_columns(b, "b")
    _check_pair(A, B, "a", "b")
    Qa, Qb = _basis(A, orthonormal=orthonormal), _basis(B, orthonormal=orthonormal)
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa
    r = Qb.shape[1]
    if r == 0:
        return torch.zeros(0, dtype=torch.float64, device=A.device)
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)  # descending: ascending angles
    sines = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(max=1.0).flip(0)  # ascending sines
    angles = torch.arccos(cosines)
    small = cosines.pow(2) > 0.5  # θ < π/4: the sine is the accurate one
    return torch.where(small, torch.arcsin(sines), angles)
