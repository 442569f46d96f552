"""Curvature operators and the linear-operator algebra they share."""

from .base import IdentityOperator, LinearOperator, identity_like
from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kronecker import EKFACOperator, KFACInverse, KFACOperator
from .losses import NormalizedLoss
from .registry import APPROXIMATE_OPERATORS, OPERATORS, operator_class

__all__ = [
    "APPROXIMATE_OPERATORS",
    "CurvatureOperator",
    "EKFACOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACInverse",
    "KFACOperator",
    "LinearOperator",
    "NormalizedLoss",
    "OPERATORS",
    "identity_like",
    "operator_class",
]
