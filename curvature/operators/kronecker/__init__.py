"""Kronecker-factored curvature: K-FAC and EK-FAC operators, their blocks and the layers they factor."""

from .blocks import BlockEigen, KroneckerBlock
from .ekfac import EKFACOperator
from .kfac import FISHER_TYPES, KFACInverse, KFACOperator
from .layers import FACTORED_MODULES

__all__ = ["FACTORED_MODULES", "FISHER_TYPES", "BlockEigen", "EKFACOperator", "KFACInverse", "KFACOperator",
           "KroneckerBlock"]
