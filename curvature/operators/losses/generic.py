r"""Any other callable loss: its output Hessian by autodiff, its count from what it reports or from ``torch.nn``."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..._checks import no_graph_reason
from ..data import batch_size
from .base import Loss, OutputMatrix, Reduction
from .cross_entropy import position_weights
from .normalized import has_normalizer, reported_count

__all__ = ["CallableLoss", "averages_entries", "callable_per_sample_losses", "entry_count", "known_count"]

# torch.nn losses whose reduction="mean" divides by the number of entries of the elementwise loss.
_ENTRY_MEANS = (nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss, nn.SoftMarginLoss,
                nn.PoissonNLLLoss, nn.HingeEmbeddingLoss)


def averages_entries(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is a ``torch.nn`` loss whose mean is over every entry (not over samples)."""
    if isinstance(loss_fn, nn.KLDivLoss):
        return loss_fn.reduction == "mean"
    return isinstance(loss_fn, _ENTRY_MEANS)


def known_count(loss_fn: Any) -> bool:
    """Whether the count a mean divides by is known for ``loss_fn``: a reported normalizer or a ``torch.nn`` loss.

    For any other callable the operators assume the batch size and check it where they can.
    """
    return has_normalizer(loss_fn) or averages_entries(loss_fn) or isinstance(loss_fn, (nn.NLLLoss, nn.KLDivLoss))


def entry_count(targets: Any, outputs: torch.Tensor | None) -> float:
    """The number of entries of an elementwise loss: of the outputs broadcast against tensor targets."""
    shape = outputs.shape if outputs is not None else targets.shape
    if isinstance(targets, torch.Tensor) and outputs is not None:
        shape = torch.broadcast_shapes(outputs.shape, targets.shape)
    return float(math.prod(shape))


def callable_per_sample_losses(
    loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any
) -> torch.Tensor:
    """``loss_fn`` on every sample alone, batched with ``torch.func.vmap`` (one call per sample where it cannot)."""
    def one(z: torch.Tensor, y: Any) -> torch.Tensor:
        return loss_fn(z.unsqueeze(0), tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y))

    def sample(y: Any, i: int) -> Any:
        return tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, y)

    try:
        return torch.func.vmap(one)(outputs, targets)
    except (RuntimeError, ValueError):  # a loss that vmap cannot batch: one call per sample
        return torch.stack([one(outputs[i], sample(targets, i)) for i in range(outputs.shape[0])])


class CallableLoss(Loss):
    """Any loss without a closed form here: ``torch.nn`` losses other than the registry's, and plain callables.

    Its output Hessian is a Hessian-vector product of ``loss_fn`` in output space, its per-sample losses come
    from ``torch.func.vmap``, and it has no Fisher. The count of a mean is what the loss reports
    (:class:`~curvature.operators.losses.normalized.NormalizedLoss`), else the entries of the ``torch.nn`` losses
    that average over entries, the weighted non-ignored targets of ``NLLLoss``, else the batch size.
    """

    kind = "other"

    def check_targets(self, outputs: torch.Tensor, targets: Any) -> None:
        """Nothing to check: the loss gets the targets as they come."""

    def mean_count(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """What the loss reports (:func:`reported_count`), the entries or targets ``torch.nn`` counts, or samples.

        A callable that averages over a count that varies between batches without reporting it is caught where
        it can be: within a batch by :func:`~curvature.operators.losses.weighting.check_additive`, and between
        batches by the operators, which refuse batches whose outputs have different shapes per sample.
        """
        if has_normalizer(self.loss_fn) and outputs is not None:
            return reported_count(self.loss_fn, outputs, targets)
        if averages_entries(self.loss_fn):
            return entry_count(targets, outputs)
        if isinstance(self.loss_fn, nn.NLLLoss) and isinstance(targets, torch.Tensor):  # class indices, as for CE
            return float(position_weights(self.loss_fn, targets, torch.float64).sum())
        return float(batch_size(inputs))

    def output_hessian(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
        """A Hessian-vector product of ``loss_fn`` in output space per column (zero for a loss linear in ``z``).

        Raises:
            ValueError: When applied, if the loss does not depend on the outputs.
        """
        z = outputs.detach()
        loss_fn = self.loss_fn

        def autodiff_hessian(U: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                leaf = z.clone().requires_grad_(True)
                loss = loss_fn(leaf, targets)
                if not loss.requires_grad:
                    raise ValueError(
                        f"the loss does not depend on the model's outputs: {no_graph_reason(loss)}; curvature needs "
                        "it differentiable."
                    )
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                if not g.requires_grad:  # the loss is linear in the outputs
                    return torch.zeros_like(U)
                return torch.stack([torch.autograd.grad(g, leaf, u, retain_graph=True)[0] for u in U])

        return autodiff_hessian

    def ggn_is_psd(self) -> bool:
        """False: the GGN is PSD only where the loss is convex in the outputs, which is not known here."""
        return False

    def check_fisher(self) -> None:
        """Always raises: a callable is not a likelihood the operators can sample from.

        Raises:
            TypeError: Always.
        """
        raise self._no_likelihood()

    def sampled_output_gradients(
        self, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Refused, as :meth:`check_fisher` refuses the Fisher.

        Raises:
            TypeError: Always.
        """
        raise self._no_likelihood()

    def _no_likelihood(self) -> TypeError:
        return TypeError(
            f"FisherOperator needs a loss that is a negative log-likelihood it knows (torch.nn.MSELoss, "
            f"torch.nn.CrossEntropyLoss or torch.nn.BCEWithLogitsLoss), got {type(self.loss_fn).__name__}; use "
            "GGNOperator or EmpiricalFisherOperator for other losses."
        )

    def per_sample_losses(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        """``loss_fn`` on every sample alone (:func:`callable_per_sample_losses`); ``reduction`` is the loss's own."""
        return callable_per_sample_losses(self.loss_fn, outputs, targets)
