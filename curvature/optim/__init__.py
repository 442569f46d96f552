"""Curvature-aware optimizers, SAM and gradient regularization: ``torch.optim.Optimizer`` subclasses, one closure.

``step(closure)``: the closure runs the forward pass and returns the scalar loss with its graph, without
calling ``backward``; the optimizer differentiates it as often as its method needs (each class says how
often), never reads or writes ``.grad``, and returns the loss at the start of the step. The update rules
are also plain functions on an operator and a gradient in :mod:`curvature.optim.functional`. :class:`SAM` and
:class:`GradientRegularization` wrap a base optimizer (SGD, Adam, ...) instead: they write a modified gradient
into ``.grad`` and let it step. :class:`KFAC` is a drop-in for SGD: it reads ``.grad`` (or differentiates a closure
of the same contract) and takes the batch the gradient was computed on, ``step(batch=(inputs, targets))``, for the
Kronecker factors of its curvature.
"""

from . import functional
from .gradient_regularization import GradientRegularization
from .hessian_free import HessianFree, HessianFreeState
from .kfac import KFAC, KFACState
from .regularized_newton import RegularizedNewton, RegularizedNewtonState
from .saddle_free import SaddleFreeNewton, SaddleFreeNewtonState
from .sam import SAM

__all__ = [
    "SAM",
    "GradientRegularization",
    "HessianFree",
    "HessianFreeState",
    "KFAC",
    "KFACState",
    "RegularizedNewton",
    "RegularizedNewtonState",
    "SaddleFreeNewton",
    "SaddleFreeNewtonState",
    "functional",
]
