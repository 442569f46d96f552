"""Matrix-free linear algebra on curvature operators: eigenvalues, trace and diagonal estimators, SLQ, solves.

Every function takes an operator with ``@``, ``.shape``, ``.dtype`` and ``.device`` (``compare`` takes two, an
approximation and its reference); eigenvalue methods, Lanczos, SLQ, the solvers and ``compare`` need it
symmetric, trace, diagonal and Frobenius-norm estimators do not. Whatever the operator's dtype, the estimators
compute in at least float32 and their rounding-level tests scale with what its products can deliver
(``Operand``, the view of an operator every estimator works through, exported for jobs that run their own
estimation loop, such as pruning's joint diagonal and block-trace pass).
"""

from ._operand import Operand, PrecisionWarning
from .compare import Comparison, compare
from .density import SpectralDensity, spectral_density
from .diagonal import diagonal
from .eigen import EigenResult, eigenvalues
from .lanczos import LanczosResult, lanczos
from .solve import SolveResult, solve
from .subspace import orthonormal_basis, principal_angles, subspace_overlap
from .trace import Estimate, frobenius_norm, trace

__all__ = [
    "Comparison",
    "EigenResult",
    "Estimate",
    "LanczosResult",
    "Operand",
    "PrecisionWarning",
    "SolveResult",
    "SpectralDensity",
    "compare",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "lanczos",
    "orthonormal_basis",
    "principal_angles",
    "solve",
    "spectral_density",
    "subspace_overlap",
    "trace",
]
