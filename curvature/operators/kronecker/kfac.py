r"""K-FAC: the Kronecker-factored approximation of a Gauss-Newton-type curvature, one block per layer.

For a layer :math:`s_r = W a_r` applied at rows :math:`r` of every sample (one row without weight sharing), the
block of the curvature :math:`\sum_n J_n^\top \Lambda_n J_n` for :math:`W` is :math:`\sum_n \sum_c
\operatorname{vec}(\sum_r g_{ncr} a_{nr}^\top) \operatorname{vec}(\cdot)^\top`, where :math:`g_{ncr}` is the
gradient with respect to :math:`s_r` of one *column* :math:`c` of the loss's factorization (below). K-FAC replaces
the expectation of a Kronecker product by the Kronecker product of expectations (Martens & Grosse 2015, ICML;
convolutions: Grosse & Martens 2016, ICML; weight sharing: Eschenhagen et al. 2023, NeurIPS):

.. math::
    \text{expand:}\quad G \otimes A, \qquad
    A = \frac{1}{\sum_n R_n} \sum_{n, r} a_{nr} a_{nr}^\top, \qquad
    G = \sum_{n, c, r} g_{ncr} g_{ncr}^\top

.. math::
    \text{reduce:}\quad A = \frac{1}{N} \sum_n \bar a_n \bar a_n^\top, \quad \bar a_n = \frac{1}{R_n}\sum_r a_{nr},
    \qquad G = \sum_{n, c} \Big(\sum_r g_{ncr}\Big)\Big(\sum_r g_{ncr}\Big)^\top

The columns :math:`c` depend on ``fisher_type``:

* ``"ggn"`` (curvlinops' ``"type-2"``): the columns of a square root :math:`S` of the loss's output Hessian, one per
  output unit and column (the exact GGN in the factored form :math:`\sum_c (J^\top s_c)(J^\top s_c)^\top`);
* ``"mc"`` (``"mc"``): gradients at ``mc_samples`` targets drawn from the model's predictive distribution, weighted
  by :math:`1/M` (the Monte-Carlo Fisher, exactly the draws of
  :class:`~curvature.operators.ggn.FisherOperator` with the same generator, each backpropagated whole: one backward
  pass per draw. On outputs with several units per sample (positions, MSE or BCE entries) this keeps the cross-unit
  terms, zero in expectation, that ``FisherOperator`` drops at no cost in output space; the two agree on ``(N, C)``
  logits);
* ``"empirical"`` (``"empirical"``): the gradient of each sample's own loss (the empirical Fisher).

A mean loss enters through the weights of the columns, so the operator approximates the curvature of the loss over
all data, whatever the batching. Where the approximation is exact: one data point without weight sharing (the block
diagonal of the GGN); deep linear networks with MSE, for any data, in the expand setting with ``"expand"`` and in the
reduce setting with ``"reduce"`` (Eschenhagen et al. 2023).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..._checks import check_generator, check_scalar
from ..base import LinearOperator
from ..curvature import CurvatureOperator
from ..data import batch_size
from .blocks import BlockEigen, KroneckerBlock
from .layers import FACTORED_MODULES, DiagonalPart, Layer, factored_layers
from .statistics import FactorStatistics

__all__ = ["FISHER_TYPES", "KFACInverse", "KFACOperator"]

#: The curvatures K-FAC can factor, by ``fisher_type``, and curvlinops' names for them.
FISHER_TYPES = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}
_APPROXIMATIONS = ("expand", "reduce")


class KFACOperator(FactorStatistics, CurvatureOperator):
    r"""The Kronecker-factored curvature (K-FAC): one block :math:`G \otimes A` per layer, over the flat parameters.

    The operator acts on the same flat vector as the exact operators (the selected parameters in
    ``model.parameters()`` order) and is block diagonal, one block per layer (per group, for grouped convolutions).
    Factored layers: ``nn.Linear`` (any number of leading dimensions, with or without bias), ``nn.Conv1d`` /
    ``nn.Conv2d`` (any padding, padding mode, stride, dilation and groups; the unfolded patches are the inputs),
    ``nn.Embedding`` (its input factor is the diagonal of token frequencies; the expand statistics are used in both
    modes, since the reduce factor would be a dense vocabulary-sized matrix) and the affine parameters of
    ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm*d`` in eval mode. A normalization layer's
    :math:`s = \gamma \odot \hat x + \beta` has the per-row gradient :math:`[\hat x; 1] \odot [g; g]`; its block is
    the Hadamard-factored :math:`E[a a^\top] \circ E[\tilde g \tilde g^\top]` with :math:`a = [\hat x; 1]`,
    :math:`\tilde g = [g; g]`: K-FAC's independence assumption applied to an elementwise layer, exact for one data
    point, and a dense block of twice the layer's width.

    Any other selected parameter is refused by name, and so is a factored parameter whose gradient is not the one its
    module computes from its input and output (weight tying, or a functional use such as ``F.linear(h, m.weight)``):
    checked on the first batch against autograd, never silently dropped. The factors are computed at the first
    product (or by :meth:`compute`) and again whenever the parameters change.

    Args:
        model: The model; left unchanged (parameters, buffers, ``.grad``, modes, hooks, the RNG).
        loss_fn: ``torch.nn.MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` (mean or sum) for ``"ggn"`` and
            ``"mc"``; any scalar loss for ``"empirical"``.
        data: One ``(inputs, targets)`` batch or a re-iterable of them.
        params: None (all trainable parameters) or an iterable of parameters, names, or a module.
        fisher_type: ``"ggn"`` (default; the type-2 factorization of the exact GGN), ``"mc"`` (Monte-Carlo Fisher)
            or ``"empirical"`` (empirical Fisher); curvlinops calls them ``"type-2"``, ``"mc"``, ``"empirical"``.
        kfac_approx: ``"expand"`` (default; rows of weight-shared layers count as data points) or ``"reduce"``
            (rows are averaged per sample first), Eschenhagen et al. (2023).
        mc_samples: Targets drawn per data point for ``"mc"``.
        generator: Seeds the draws of ``"mc"`` (a fresh random seed if None; the global RNG is never touched).
        unsupported: ``"error"`` (default): a selected parameter no factored layer owns (or several share) is
            refused by name. ``"diagonal"``: such parameters are covered by one more block, the exact diagonal of the
            same curvature (``fisher_type``) over them, from per-sample gradients (``torch.func.vmap``, else a loop
            over samples): one more forward and backward pass per column.
        **kwargs: ``reduction``, ``process_group`` (the factors' statistics are all-reduced over the group once per
            computation) and ``verify`` as in :class:`~curvature.operators.curvature.CurvatureOperator`.

    Raises:
        ValueError: On an unknown ``fisher_type`` or ``kfac_approx``, a parameter no factored layer owns, a factored
            module that is never called, or a parameter used outside its module.
        TypeError: For ``"ggn"`` or ``"mc"`` with a loss that has no closed form or is no likelihood.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> K = KFACOperator(model, torch.nn.CrossEntropyLoss(), data)
        >>> K.shape, len(K.eigh())
        ((26, 26), 2)
        >>> v = torch.randn(26)
        >>> bool(torch.allclose(K.inverse(damping=0.1) @ (K @ v + 0.1 * v), v, atol=1e-4))
        True
    """

    name = "kfac"
    title = "K-FAC"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        params: Any = None,
        *,
        fisher_type: str = "ggn",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        unsupported: str = "error",
        **kwargs: Any,
    ) -> None:
        if unsupported not in ("error", "diagonal"):
            raise ValueError(f"unsupported must be 'error' or 'diagonal', got {unsupported!r}.")
        if fisher_type not in FISHER_TYPES:
            hint = {v: k for k, v in FISHER_TYPES.items()}.get(fisher_type)
            raise ValueError(f"fisher_type must be one of {tuple(FISHER_TYPES)}, got {fisher_type!r}"
                             + (f" (curvlinops' {fisher_type!r} is {hint!r} here)." if hint else "."))
        if kfac_approx not in _APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}.")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
        for unused in ("keep_graph", "vectorize", "allow_tf32"):
            if unused in kwargs:
                raise TypeError(f"{type(self).__name__} keeps no graphs: {unused}= does not apply.")
        check_generator(generator)
        self.fisher_type, self.kfac_approx, self.mc_samples = fisher_type, kfac_approx, mc_samples
        self.unsupported = unsupported
        if generator is None:
            self._seed = torch.Generator().seed() % (2**62)
        else:
            self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        super().__init__(model, loss_fn, data, params, keep_graph=False, **kwargs)
        self.layers, unowned = factored_layers(self.model, self._params, self.param_names,
                                               shared="unowned" if unsupported == "diagonal" else "error")
        if unowned and unsupported == "error":
            names = [self.param_names[i] for i in unowned]
            raise ValueError(
                f"K-FAC has no factorization for parameter(s) {names[:5]}{' ...' if len(names) > 5 else ''}: they "
                f"belong to no {', '.join(t.__name__ for t in FACTORED_MODULES)}. Exclude them with params= "
                "(e.g. params=[p for n, p in model.named_parameters() if ...]), pass unsupported='diagonal' to "
                "cover them with their exact diagonal, or use an exact operator."
            )
        #: The parameters no factored layer owns, covered by their exact diagonal (``unsupported="diagonal"``).
        self.diagonal = DiagonalPart(unowned) if unowned else None
        self._inputs: Any = None
        self._paused = False
        self._blocks: list[KroneckerBlock] | None = None
        self._factors_key: Any = None
        self._recording: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._check_first = True  # the rows are checked against autograd on the first batch, once
        self._column_chunk = 16  # columns backpropagated together
        self._factor_dtype = torch.promote_types(self.dtype, torch.float32)

    # -- hooks of CurvatureOperator ----------------------------------------------------------------------------
    def _known_psd(self) -> bool:
        return True

    def _check_loss_supported(self) -> None:
        loss = self._loss_object
        if self.fisher_type == "ggn" and loss.kind not in ("mse", "ce", "bce"):
            raise TypeError(
                f"fisher_type='ggn' needs a loss whose output Hessian has a closed-form square root (MSELoss, "
                f"CrossEntropyLoss, BCEWithLogitsLoss); {type(self.loss_fn).__name__} has none: use "
                "fisher_type='empirical', or an exact operator."
            )
        if self.fisher_type == "ggn":
            loss.check_ggn()
        if self.fisher_type == "mc":
            loss.check_fisher()
            if self._data.random_order:
                raise ValueError("data is a shuffling DataLoader, but the Monte-Carlo draws are seeded by batch "
                                 "position; pass shuffle=False.")

    @property
    def _weights_by_loss(self) -> bool:  # type: ignore[override]
        return self.fisher_type != "empirical"

    def _batch_weight(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        if self.fisher_type == "empirical":
            return float(batch_size(inputs))
        return self._loss_object.mean_count(targets, inputs, outputs)

    def _apply(self, ctx: Any, vs: list[torch.Tensor], last_use: bool = False) -> list[torch.Tensor]:
        raise NotImplementedError("K-FAC multiplies with its factors, not through per-batch graphs.")

    def clear_cache(self) -> None:
        """Forget the factors: the next product computes them again."""
        super().clear_cache()
        self._blocks, self._factors_key = None, None

    # -- the factors -------------------------------------------------------------------------------------------
    def compute(self) -> None:
        """Compute the factors now (else at the first product); again only after the parameters change."""
        self._sync_with_model()
        key = self._fingerprint()
        if self._blocks is not None and key == self._factors_key:
            return
        self._blocks = None
        self._blocks = self._compute_blocks()
        self._factors_key = key

    def _compute_blocks(self) -> list[KroneckerBlock]:
        """The blocks at the current parameters: one pass over the data for the factors' statistics."""
        return self._make_blocks(self._statistics())

    def _make_blocks(self, stats: dict[str, Any]) -> list[KroneckerBlock]:
        blocks = [kfac_block(layer, A, G) for layer, A, G in zip(self.layers, stats["A"], stats["G"])]
        if self.diagonal is not None:
            blocks.append(diagonal_block(stats["D"][0]))
        return blocks

    @property
    def parts(self) -> list[Layer | DiagonalPart]:
        """The owners of the blocks, in order (the factored layers, then the exact-diagonal part if any)."""
        return self.layers + ([self.diagonal] if self.diagonal is not None else [])

    # -- products ----------------------------------------------------------------------------------------------
    def _blocks_now(self) -> list[KroneckerBlock]:
        self.compute()
        return self._blocks

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks_now()
        self._check_vector(V)
        return _blockwise(self, blocks, V, lambda block, X: block.matmat(X))

    def higher_precision(self) -> LinearOperator | None:
        """None: the factors are accumulated in float32 or better already."""
        return None

    # -- what the structure makes cheap ----------------------------------------------------------------------
    def inverse(self, damping: float = 0.0, heuristic_damping: bool = False) -> KFACInverse:
        r"""The inverse of the damped operator, as an operator.

        With ``heuristic_damping=False`` it is exactly :math:`(K + \delta I)^{-1}`, through the factors'
        eigendecompositions: :math:`(Q_G \otimes Q_A)(\Lambda_G \otimes \Lambda_A + \delta I)^{-1}(Q_G \otimes
        Q_A)^\top` per block. With ``heuristic_damping=True`` each block is instead
        :math:`(G + \sqrt\delta/\pi\, I)^{-1} \otimes (A + \pi\sqrt\delta\, I)^{-1}` with :math:`\pi^2 =
        (\operatorname{tr} A / d_A) / (\operatorname{tr} G / d_G)` (Martens & Grosse 2015, Sec. 6.3), the
        factored damping of K-FAC optimizers (normalization layers' blocks keep the exact damping).

        Args:
            damping: :math:`\delta \ge 0`.
            heuristic_damping: Use the π-corrected factored damping.

        Returns:
            A symmetric positive definite operator (a :class:`~curvature.operators.KFACInverse`).

        Raises:
            ValueError: On a negative damping, or a singular damped operator (pass a positive ``damping``).
        """
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}.")
        if not isinstance(heuristic_damping, bool):
            raise TypeError(f"heuristic_damping must be True or False, got {heuristic_damping!r}.")
        blocks = self._blocks_now()
        for layer, block in zip(self.parts, blocks):
            if block.smallest_denominator(damping, heuristic_damping) <= 0:
                raise ValueError(
                    f"the damped K-FAC block of {layer.name!r} is singular (a zero eigenvalue{'' if damping else ''}"
                    f"); pass damping > 0 (e.g. damping=1e-3 times the trace over the dimension)."
                )
        return KFACInverse(self, blocks, damping, heuristic_damping)

    def logdet(self, damping: float = 0.0) -> torch.Tensor:
        r""":math:`\log\det(K + \delta I) = \sum_{\text{blocks}} \sum_{ij} \log(\lambda^G_i \lambda^A_j + \delta)`.

        Returns ``-inf`` for a singular operator without damping.
        """
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}.")
        return sum(block.logdet(damping) for block in self._blocks_now()).to(self.dtype)

    def trace(self) -> torch.Tensor:
        r""":math:`\operatorname{tr} K = \sum_{\text{blocks}} \operatorname{tr} G \cdot \operatorname{tr} A`."""
        return sum(block.trace() for block in self._blocks_now()).to(self.dtype)

    def frobenius_norm(self) -> torch.Tensor:
        r""":math:`\|K\|_F = (\sum_{\text{blocks}} \|G\|_F^2 \|A\|_F^2)^{1/2}`."""
        return sum(block.squared_frobenius() for block in self._blocks_now()).sqrt().to(self.dtype)

    def eigh(self) -> list[BlockEigen]:
        """The eigendecomposition of every block (:class:`~curvature.operators.kronecker.blocks.BlockEigen`)."""
        out = []
        for layer, block in zip(self.parts, self._blocks_now()):
            _, qr, _, qc = block.eigen()
            out.append(BlockEigen(layer.name, tuple(self.param_names[i] for i in layer.indices),
                                  block.eigenvalues(), qr, qc))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The factors, by layer name (and the options they were computed with)."""
        return {
            "fisher_type": self.fisher_type, "kfac_approx": self.kfac_approx,
            "blocks": {layer.name: block.state() for layer, block in zip(self.parts, self._blocks_now())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Use saved factors (of the same layers) for the current parameters, instead of computing them.

        Raises:
            ValueError: If the layers, shapes or options differ.
        """
        if not isinstance(state, dict) or "blocks" not in state:
            raise TypeError("state must be a dict returned by state_dict().")
        for option in ("fisher_type", "kfac_approx"):
            if state.get(option) != getattr(self, option):
                raise ValueError(f"the state was computed with {option}={state.get(option)!r}, this operator uses "
                                 f"{getattr(self, option)!r}.")
        names = [layer.name for layer in self.parts]
        if list(state["blocks"]) != names:
            raise ValueError(f"the state holds the layers {list(state['blocks'])}, this operator has {names}.")
        blocks = []
        for layer in self.parts:
            saved = {k: v.to(self.device, self._factor_dtype) for k, v in state["blocks"][layer.name].items()}
            blocks.append(self._block_from_state(layer, saved))
        self._sync_with_model()
        self._blocks, self._factors_key = blocks, self._fingerprint()

    def _block_from_state(self, layer: Layer | DiagonalPart, saved: dict[str, torch.Tensor]) -> KroneckerBlock:
        if layer.kind == "diagonal":
            return diagonal_block(saved["col"].reshape(-1))
        return KroneckerBlock(saved["row"], saved["col"], saved.get("scaling"), heuristic=layer.kind == "kronecker")


class KFACInverse(LinearOperator):
    """The inverse of a damped K-FAC or EK-FAC operator, block by block (see :meth:`curvature.KFACOperator.inverse`)."""

    def __init__(self, op: KFACOperator, blocks: list[KroneckerBlock], damping: float, heuristic: bool) -> None:
        super().__init__(op.shape[0], op.dtype, op.device, is_symmetric=True, is_psd=True)
        self.op, self.blocks, self.damping, self.heuristic = op, blocks, damping, heuristic

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return _blockwise(self.op, self.blocks, V, lambda block, X: block.solve(X, self.damping, self.heuristic))


def _blockwise(op: KFACOperator, blocks: list[KroneckerBlock], V: torch.Tensor,
               apply: Callable[[KroneckerBlock, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``apply(block, X)`` to each layer's part of the columns of ``V``."""
    k = V.shape[1]
    pieces = [c.reshape(k, *s) for c, s in zip(V.T.split(op._sizes, dim=1), op._shapes)]
    out = [None] * len(pieces)
    shapes = dict(enumerate(op._shapes))
    for layer, block in zip(op.parts, blocks):
        X = layer.to_matrix({i: pieces[i] for i in layer.indices}).to(op._factor_dtype)
        Y = apply(block, X).to(V.dtype)
        for i, t in layer.from_matrix(Y, shapes).items():
            out[i] = t
    return torch.cat([t.reshape(k, -1) for t in out], dim=1).T.contiguous()












def diagonal_block(diagonal: torch.Tensor) -> KroneckerBlock:
    """The exact-diagonal block: both factors diagonal, the row factor the number 1."""
    return KroneckerBlock(torch.ones(1, 1, dtype=diagonal.dtype, device=diagonal.device), diagonal.reshape(1, -1),
                          heuristic=False)










def kfac_block(layer: Layer, A: torch.Tensor, G: torch.Tensor) -> KroneckerBlock:
    """The K-FAC block of a layer from its input statistic ``A`` and gradient statistic ``G``."""
    if layer.kind == "embedding":
        return KroneckerBlock(A, G)
    if layer.kind == "norm":
        copies = A.shape[-1] // G.shape[-1]
        M = A * G.repeat(1, copies, copies)
        return KroneckerBlock(torch.ones(1, 1, 1, dtype=M.dtype, device=M.device), M, heuristic=False)
    return KroneckerBlock(G, A)
