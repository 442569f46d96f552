"""Curvature operators and the linear-operator algebra they share."""

from .base import IdentityOperator, LinearOperator, identity_like
from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator
from .losses import NormalizedLoss

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperator",
    "NormalizedLoss",
    "identity_like",
]
