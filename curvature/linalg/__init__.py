"""Matrix-free linear algebra on curvature operators: eigenvalues, trace and diagonal estimators, SLQ, solves.

Every function takes any symmetric operator with ``@``, ``.shape``, ``.dtype`` and ``.device``.
"""

from .density import SpectralDensity, spectral_density
from .diagonal import diagonal
from .eigen import EigenResult, eigenvalues
from .lanczos import LanczosResult, lanczos
from .solve import SolveResult, solve
from .trace import Estimate, frobenius_norm, trace

__all__ = [
    "EigenResult",
    "Estimate",
    "LanczosResult",
    "SolveResult",
    "SpectralDensity",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "lanczos",
    "solve",
    "spectral_density",
    "trace",
]
