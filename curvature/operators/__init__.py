"""Curvature operators and the linear-operator algebra they share."""

from .base import IdentityOperator, LinearOperator, identity_like
from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator
from .losses import NormalizedLoss
from .registry import OPERATORS, operator_class

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperator",
    "NormalizedLoss",
    "OPERATORS",
    "identity_like",
    "operator_class",
]
