"""curvature: second-order information for PyTorch models, cheap and exact.

The public names are re-exported here; nothing is defined in this file.
"""

from importlib import metadata as _metadata

from . import compat, optim, pruning, reference, regularizers, sampling
from ._func import ggn_vp, hvp
from .linalg import (
    Comparison,
    EigenResult,
    Estimate,
    LanczosResult,
    PrecisionWarning,
    SolveResult,
    SpectralDensity,
    compare,
    diagonal,
    eigenvalues,
    frobenius_norm,
    lanczos,
    principal_angles,
    solve,
    spectral_density,
    subspace_overlap,
    trace,
)
from .monitor import SharpnessMonitor
from .operators import (
    CurvatureOperator,
    EKFACOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    KFACOperator,
    LinearOperator,
    NormalizedLoss,
    PerSample,
    gradient_norms,
    identity_like,
    per_sample_diagonals,
    per_sample_gradients,
)
from .sharpness import METRICS, SharpnessReport, sharpness

try:  # one source of truth: pyproject.toml, through the installed package's metadata
    __version__ = _metadata.version("curvature")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "METRICS",
    "Comparison",
    "CurvatureOperator",
    "EKFACOperator",
    "EigenResult",
    "EmpiricalFisherOperator",
    "Estimate",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "LanczosResult",
    "LinearOperator",
    "NormalizedLoss",
    "PerSample",
    "PrecisionWarning",
    "SharpnessMonitor",
    "SharpnessReport",
    "SolveResult",
    "SpectralDensity",
    "compare",
    "compat",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "ggn_vp",
    "gradient_norms",
    "hvp",
    "identity_like",
    "lanczos",
    "optim",
    "per_sample_diagonals",
    "per_sample_gradients",
    "principal_angles",
    "pruning",
    "reference",
    "regularizers",
    "sampling",
    "sharpness",
    "solve",
    "spectral_density",
    "subspace_overlap",
    "trace",
    "__version__",
]
