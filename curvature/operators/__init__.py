"""Curvature operators and the linear-operator algebra they share."""

from .base import IdentityOperator, LinearOperator, identity_like
from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperator",
    "identity_like",
]
