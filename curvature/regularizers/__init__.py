"""Sharpness regularizers: gradient-norm regularization, Hessian alignment across domains, a Hessian-trace penalty.

Each is a function that returns a gradient or a differentiable scalar, so it drops into any training loop.
The optimizers that step with them live in :mod:`curvature.optim`: SAM, and
:class:`~curvature.optim.GradientRegularization`, which steps with :func:`gradient_norm_penalty`'s gradient
(also importable from here, as before).
"""

from ..optim import GradientRegularization as GradientRegularization
from .gradient_norm import gradient_norm_penalty
from .hessian_alignment import hessian_alignment_penalty
from .trace_penalty import hessian_trace_penalty

__all__ = ["gradient_norm_penalty", "hessian_alignment_penalty", "hessian_trace_penalty"]
