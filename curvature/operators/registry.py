"""The one list of curvature operators: what the report, the monitor, the command and the tests offer.

Each operator class declares its ``name`` (the string users pass, e.g. ``operator="ggn"``) and its ``title`` (for
plots and reports); :data:`OPERATORS` maps names to classes. Adding an operator: its module, one entry here, its
dense reference in :mod:`curvature.reference` (``REFERENCES``), a section of the operators guide and the test
parametrization, which reads both registries.
"""

from __future__ import annotations

from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kronecker import EKFACOperator, KFACOperator

__all__ = ["APPROXIMATE_OPERATORS", "OPERATORS", "operator_class"]

#: Every exact curvature operator by its ``name``, in the order the documentation lists them (each has a dense
#: reference in :data:`curvature.reference.REFERENCES`).
OPERATORS: dict[str, type[CurvatureOperator]] = {
    cls.name: cls for cls in (HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator)
}

#: The structured approximations by ``name``: Kronecker-factored, approximating the block diagonal of the GGN or
#: Fisher (no dense reference of their own; tested where they are exact and measured against the exact operators).
APPROXIMATE_OPERATORS: dict[str, type[CurvatureOperator]] = {cls.name: cls for cls in (KFACOperator, EKFACOperator)}


def operator_class(name: str, argument: str = "operator") -> type[CurvatureOperator]:
    """The curvature operator registered under ``name``.

    Args:
        name: An operator's name, e.g. ``"hessian"``, ``"ggn"`` or ``"kfac"``.
        argument: The argument's name, for the message.

    Returns:
        Its class.

    Raises:
        ValueError: If no operator has that name; the message lists those that do.

    Example:
        >>> operator_class("ggn").title
        'GGN'
    """
    known = {**OPERATORS, **APPROXIMATE_OPERATORS}
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"{argument} must be one of {tuple(known)}, got {name!r}.")
    return known[name]
