r"""Gram-Schmidt, written once: vectors made orthogonal to an orthonormal basis.

Every Krylov method here extends an orthonormal basis :math:`Q` one vector at a time, and a few methods
deflate probes against a basis. Both are the projection :math:`w \mapsto (I - Q Q^\top) w` evaluated as
:math:`w - Q (Q^\top w)` (classical Gram-Schmidt, two matrix products instead of a loop over the columns);
:func:`orthogonalize` applies it twice, :func:`project_out` once.

Twice, because once is not enough in floating point: after one pass the new vector keeps a component along
:math:`Q` of about :math:`\varepsilon \kappa` of its norm, where :math:`\kappa` grows as :math:`A w` cancels
against the basis (as soon as a Ritz value converges). A second pass brings it to working precision whatever
the cancellation ("twice is enough": Giraud, Langou, Rozložník & van den Eshof 2005, "Rounding error analysis
of the classical Gram-Schmidt orthogonalization process", Numer. Math. 101). Lanczos needs that (``lanczos_many``
behind :func:`~curvature.lanczos` and :func:`~curvature.spectral_density`, and thick-restart Lanczos behind
:func:`~curvature.eigenvalues`, also for its fresh start after an invariant space). Hutch++ deflates its random
probes once, as Meyer et al. define it: its estimate does not need probes orthogonal to working precision, and
a second pass would only change its rounding.

Blocks orthonormalized from scratch (power iteration, the XTrace/Hutch++ sketches, the span certified in
float32) use Householder QR (``torch.linalg.qr``) instead: unconditionally stable, and it also gives the
triangular factor XTrace needs.
"""

from __future__ import annotations

import torch

__all__ = ["orthogonalize", "project_out"]


def project_out(Q: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One pass of classical Gram-Schmidt: :math:`W - Q (Q^\top W)` and the coefficients :math:`Q^\top W`.

    Args:
        Q: The basis, orthonormal columns: ``(P, m)``, or ``(b, P, m)`` for ``b`` bases at once.
        W: The vectors: ``(P,)`` or ``(P, n)`` (``(b, P, n)`` with batched bases).

    Returns:
        The projected vectors (the shape of ``W``) and the coefficients, ``(m,)``, ``(m, n)`` or ``(b, m, n)``.

    Example:
        >>> Q = torch.eye(3, dtype=torch.float64)[:, :2]
        >>> w, coef = project_out(Q, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> w.tolist(), coef.tolist()
        ([0.0, 0.0, 3.0], [1.0, 2.0])
    """
    coef = Q.mT @ W
    return W - Q @ coef, coef


def orthogonalize(Q: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Classical Gram-Schmidt twice: ``W`` orthogonal to ``Q`` to working precision, and its coordinates in ``Q``.

    .. math::

        h_1 = Q^\top w, \quad w' = w - Q h_1, \quad h_2 = Q^\top w', \quad w'' = w' - Q h_2, \qquad
        Q^\top w \approx h_1 + h_2.

    In a Lanczos step ``w = A q_j``, so :math:`h_1 + h_2` is column ``j`` of :math:`T = Q^\top A Q` as
    computed (its entry ``j`` is :math:`\alpha_j`, the others the couplings and the rounding of the products),
    and :math:`\|w''\|` is :math:`\beta_{j+1}`. Cost: four products with ``Q``, :math:`4 P m` flops per vector.

    Args:
        Q: The basis, orthonormal columns: ``(P, m)``, or ``(b, P, m)`` for ``b`` bases at once.
        W: The vectors: ``(P,)`` or ``(P, n)`` (``(b, P, n)`` with batched bases).

    Returns:
        The orthogonalized vectors (the shape of ``W``) and the summed coefficients :math:`h_1 + h_2`.

    Example:
        >>> Q = torch.eye(3, dtype=torch.float64)[:, :2]
        >>> w, coef = orthogonalize(Q, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> w.tolist(), coef.tolist()
        ([0.0, 0.0, 3.0], [1.0, 2.0])
    """
    W, coef = project_out(Q, W)
    W, coef2 = project_out(Q, W)
    return W, coef + coef2
