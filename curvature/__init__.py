"""curvature: second-order information for PyTorch models, cheap and exact.

The public names are re-exported here; nothing is defined in this file.
"""

from . import compat, optim, pruning, reference, regularizers, sampling
from ._func import ggn_vp, hvp
from .linalg import (
    EigenResult,
    Estimate,
    LanczosResult,
    PrecisionWarning,
    SolveResult,
    SpectralDensity,
    diagonal,
    eigenvalues,
    frobenius_norm,
    lanczos,
    solve,
    spectral_density,
    trace,
)
from .operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    LinearOperator,
    NormalizedLoss,
    identity_like,
)
from .sharpness import METRICS, SharpnessMonitor, SharpnessReport, sharpness

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "CurvatureOperator",
    "EigenResult",
    "EmpiricalFisherOperator",
    "Estimate",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LanczosResult",
    "LinearOperator",
    "NormalizedLoss",
    "PrecisionWarning",
    "SharpnessMonitor",
    "SharpnessReport",
    "SolveResult",
    "SpectralDensity",
    "compat",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "ggn_vp",
    "hvp",
    "identity_like",
    "lanczos",
    "optim",
    "pruning",
    "reference",
    "regularizers",
    "sampling",
    "sharpness",
    "solve",
    "spectral_density",
    "trace",
    "__version__",
]
