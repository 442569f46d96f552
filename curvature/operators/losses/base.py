r"""The protocol every loss implements for the operators: one :class:`Loss` subclass per kind of loss.

A batch loss is :math:`L = c \sum_u \ell_u(z_u)` over *units* ``u`` of the outputs ``z`` (output entries for
MSE and binary cross-entropy, positions for cross-entropy), with :math:`c = 1` for ``reduction="sum"`` and
:math:`c = 1/\text{count}` for ``"mean"``. A :class:`Loss` wraps one ``loss_fn`` and answers what the
operators ask of it: whether targets fit the outputs, the count a mean divides by, the Hessian
:math:`\Lambda = \nabla^2_z L` in output space (as a product, and where it is in closed form as a square root),
targets drawn from the likelihood the loss is the negative log of (Monte-Carlo Fisher), and the loss of each
sample alone (empirical Fisher).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Literal

import torch

__all__ = ["Loss", "OutputMatrix", "Reduction", "factor_product", "require_tensor_targets", "unit_masks"]

Reduction = Literal["mean", "sum"]
#: A map ``U -> Lambda U`` for ``U`` of shape ``(k, *z.shape)``.
OutputMatrix = Callable[[torch.Tensor], torch.Tensor]


class Loss(ABC):
    """What the curvature operators need to know about one kind of loss function.

    One subclass per supported kind, listed in :data:`~curvature.operators.losses.registry.LOSSES`: adding a
    loss is one module with one subclass and one registry entry. Any other callable is a
    :class:`~curvature.operators.losses.generic.CallableLoss` (autodiff, no Fisher).

    Attributes:
        kind: The short name the operators store (``"mse"``, ``"ce"``, ``"bce"``; ``"other"`` for callables).
        modules: The ``torch.nn`` loss classes this kind stands for.
        unit_dims: The dimensions of ``z`` that make up one unit of :meth:`output_hessian_sqrt` (``()``: every
            entry is a unit; ``(1,)``: the class dimension at every position).
        loss_fn: The wrapped loss.
    """

    kind: ClassVar[str]
    modules: ClassVar[tuple[type, ...]] = ()
    unit_dims: ClassVar[tuple[int, ...]] = ()

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn

    @classmethod
    def matches(cls, loss_fn: Any) -> bool:
        """Whether ``loss_fn`` is a loss of this kind."""
        return isinstance(loss_fn, cls.modules)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.loss_fn!r})"

    # -- what every loss answers -------------------------------------------------------------------------------
    @abstractmethod
    def check_targets(self, outputs: torch.Tensor, targets: Any) -> None:
        """Refuse targets that do not match the outputs (where the loss would broadcast or fail cryptically).

        Raises:
            ValueError: On a shape mismatch or a value out of range.
            TypeError: On targets the loss cannot use.
        """

    @abstractmethod
    def mean_count(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """What ``reduction="mean"`` divides the batch's summed loss by (``outputs`` may be None)."""

    @abstractmethod
    def output_hessian(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
        r"""Return :math:`U \mapsto \nabla^2_z L(z)\, U` for the batch loss, for ``U`` of shape ``(k, *z.shape)``."""

    @abstractmethod
    def per_sample_losses(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        """Each sample's loss, as ``loss_fn`` gives it for a batch holding only that sample: shape ``(N,)``."""

    # -- closed forms and likelihoods: refused unless the subclass has them ----------------------------------------
    def output_hessian_sqrt(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        r"""A square root :math:`S` of the output Hessian, unit by unit: ``(k, *z.shape)``.

        :math:`\nabla^2_z L\, U = \sum_j S_j \odot \langle S_j, U \rangle_{\text{unit}}`, where the inner product
        sums over :attr:`unit_dims` (:func:`factor_product`), so that :math:`J^\top \nabla^2_z L\, J =
        \sum_j (J^\top S_j)(J^\top S_j)^\top`: the low-rank form of the GGN that structured and diagonal
        estimators take.

        Raises:
            TypeError: For a loss without a closed-form Hessian.
        """
        raise TypeError(f"{type(self.loss_fn).__name__} has no closed-form output Hessian, so no square root; "
                        "use output_hessian (a product by autodiff).")

    def ggn_is_psd(self) -> bool:
        """Whether the output Hessian is PSD for every output (the loss is convex in the outputs)."""
        return True

    def check_ggn(self) -> None:  # noqa: B027 (an optional hook: most losses have a GGN)
        """Raise if the GGN of this loss cannot be computed (default: it can)."""

    def check_fisher(self) -> None:  # noqa: B027 (an optional hook: the closed-form losses are likelihoods)
        """Raise if the loss is not the negative log-likelihood of a distribution it can sample from.

        Raises:
            TypeError: For a loss that is not a known negative log-likelihood.
            ValueError: For options that make it no likelihood (class weights).
        """

    @abstractmethod
    def sampled_output_gradients(
        self, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        r"""Gradients in output space of the summed loss at targets drawn from the model's predictive distribution.

        :math:`\mathbb E[g g^\top]` equals the summed loss's output Hessian, which makes the Monte-Carlo Fisher an
        unbiased estimate of the GGN (Kunstner, Balles, Hennig 2019, arXiv:1905.12558).

        Args:
            outputs: The batch's outputs ``z``.
            targets: The batch's targets (only for masks such as ``ignore_index``).
            num_samples: Samples per data point.
            generator: Source of randomness (draws happen on its device).

        Returns:
            Tensor of shape ``(num_samples, *z.shape)``.
        """


def require_tensor_targets(loss_fn: Any, targets: Any) -> None:
    """Raise a TypeError unless ``targets`` is a tensor (what every ``torch.nn`` loss needs)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor for {type(loss_fn).__name__}, got {type(targets).__name__}.")


def factor_product(factor: torch.Tensor, unit_dims: tuple[int, ...]) -> OutputMatrix:
    r"""The map :math:`U \mapsto \sum_j S_j \odot \langle S_j, U\rangle_{\text{unit}}` of a square root ``S``.

    Args:
        factor: ``S`` of shape ``(k, *z.shape)``, as :meth:`Loss.output_hessian_sqrt` returns it.
        unit_dims: The dimensions of ``z`` the inner product sums over (``()``: entry by entry).

    Returns:
        The map, for ``U`` of shape ``(m, *z.shape)``.

    Example:
        >>> S = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # k = 2 columns for z of shape (1, 2)
        >>> factor_product(S, (1,))(torch.ones(1, 1, 2))
        tensor([[[1., 4.]]])
    """
    dims = tuple(d + 2 for d in unit_dims)  # U and S gain a column and a factor dimension in front of z's

    def product(U: torch.Tensor) -> torch.Tensor:
        S = factor.unsqueeze(1)  # (k, 1, *z.shape)
        inner = S * U.unsqueeze(0)
        if dims:
            inner = inner.sum(dims, keepdim=True)
        return (S * inner).sum(0)

    return product


def unit_masks(sample_shape: tuple[int, ...], unit_dims: tuple[int, ...] | None) -> torch.Tensor | None:
    """One 0/1 mask per unit position of a sample's outputs: ``(U, *sample_shape)``, or None for a single unit.

    A unit-wise square root (:meth:`Loss.output_hessian_sqrt`) holds every unit's root at once; pulled back whole,
    the units of one sample would add cross terms that are not in the matrix, so each column is restricted to one
    unit position at a time (the class dimension at each position for cross-entropy, each entry for MSE and BCE).

    Args:
        sample_shape: The shape of one sample's outputs (``z.shape[1:]``).
        unit_dims: The dimensions of ``z`` that make up one unit (:attr:`Loss.unit_dims`, counted with the batch
            dimension as 0); None: the columns are per sample already.

    Returns:
        The masks, or None when a sample has one unit position (nothing to split).
    """
    if unit_dims is None:
        return None
    positions = [d for d in range(1, len(sample_shape) + 1) if d not in unit_dims]
    if not positions:
        return None
    masks = []
    for index in itertools.product(*(range(sample_shape[d - 1]) for d in positions)):
        mask = torch.zeros(sample_shape)
        where: list[Any] = [slice(None)] * len(sample_shape)
        for d, i in zip(positions, index):
            where[d - 1] = i
        mask[tuple(where)] = 1
        masks.append(mask)
    return torch.stack(masks)
