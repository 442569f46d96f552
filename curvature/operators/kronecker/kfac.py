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
  :class:`~curvature.operators.ggn.FisherOperator` with the same generator);
* ``"empirical"`` (``"empirical"``): the gradient of each sample's own loss (the empirical Fisher).

A mean loss enters through the weights of the columns, so the operator approximates the curvature of the loss over
all data, whatever the batching. Where the approximation is exact: one data point without weight sharing (the block
diagonal of the GGN); deep linear networks with MSE, for any data, in the expand setting with ``"expand"`` and in the
reduce setting with ``"reduce"`` (Eschenhagen et al. 2023).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..._checks import check_generator, check_scalar
from ..base import LinearOperator
from ..curvature import CurvatureOperator, require_graph
from ..data import batch_size
from .blocks import BlockEigen, KroneckerBlock
from .layers import FACTORED_MODULES, Layer, factored_layers

__all__ = ["FISHER_TYPES", "KFACInverse", "KFACOperator"]

#: The curvatures K-FAC can factor, by ``fisher_type``, and curvlinops' names for them.
FISHER_TYPES = {"ggn": "type-2", "mc": "mc", "empirical": "empirical"}
_APPROXIMATIONS = ("expand", "reduce")


class KFACOperator(CurvatureOperator):
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
        **kwargs: Any,
    ) -> None:
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
        if generator is None:
            self._seed = torch.Generator().seed() % (2**62)
        else:
            self._seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        super().__init__(model, loss_fn, data, params, keep_graph=False, **kwargs)
        self.layers, unowned = factored_layers(self.model, self._params, self.param_names)
        if unowned:
            names = [self.param_names[i] for i in unowned]
            raise ValueError(
                f"K-FAC has no factorization for parameter(s) {names[:5]}{' ...' if len(names) > 5 else ''}: they "
                f"belong to no {', '.join(t.__name__ for t in FACTORED_MODULES)}. Exclude them with params= "
                "(e.g. params=[p for n, p in model.named_parameters() if ...]), or use an exact operator."
            )
        self._blocks: list[KroneckerBlock] | None = None
        self._factors_key: Any = None
        self._recording: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._check_first = False
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
        stats = self._statistics()
        self._blocks = self._make_blocks(stats)
        self._factors_key = key

    @contextlib.contextmanager
    def _recorded(self) -> Iterator[None]:
        """Record every factored module's (input, output) during forward passes; the hooks are always removed."""
        records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def hook(index: int) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                records.setdefault(index, []).append((args[0].detach(), output))
            return record

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        self._recording = records
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._recording = None

    def _statistics(self) -> dict[str, Any]:
        """Sum the factors' statistics over the batches (and the ranks of a process group)."""
        totals: dict[str, Any] | None = None
        weight_sum, batches = 0.0, 0
        self._check_first = True
        with torch.enable_grad(), self._recorded():
            for stats, weight in self._build_contexts():
                if totals is None:
                    totals = {key: [torch.zeros_like(t) for t in value] for key, value in stats.items()
                              if key != "rows"}
                    totals["rows"] = [0.0] * len(self.layers)
                for key, value in stats.items():
                    for i, t in enumerate(value):
                        if key == "rows":
                            totals["rows"][i] += t
                        elif key in ("A",):
                            totals[key][i] += t
                        else:  # curvature statistics: weighted like the batch's share of the loss
                            totals[key][i] += weight * t
                weight_sum += weight
                batches += 1
        if self._shards is not None:
            totals, weight_sum, batches = self._all_reduce(totals, weight_sum, batches)
        self._check_totals(weight_sum, batches, "")
        scale = 1.0 / weight_sum if self.reduction == "mean" else 1.0
        for key, value in totals.items():
            if key not in ("A", "rows"):
                totals[key] = [t * scale for t in value]
        if "A" in totals:
            totals["A"] = [a / max(rows, 1.0) for a, rows in zip(totals["A"], totals["rows"])]
        return totals

    def _all_reduce(self, totals: dict[str, Any] | None, weight_sum: float, batches: int
                    ) -> tuple[dict[str, Any], float, int]:
        """One all-reduce of every statistic, the row counts, the weight sum and the batch count."""
        template = self._empty_statistics() if totals is None else totals
        tensors = [t for key in sorted(template) if key != "rows" for t in template[key]]
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor(
            [*template["rows"], weight_sum, batches], dtype=self._factor_dtype, device=self.device)])
        if totals is None:
            flat.zero_()
        dist.all_reduce(flat, group=self.process_group)
        out: dict[str, Any] = {}
        start = 0
        for key in sorted(template):
            if key == "rows":
                continue
            out[key] = []
            for t in template[key]:
                out[key].append(flat[start:start + t.numel()].view_as(t))
                start += t.numel()
        tail = flat[start:].tolist()
        out["rows"] = tail[:len(self.layers)]
        return out, tail[-2], int(tail[-1])

    def _empty_statistics(self) -> dict[str, Any]:
        """Zero statistics of the right shapes, for a rank with an empty shard."""
        raise ValueError("a rank of the process group has no data; K-FAC needs a non-empty shard on every rank.")

    # -- one batch ---------------------------------------------------------------------------------------------
    def _prepare(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int) -> Any:
        records = self._recording
        calls = self._calls(records)
        records.clear()
        rows_in = [torch.cat([layer.input_rows(x) for x, _ in c], dim=1) for layer, c in zip(self.layers, calls)]
        stats: dict[str, list[Any]] = {"A": [], "rows": []}
        for layer, a in zip(self.layers, rows_in):
            A, rows = self._input_statistics(layer, a)
            stats["A"].append(A)
            stats["rows"].append(rows)
        stats.update(self._gradient_statistics(leaves, outputs, targets, index, rows_in, calls))
        return stats

    def _calls(self, records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
               ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        missing = [layer.name for i, layer in enumerate(self.layers) if i not in records]
        if missing:
            raise ValueError(
                f"module(s) {missing[:5]} were not called during the forward pass (their parameters are used "
                "another way, e.g. nn.MultiheadAttention's out_proj, or not at all), so K-FAC cannot factor their "
                "parameters; exclude them with params=."
            )
        return [records[i] for i in range(len(self.layers))]

    def _input_statistics(self, layer: Layer, a: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The batch's summed input outer products and its row count."""
        if layer.kind == "embedding":
            tokens = a.reshape(-1)
            counts = torch.bincount(tokens, minlength=layer.module.num_embeddings).to(self._factor_dtype)
            if layer.module.padding_idx is not None:
                counts[layer.module.padding_idx] = 0  # its gradient is zero
            return counts.unsqueeze(0), float(tokens.numel())
        a = a.to(self._factor_dtype)
        if self.kfac_approx == "expand":
            return torch.einsum("nrgi,nrgj->gij", a, a), float(a.shape[0] * a.shape[1])
        mean = a.mean(1)
        return torch.einsum("ngi,ngj->gij", mean, mean), float(a.shape[0])

    def _columns(self, outputs: torch.Tensor, targets: Any, index: int
                 ) -> tuple[torch.Tensor, Iterator[torch.Tensor], float]:
        """The differentiated output ``z``, the columns backpropagated from it, and their weight."""
        loss = self._loss_object
        if self.fisher_type == "empirical":
            z = loss.per_sample_losses(outputs, targets, self.reduction)
            scale = 1.0 / z.shape[0] if self.reduction == "mean" else 1.0
            return z, iter([torch.ones_like(z)]), scale
        detached = outputs.detach()
        if self.fisher_type == "mc":
            rank = self._shards.rank if self._shards is not None else 0
            generator = torch.Generator(device=self.device).manual_seed(self._seed + (rank << 32) + index)
            g = loss.sampled_output_gradients(detached, targets, self.mc_samples, generator)
            count = loss.mean_count(targets, None, detached) if self.reduction == "mean" else 1.0
            scale = 1.0 / (self.mc_samples * count) if count else 0.0
            return outputs, iter(g), scale
        S = loss.output_hessian_sqrt(detached, targets, self.reduction)
        return outputs, _unit_columns(S, loss.unit_dims), 1.0

    def _gradient_statistics(self, leaves: list[torch.Tensor], outputs: torch.Tensor, targets: Any, index: int,
                             rows_in: list[torch.Tensor], calls: list[list[tuple[torch.Tensor, torch.Tensor]]]
                             ) -> dict[str, list[torch.Tensor]]:
        z, columns, scale = self._columns(outputs, targets, index)
        require_graph(z, "the model's outputs")
        layer_outputs = [s for c in calls for _, s in c]
        G: list[Any] = [0.0] * len(self.layers)
        extra = self._extra_statistics(rows_in)
        check = self._check_first
        column = next(columns, None)
        while column is not None:
            following = next(columns, None)
            targets_of_grad = layer_outputs + (leaves if check else [])
            grads = torch.autograd.grad(z, targets_of_grad, column, retain_graph=following is not None,
                                        allow_unused=True)
            start = 0
            g_rows = []
            for layer, c in zip(self.layers, calls):
                parts = [torch.zeros_like(s) if gr is None else gr
                         for gr, (_, s) in zip(grads[start:start + len(c)], c)]
                start += len(c)
                g_rows.append(torch.cat([layer.output_rows(p) for p in parts], dim=1).to(self._factor_dtype))
            if check:
                self._check_reconstruction(rows_in, g_rows, grads[len(layer_outputs):])
                check = self._check_first = False
            for i, g in enumerate(g_rows):
                G[i] = G[i] + scale * self._gradient_outer(g)
            self._accumulate_extra(extra, rows_in, g_rows, scale)
            column = following
        return {"G": G, **extra}

    def _gradient_outer(self, g: torch.Tensor) -> torch.Tensor:
        if self.kfac_approx == "expand":
            return torch.einsum("nrgi,nrgj->gij", g, g)
        total = g.sum(1)
        return torch.einsum("ngi,ngj->gij", total, total)

    def _extra_statistics(self, rows_in: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Further per-batch statistics of a subclass (EK-FAC's corrections): none here."""
        return {}

    def _accumulate_extra(self, extra: dict[str, list[torch.Tensor]], rows_in: list[torch.Tensor],
                          g_rows: list[torch.Tensor], scale: float) -> None:
        """Add one column's contribution to :meth:`_extra_statistics`."""

    def _check_reconstruction(self, rows_in: list[torch.Tensor], g_rows: list[torch.Tensor],
                              leaf_grads: tuple[torch.Tensor | None, ...]) -> None:
        """Refuse a parameter whose gradient is not the sum over its module's rows (used outside the module)."""
        for layer, a, g in zip(self.layers, rows_in, g_rows):
            rebuilt = summed_gradient(layer, a, g.to(a.dtype) if a.is_floating_point() else g)
            actual = {i: (torch.zeros_like(self._params[i]) if leaf_grads[i] is None else leaf_grads[i]).unsqueeze(0)
                      for i in layer.indices}
            expected = layer.to_matrix(actual)[0].to(rebuilt.dtype)
            scale = max(float(expected.abs().max()), float(rebuilt.abs().max()))
            tol = 1e-8 if self.dtype == torch.float64 else 1e-2
            if scale > 0 and float((expected - rebuilt).abs().max()) > tol * scale:
                names = [self.param_names[i] for i in layer.indices]
                raise ValueError(
                    f"the gradient of {names} is not the one module {layer.name!r} computes from its inputs and "
                    "outputs: the parameter is also used outside the module's forward (weight tying, or a functional "
                    "call such as F.linear(h, module.weight)), and K-FAC would miss those uses. Exclude it with "
                    "params=, or use an exact operator."
                )

    def _make_blocks(self, stats: dict[str, Any]) -> list[KroneckerBlock]:
        blocks = []
        for layer, A, G in zip(self.layers, stats["A"], stats["G"]):
            blocks.append(kfac_block(layer, A, G))
        return blocks

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
            A symmetric positive definite operator (a :class:`~curvature.operators.kronecker.kfac.KFACInverse`).

        Raises:
            ValueError: On a negative damping, or a singular damped operator (pass a positive ``damping``).
        """
        damping = check_scalar(damping, "damping")
        if damping < 0:
            raise ValueError(f"damping must be non-negative, got {damping}.")
        if not isinstance(heuristic_damping, bool):
            raise TypeError(f"heuristic_damping must be True or False, got {heuristic_damping!r}.")
        blocks = self._blocks_now()
        for layer, block in zip(self.layers, blocks):
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
        for layer, block in zip(self.layers, self._blocks_now()):
            _, qr, _, qc = block.eigen()
            out.append(BlockEigen(layer.name, tuple(self.param_names[i] for i in layer.indices),
                                  block.eigenvalues(), qr, qc))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The factors, by layer name (and the options they were computed with)."""
        return {
            "fisher_type": self.fisher_type, "kfac_approx": self.kfac_approx,
            "blocks": {layer.name: block.state() for layer, block in zip(self.layers, self._blocks_now())},
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
        names = [layer.name for layer in self.layers]
        if list(state["blocks"]) != names:
            raise ValueError(f"the state holds the layers {list(state['blocks'])}, this operator has {names}.")
        blocks = []
        for layer in self.layers:
            saved = {k: v.to(self.device, self._factor_dtype) for k, v in state["blocks"][layer.name].items()}
            blocks.append(self._block_from_state(layer, saved))
        self._sync_with_model()
        self._blocks, self._factors_key = blocks, self._fingerprint()

    def _block_from_state(self, layer: Layer, saved: dict[str, torch.Tensor]) -> KroneckerBlock:
        return KroneckerBlock(saved["row"], saved["col"], saved.get("scaling"), heuristic=layer.kind != "norm")


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
    for layer, block in zip(op.layers, blocks):
        X = layer.to_matrix({i: pieces[i] for i in layer.indices}).to(op._factor_dtype)
        Y = apply(block, X).to(V.dtype)
        for i, t in layer.from_matrix(Y, shapes).items():
            out[i] = t
    return torch.cat([t.reshape(k, -1) for t in out], dim=1).T.contiguous()


def _unit_columns(S: torch.Tensor, unit_dims: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """The columns of a unit-wise square root ``S`` (``(k, *z.shape)``), one per unit position and column.

    ``S``'s column ``j`` holds the roots of every unit at once; backpropagating it whole would add cross terms
    between the units of a sample, so each unit position gets its own columns.
    """
    z_shape = S.shape[1:]
    positions = [d for d in range(1, len(z_shape)) if d not in unit_dims]
    if not positions:
        yield from S
        return
    for index in itertools.product(*(range(z_shape[d]) for d in positions)):
        mask = torch.zeros(z_shape[1:], dtype=S.dtype, device=S.device)
        where = [slice(None)] * (len(z_shape) - 1)
        for d, i in zip(positions, index):
            where[d - 1] = i
        mask[tuple(where)] = 1
        for column in S:
            yield column * mask


def summed_gradient(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The layer's gradient rebuilt from its rows, ``sum_n sum_r g_r a_r^T``, as a ``(groups, rows, cols)`` matrix."""
    if layer.kind == "embedding":
        out = g.new_zeros(layer.module.num_embeddings, g.shape[-1])
        out.index_add_(0, a.reshape(-1), g.reshape(-1, g.shape[-1]))
        if layer.module.padding_idx is not None:
            out[layer.module.padding_idx] = 0
        return out.unsqueeze(0)
    return per_sample_gradients(layer, a, g).sum(0)


def per_sample_gradients(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient of a Kronecker or norm layer as ``(N, groups, rows, cols)``: ``sum_r g_r a_r^T``."""
    if layer.kind == "norm":
        copies = a.shape[-1] // g.shape[-1]
        return (a * g.repeat(1, 1, 1, copies)).sum(1).unsqueeze(2)
    return torch.einsum("nrgi,nrgj->ngij", g, a)


def kfac_block(layer: Layer, A: torch.Tensor, G: torch.Tensor) -> KroneckerBlock:
    """The K-FAC block of a layer from its input statistic ``A`` and gradient statistic ``G``."""
    if layer.kind == "embedding":
        return KroneckerBlock(A, G)
    if layer.kind == "norm":
        copies = A.shape[-1] // G.shape[-1]
        M = A * G.repeat(1, copies, copies)
        return KroneckerBlock(torch.ones(1, 1, 1, dtype=M.dtype, device=M.device), M, heuristic=False)
    return KroneckerBlock(G, A)
