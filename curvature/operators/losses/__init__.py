r"""What the operators need to know about a loss function, in closed form where it exists: one object per loss.

For the losses in :data:`~curvature.operators.losses.registry.LOSSES` (``torch.nn.MSELoss``,
``torch.nn.CrossEntropyLoss``, ``torch.nn.BCEWithLogitsLoss``) a batch loss is :math:`L = c \sum_u \ell_u(z_u)`
over *units* ``u``, with :math:`c = 1` for ``reduction="sum"`` and :math:`c = 1/\text{count}` for ``"mean"``.
Each is one :class:`~curvature.operators.losses.base.Loss` subclass in its own module (``mse``,
``cross_entropy``, ``bce``) with its target checks, count, output Hessian (product and square root), Monte-Carlo
Fisher sampling and per-sample losses; any other callable is a :class:`~curvature.operators.losses.generic.
CallableLoss` (autodiff, counts from :class:`NormalizedLoss` or ``torch.nn``). :mod:`.weighting` reads the
reduction and checks that a callable's weighting of batches is its own.

Adding a loss: a module with one :class:`Loss` subclass, its entry in ``LOSSES``, a registry case in
``tests/cases.py`` and a row in ``docs/operators.md``.
"""

from .base import Loss, OutputMatrix, Reduction, factor_product
from .bce import BCEWithLogits
from .cross_entropy import CrossEntropy
from .generic import CallableLoss, averages_entries, known_count
from .mse import MSE
from .normalized import NormalizedLoss, has_normalizer, reported_count
from .registry import (
    LOSSES,
    check_targets,
    loss_for,
    loss_kind,
    mean_count,
    output_hessian,
    per_sample_losses,
    sampled_output_gradients,
)
from .weighting import check_additive, infer_reduction, resolve_reduction

__all__ = [
    "LOSSES",
    "MSE",
    "BCEWithLogits",
    "CallableLoss",
    "CrossEntropy",
    "Loss",
    "NormalizedLoss",
    "OutputMatrix",
    "Reduction",
    "averages_entries",
    "check_additive",
    "check_targets",
    "factor_product",
    "has_normalizer",
    "infer_reduction",
    "known_count",
    "loss_for",
    "loss_kind",
    "mean_count",
    "output_hessian",
    "per_sample_losses",
    "reported_count",
    "resolve_reduction",
    "sampled_output_gradients",
]
