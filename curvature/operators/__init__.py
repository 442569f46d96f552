"""Curvature operators and the linear-operator algebra they share."""

from .base import IdentityOperator, LinearOperator, identity_like
from .curvature import CurvatureOperator
from .ggn import EmpiricalFisherOperator, FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kronecker import EKFACOperator, KFACInverse, KFACOperator
from .losses import NormalizedLoss
from .per_sample import PerSample, PerSampleChunk, gradient_norms, per_sample_diagonals, per_sample_gradients
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
    "PerSample",
    "PerSampleChunk",
    "gradient_norms",
    "identity_like",
    "operator_class",
    "per_sample_diagonals",
    "per_sample_gradients",
]
