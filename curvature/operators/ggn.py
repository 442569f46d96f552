r"""Gauss-Newton-type operators: GGN, Fisher (exact and Monte-Carlo) and empirical Fisher.

All three have the form :math:`\sum_b J_b^\top \Lambda_b J_b`, where :math:`J_b` is the Jacobian of some
per-batch output :math:`z_b(\theta)` and :math:`\Lambda_b` a small PSD matrix in output space:

==========================  ===========================  ==================================================
operator                    :math:`z`                    :math:`\Lambda`
==========================  ===========================  ==================================================
:class:`GGNOperator`        model outputs                :math:`\nabla^2_z L` (closed form for MSE/CE/BCE)
:class:`FisherOperator`     model outputs                :math:`\mathbb E_{\hat y \sim p(\cdot|z)}[g g^\top]`
                                                         (exact, or a Monte-Carlo average)
:class:`EmpiricalFisherOp.` per-sample losses            :math:`c\, I` (1/N for a mean loss)
==========================  ===========================  ==================================================

Products use two kept graphs per batch: the forward graph of :math:`z` (for :math:`J^\top u`, one backward)
and the graph of :math:`J^\top u` as a linear function of a dummy :math:`u` (for :math:`J v`, the
"double-backward trick", one more backward). No forward pass is repeated while the graph is kept. A
single product without a kept graph computes :math:`J v` in forward mode instead (dual numbers through
one forward pass), which is cheaper than building the :math:`J^\top u` graph for one vector.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as fwAD

from .._checks import check_generator
from .._func import model_outputs, vjp_columns
from .curvature import CurvatureOperator, require_graph
from .data import batch_size
from .losses import OutputMatrix, factor_product
from .per_sample import exact_diagonal

__all__ = ["EmpiricalFisherOperator", "FisherOperator", "GGNOperator"]


class _JacobianSandwich(CurvatureOperator):
    """Shared product ``J^T Lambda J v`` for operators defined by an output map and an output matrix."""

    def _known_psd(self) -> bool:
        return True

    @property
    def has_exact_diagonal(self) -> bool:
        """Whether :meth:`diagonal` computes the diagonal from the structure (a closed-form loss), not products."""
        return self._loss_object.kind != "other"

    def _check_structured_diagonal(self) -> None:
        if not self.has_exact_diagonal:
            raise TypeError(
                f"the {self.title} of {type(self.loss_fn).__name__} has no closed-form square root of its output "
                "Hessian, so its diagonal has no structured form; use curvature.diagonal(op, method='exact') (P "
                "products) or an estimate (method='hutchinson')."
            )

    def diagonal(self, chunk_size: int | None = None) -> torch.Tensor:
        r"""The exact diagonal, from the structure of the matrix instead of ``P`` products.

        :math:`\operatorname{diag}(J^\top S S^\top J) = \sum_k (J^\top s_k)^{\odot 2}`, summed per sample
        (:func:`~curvature.per_sample_diagonals`): one vectorized pullback per sample and output column instead of
        ``P`` products (BackPACK's ``DiagGGNExact``/``DiagGGNMC``). :func:`curvature.diagonal` with ``method="exact"``
        calls it. In a process group the ranks' sums are all-reduced once.

        Args:
            chunk_size: Samples per vectorized chunk (None: about 256 MiB of pullbacks).

        Returns:
            ``(P,)`` in the operator's dtype.

        Raises:
            TypeError: For a loss without a closed-form output Hessian (see :attr:`has_exact_diagonal`).
        """
        self._check_structured_diagonal()
        return exact_diagonal(self, chunk_size)

    @abstractmethod
    def _sample_columns(self, outputs: torch.Tensor, targets: Any, index: int
                        ) -> tuple[torch.Tensor, tuple[int, ...] | None, float]:
        """The output matrix's columns, the loss's unit dimensions and the scale.

        The columns are ``(k, *z.shape)`` with ``Lambda = scale * sum_k c_k c_k^T`` per unit; unit dimensions None
        mean that the columns are per sample already.
        """

    def _output(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The differentiable output ``z`` whose Jacobian ``J`` sandwiches ``Lambda`` (default: the outputs)."""
        return outputs

    @abstractmethod
    def _output_matrix(self, outputs: torch.Tensor, targets: Any, index: int) -> OutputMatrix:
        """The map ``U -> Lambda U`` for ``U`` of shape ``(k, *z.shape)``, from the detached model outputs."""

    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        z = self._output(outputs, targets)
        require_graph(z, "the model's outputs" if z is outputs else "the per-sample losses")
        dummy = torch.zeros_like(z, requires_grad=True)
        jt = torch.autograd.grad(z, leaves, dummy, create_graph=True, allow_unused=True)
        return leaves, z, dummy, jt, self._output_matrix(outputs.detach(), targets, index)

    def _apply(self, ctx: Any, vs: list[torch.Tensor], last_use: bool = False) -> list[torch.Tensor]:
        leaves, z, dummy, jt, lam = ctx
        (jv,) = vjp_columns(jt, [dummy], vs, vectorize=self.vectorize)
        return vjp_columns([z], leaves, [lam(jv)], vectorize=self.vectorize, retain_graph=not last_use)

    def _fresh_product(self, leaves: list[torch.Tensor], inputs: Any, targets: Any, index: int,
                       vs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """One product without a kept graph: ``J v`` in forward mode, then one backward pass.

        A single forward pass with dual numbers gives both ``z`` (with its autograd graph) and ``J v``:
        cheaper than building the graph of ``J^T u`` for one vector (half the time on a CNN, measured).
        Returns None when an operation of the model has no forward-mode derivative.
        """
        try:
            with fwAD.dual_level():
                duals = [fwAD.make_dual(leaf, v[0]) for leaf, v in zip(leaves, vs)]
                dual_outputs = model_outputs(self.model, self._state(duals), inputs)
                outputs = fwAD.unpack_dual(dual_outputs).primal
                self._check_batch(index, outputs, targets, inputs)
                z, jv = fwAD.unpack_dual(self._output(dual_outputs, targets))
        except (NotImplementedError, RuntimeError):  # no forward-mode rule (the reverse path names real errors)
            return None
        if jv is None:  # z does not depend on the parameters
            jv = torch.zeros_like(z)
        lam = self._output_matrix(outputs.detach(), targets, index)
        columns = vjp_columns([z], leaves, [lam(jv.unsqueeze(0))], vectorize=False, retain_graph=False)
        return columns, outputs.detach()


class GGNOperator(_JacobianSandwich):
    r"""The generalized Gauss-Newton matrix :math:`G = \sum_n J_n^\top \nabla^2_{z} \ell\, J_n`.

    .. math:: G v = J^\top \big( \nabla^2_z L \big) J v, \qquad J = \partial z / \partial \theta

    (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent";
    Martens 2020, arXiv:1412.1193). The loss Hessian in output space is in closed form for
    ``torch.nn.MSELoss``, ``torch.nn.CrossEntropyLoss`` (mean or sum; 2-D or N-D logits; class-index
    or probability targets; ``ignore_index``, ``weight`` and ``label_smoothing``) and
    ``torch.nn.BCEWithLogitsLoss`` (mean or sum; any logit shape; ``weight`` and ``pos_weight``), and computed
    by autodiff for any other scalar ``loss_fn``. For these three the GGN is PSD (with non-negative weights), and
    without weights it equals the Fisher; for other losses it is PSD only where the loss is convex in the outputs, so
    ``is_psd`` is then False.

    A product costs two backward passes through kept graphs. Arguments as in
    :class:`~curvature.operators.curvature.CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), (torch.randn(8, 3), torch.randint(0, 2, (8,))))
        >>> bool(G.is_psd), G.shape
        (True, (8, 8))
    """

    name = "ggn"
    title = "GGN"

    def _known_psd(self) -> bool:
        return self._loss_object.ggn_is_psd()

    def _check_loss_supported(self) -> None:
        self._loss_object.check_ggn()

    def _output_matrix(self, outputs: torch.Tensor, targets: Any, index: int) -> OutputMatrix:
        return self._loss_object.output_hessian(outputs, targets, self.reduction)

    def _sample_columns(self, outputs: torch.Tensor, targets: Any, index: int
                        ) -> tuple[torch.Tensor, tuple[int, ...] | None, float]:
        loss = self._loss_object
        return loss.output_hessian_sqrt(outputs.detach(), targets, self.reduction), loss.unit_dims, 1.0


class FisherOperator(GGNOperator):
    r"""The Fisher information of the model's likelihood, exact or by Monte-Carlo sampling.

    .. math:: F = c \sum_n J_n^\top\, \mathbb E_{\hat y \sim p(\cdot \mid z_n)}
              \big[\nabla_z \ell(z_n, \hat y)\, \nabla_z \ell(z_n, \hat y)^\top\big] J_n

    with the likelihood that the loss is the negative log of: a Gaussian :math:`\mathcal N(z, \frac12 I)`
    for ``MSELoss``, a categorical (at every position) for ``CrossEntropyLoss`` and a Bernoulli
    :math:`\sigma(z)` (at every entry) for ``BCEWithLogitsLoss``; :math:`c` is the loss's mean normalizer
    (or 1 for a sum). For these exponential families the exact Fisher equals the
    GGN (Martens 2020, arXiv:1412.1193, Sec. 9). With ``mc_samples=M`` the expectation is replaced by an
    average over ``M`` targets drawn per data point (Kunstner, Balles, Hennig 2019, arXiv:1905.12558),
    an unbiased, PSD, rank-limited estimate. The draws are fixed when the operator is built (one seed per
    batch taken from ``generator``), so the operator is one linear map: repeated products agree. Keep the
    batch order fixed (no shuffling loader) for that to hold across passes over the data. In a process
    group every rank seeds its batches apart (by rank and batch index), so the shards' draws are
    independent even with identically seeded generators.

    Args:
        model: The model.
        loss_fn: ``torch.nn.MSELoss``, ``torch.nn.CrossEntropyLoss`` (without ``weight=``) or
            ``torch.nn.BCEWithLogitsLoss`` (without ``weight=`` and ``pos_weight=``).
        data: One batch or an iterable of batches.
        params: None or an iterable of parameters or names.
        mc_samples: None for the exact Fisher, else the number of sampled targets per data point.
        generator: The ``torch.Generator`` that seeds the samples (a fresh random seed if None; the
            global RNG is never touched).
        **kwargs: ``reduction``, ``keep_graph``, ``vectorize``, ``process_group``, ``verify``, ``allow_tf32`` as in
            :class:`~curvature.operators.curvature.CurvatureOperator`.

    Raises:
        TypeError: For a loss that is not the negative log-likelihood of a known distribution.
        ValueError: For ``mc_samples`` that is not a positive integer, or a loss with class or entry weights.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> g = torch.Generator().manual_seed(0)
        >>> F = FisherOperator(model, torch.nn.CrossEntropyLoss(), data, mc_samples=4, generator=g)
        >>> F.shape
        (8, 8)
    """

    name = "fisher"
    title = "Fisher"

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        params: Any = None,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if mc_samples is not None and (isinstance(mc_samples, bool) or not isinstance(mc_samples, int)
                                       or mc_samples < 1):
            raise ValueError(f"mc_samples must be None (exact Fisher) or a positive integer, got {mc_samples!r}.")
        check_generator(generator)
        self.mc_samples = mc_samples
        if generator is None:
            self._seed = torch.Generator().seed() % (2**62)
        else:
            self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        super().__init__(model, loss_fn, data, params, **kwargs)

    def _check_loss_supported(self) -> None:
        self._loss_object.check_fisher()
        if self.mc_samples is not None and self._data.random_order:
            raise ValueError(
                "data is a shuffling DataLoader, but the Monte-Carlo Fisher seeds its draws by batch position, so "
                "every product would draw targets for other samples and the operator would change between "
                "products; pass shuffle=False (a sum over all batches does not need shuffling)."
            )

    def _draws(self, outputs: torch.Tensor, targets: Any, index: int) -> tuple[torch.Tensor, float]:
        """Batch ``index``'s sampled output gradients ``(M, *z.shape)`` (fixed by the seed) and their scale."""
        rank = self._shards.rank if self._shards is not None else 0  # independent draws on every shard
        generator = torch.Generator(device=self.device).manual_seed(self._seed + (rank << 32) + index)
        g = self._loss_object.sampled_output_gradients(outputs.detach(), targets, self.mc_samples, generator)
        count = self._batch_weight(targets, None, outputs) if self.reduction == "mean" else 1.0
        return g, 1.0 / (self.mc_samples * count) if count else 0.0  # a batch with every target ignored

    def _output_matrix(self, outputs: torch.Tensor, targets: Any, index: int) -> OutputMatrix:
        if self.mc_samples is None:
            return super()._output_matrix(outputs, targets, index)
        # Unit by unit (the class dimension at each position; each entry for MSE and BCE): the draws at different
        # positions are independent with mean zero, so their cross terms vanish in expectation; keeping them (one
        # joint draw per sample) only added variance, 3x at 3000 draws over sequences.
        g, scale = self._draws(outputs, targets, index)
        return factor_product(g * math.sqrt(scale), self._loss_object.unit_dims)

    def _sample_columns(self, outputs: torch.Tensor, targets: Any, index: int
                        ) -> tuple[torch.Tensor, tuple[int, ...] | None, float]:
        if self.mc_samples is None:
            return super()._sample_columns(outputs, targets, index)
        g, scale = self._draws(outputs, targets, index)
        return g, self._loss_object.unit_dims, scale


class EmpiricalFisherOperator(_JacobianSandwich):
    r"""The empirical Fisher: the (uncentered) second moment of per-sample gradients.

    .. math:: E = c \sum_{n=1}^{N} \nabla_\theta \ell_n \, \nabla_\theta \ell_n^\top, \qquad
              c = 1/N \text{ (mean loss) or } 1 \text{ (sum)}

    where :math:`\ell_n` is ``loss_fn`` applied to sample :math:`n` alone, so that
    :math:`\nabla L = c \sum_n \nabla \ell_n`. It is not the Fisher and can misrepresent curvature
    (Kunstner, Balles, Hennig 2019, arXiv:1905.12558), but it is cheap and popular (Adam, K-FAC variants).
    The product is :math:`J_\ell^\top (c\, J_\ell v)` with :math:`J_\ell` the Jacobian of the vector of
    per-sample losses: two backward passes, no per-sample gradients are materialized. Works for any
    ``loss_fn``; other callables are split per sample with ``torch.func.vmap`` (falling back to a loop).
    Arguments as in :class:`~curvature.operators.curvature.CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> E = EmpiricalFisherOperator(model, torch.nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)))
        >>> E.shape
        (4, 4)
    """

    name = "empirical_fisher"
    title = "Empirical Fisher"

    def _output(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return self._loss_object.per_sample_losses(outputs, targets, self.reduction)

    def _output_matrix(self, outputs: torch.Tensor, targets: Any, index: int) -> OutputMatrix:
        scale = 1.0 / outputs.shape[0] if self.reduction == "mean" and outputs.shape[0] else 1.0
        return lambda U: scale * U

    @property
    def has_exact_diagonal(self) -> bool:
        """Whether the diagonal comes from the structure, which for the empirical Fisher holds with every loss."""
        return True

    def _sample_columns(self, outputs: torch.Tensor, targets: Any, index: int
                        ) -> tuple[torch.Tensor, tuple[int, ...] | None, float]:
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = self._loss_object.per_sample_losses(z, targets, self.reduction)
            (column,) = torch.autograd.grad(losses.sum(), z)
        scale = 1.0 / outputs.shape[0] if self.reduction == "mean" and outputs.shape[0] else 1.0
        return column.unsqueeze(0), None, scale

    _weights_by_loss = False  # per-sample losses, weighted by samples whatever loss_fn averages over

    def _batch_weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        return float(batch_size(inputs))
