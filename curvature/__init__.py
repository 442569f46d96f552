"""curvature: second-order information for PyTorch models, cheap and exact.

The public names are re-exported here; nothing is defined in this file.
"""

from . import reference
from ._func import ggn_vp, hvp
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    LinearOperator,
    identity_like,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LinearOperator",
    "__version__",
    "ggn_vp",
    "hvp",
    "identity_like",
    "reference",
]
