r"""Second-order sensitivities for pruning: Hessian-aware pruning (HAP), Optimal Brain Damage and Surgeon, magnitude."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._checks import check_count, check_generator
from ..linalg import Operand
from ..linalg import diagonal as exact_diagonal
from ..linalg.diagonal import per_entry_estimate
from ..linalg.trace import probe_blocks
from ..operators import GGNOperator, HessianOperator
from ..sampling import resolve_generator
from .obs import OBS_METHODS, InverseBlock, inverse_blocks, obs_scores

__all__ = ["GRANULARITIES", "METHODS", "PRUNABLE", "Sensitivity", "prunable_layers", "sensitivity"]

METHODS = ("hap", "obd", "magnitude", *OBS_METHODS)
GRANULARITIES = ("weight", "channel", "layer")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True, eq=False)
class Sensitivity(Mapping[str, torch.Tensor]):
    """Scores per weight tensor name, with what they were computed from.

    A read-only mapping from ``"<module>.weight"`` to scores (the weight's shape for ``"weight"``, ``(out,)`` for
    ``"channel"``, a 0-d tensor for ``"layer"``), so it plugs into :func:`curvature.pruning.prune` and into any
    script that ranks tensors (``scores["conv1.weight"]``, ``scores.items()``, ``dict(scores)`` for a copy to
    edit).

    Attributes:
        scores: The scores, by weight tensor name (what the mapping reads).
        method: ``"hap"``, ``"obd"``, ``"magnitude"``, ``"obs_kfac"`` or ``"obs_ekfac"``.
        granularity: ``"weight"``, ``"channel"`` or ``"layer"``.
        traces: For HAP, the Hessian trace of every structure (same shapes as the scores); else empty.
        trace_std_error: For HAP, the standard error of each trace from the per-probe block sums (entries of one
            block share each probe, so their errors are correlated; zeros when exact); else empty.
        std_error: The standard error of each score (zeros when exact; empty for magnitude and OBS). For OBD
            channels and layers the per-entry errors are added in quadrature, which ignores their (positive)
            correlation and so runs low.
        num_matvecs: Hessian-vector products spent (0 for OBS: K-FAC's factors take passes over the data, no
            products).
        inverse_blocks: For OBS, each layer's damped K-FAC (EK-FAC) inverse by weight name, which
            :func:`curvature.pruning.prune` uses with ``compensate=True``; else empty.
    """

    scores: dict[str, torch.Tensor]
    method: str
    granularity: str
    traces: dict[str, torch.Tensor]
    trace_std_error: dict[str, torch.Tensor]
    std_error: dict[str, torch.Tensor]
    num_matvecs: int
    inverse_blocks: dict[str, InverseBlock] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


def prunable_layers(model: nn.Module, layers: Optional[Iterable[str]] = None) -> dict[str, nn.Module]:
    """The layers that can be pruned: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` with a trainable weight.

    Args:
        model: The model.
        layers: None for every prunable layer, or module names (``["features.0", "features.3"]``).

    Returns:
        Module name to module, in ``model.named_modules()`` order.

    Raises:
        ValueError: If a name is not a module of the model or not a prunable layer, two named layers share a
            weight with another layer, or nothing is prunable. With ``layers=None`` weights tied between layers
            are left out.
    """
    modules = dict(model.named_modules())
    uses: dict[int, int] = {}
    for m in modules.values():
        weight = getattr(m, "weight_orig", getattr(m, "weight", None))
        if isinstance(weight, torch.Tensor):
            uses[id(weight)] = uses.get(id(weight), 0) + 1
    if layers is None:  # weights tied between layers are left out: torch's prune cannot mask them consistently
        chosen = {n: m for n, m in modules.items()
                  if isinstance(m, PRUNABLE) and m.weight.requires_grad and uses[id(_weight(m))] == 1}
        if not chosen:
            raise ValueError(
                "the model has no prunable layer (nn.Linear or nn.Conv1d/2d/3d with a trainable weight)."
            )
        return chosen
    if isinstance(layers, str):
        raise TypeError("layers must be an iterable of module names, e.g. ['conv1', 'conv2'].")
    chosen = {}
    for name in layers:
        if name not in modules:
            raise ValueError(f"layers names {name!r}, which is not a module of the model.")
        if not isinstance(modules[name], PRUNABLE):
            raise ValueError(
                f"layers names {name!r}, a {type(modules[name]).__name__}; only nn.Linear and nn.Conv1d/2d/3d "
                "layers can be pruned here."
            )
        if not modules[name].weight.requires_grad:
            raise ValueError(f"layer {name!r} has a frozen weight; there is nothing to prune by sensitivity.")
        if uses[id(_weight(modules[name]))] > 1:
            raise ValueError(
                f"layer {name!r} shares its weight with another layer (weight tying); a tied weight cannot be "
                "pruned consistently by torch.nn.utils.prune, so leave it out of layers."
            )
        chosen[name] = modules[name]
    if not chosen:
        raise ValueError("layers is empty; pass None for every prunable layer.")
    return {n: m for n, m in modules.items() if n in chosen}


def _weight(module: nn.Module) -> torch.Tensor:
    """The module's weight parameter (``weight_orig`` once torch's prune masked it)."""
    return getattr(module, "weight_orig", module.weight)


def sensitivity(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    method: str = "hap",
    granularity: str = "channel",
    num_matvecs: Optional[int] = 100,
    generator: Optional[torch.Generator] = None,
    *,
    layers: Optional[Iterable[str]] = None,
    damping: Optional[float] = None,
    diagonal: str = "hessian",
    **operator_kwargs: Any,
) -> Sensitivity:
    r"""Score every weight, output channel or layer of the prunable layers by how much pruning it costs.

    For a structure :math:`S` (one weight; an output channel: its filter or matrix row and its bias; a layer:
    its weight and bias) with parameters :math:`w_S`:

    - ``"hap"`` (Yu, Yao, Gholami, Dong, Kim, Mahoney & Keutzer 2022, "Hessian-Aware Pruning and Optimal Neural
      Implant", WACV, arXiv:2101.08940): the relative Hessian trace times the squared norm,

      .. math:: s_S = \frac{\operatorname{tr}(H_{SS})}{|S|}\, \|w_S\|_2^2,

      the second-order loss change :math:`\tfrac12 w_S^\top H_{SS} w_S` (times 2) with the block
      :math:`H_{SS}` replaced by its average eigenvalue. The block traces come from one Hutchinson pass over
      the candidate layers' Hessian (:math:`\operatorname{tr}(H_{SS}) \approx \frac1m \sum_i \sum_{j \in S}
      v_{ij} (H v_i)_j`, the same probes for every block), with a standard error from the per-probe block sums.
    - ``"obd"`` (LeCun, Denker & Solla 1990, "Optimal Brain Damage", NeurIPS): the diagonal saliency summed over
      the structure, :math:`s_S = \sum_{j \in S} \tfrac12 H_{jj} w_j^2`, with the diagonal from the same pass.
    - ``"magnitude"``: the baseline, :math:`|w|` per weight, the L1 norm of a channel's filter (Li, Kadav,
      Durdanovic, Samet & Graf 2017, "Pruning Filters for Efficient ConvNets"; ``torch.nn.utils.prune``'s
      ``ln_structured`` with ``n=1``), the mean :math:`|w|` of a layer. No products. Filters of different
      layers differ in size, so a *global* ranking of L1 norms removes the small filters of early layers
      first; rank per layer (``prune(..., scope="layer")``) or divide by the filter size for a fairer
      global magnitude baseline (``examples/prune_cnn.py`` shows all three).
    - ``"obs_kfac"``, ``"obs_ekfac"``: Optimal Brain Surgeon (Hassibi & Stork 1993) with the damped
      Kronecker-factored curvature :math:`B = K + \gamma I` of the candidate layers
      (:class:`~curvature.KFACOperator`, :class:`~curvature.EKFACOperator`; block diagonal, so OBS is
      layer-wise), the loss increase once the remaining weights of the layer compensate:

      .. math:: s_S = \tfrac12\, w_S^\top \big([B^{-1}]_{SS}\big)^{-1} w_S, \qquad
          s_q = \frac{w_q^2}{2\,[B^{-1}]_{qq}} \text{ for one weight},

      read off K-FAC's eigendecomposition without forming an inverse (:mod:`curvature.pruning.obs`; Wang,
      Zhang, Wang & Grosse 2019, "EigenDamage", ICML; Singh & Alistarh 2020, "WoodFisher", NeurIPS; Frantar &
      Alistarh 2022, "Optimal Brain Compression", NeurIPS). The scores carry the inverse, so
      ``prune(..., compensate=True)`` applies the OBS update to the weights that remain.

    ``num_matvecs`` Hutchinson probes estimate the Hessian diagonal and block traces; ``num_matvecs=None``
    computes them exactly (``P`` products for the ``P`` parameters of the candidate layers, through
    :func:`curvature.diagonal` with ``method="exact"``; small models). The Hessian is that of the loss over
    ``data`` (a :class:`~curvature.HessianOperator` restricted to the candidate layers' weights and biases;
    ``operator_kwargs`` reach it), so the model is left exactly as it was. The OBS methods need no products
    and ignore ``num_matvecs``: K-FAC's statistics take one pass over ``data`` (with a backward pass per output
    column for ``fisher_type="ggn"``), EK-FAC's two; ``operator_kwargs`` reach the operator (``fisher_type=``,
    ``kfac_approx=``, ``mc_samples=``, ``reduction=``).

    Args:
        model: The model (in eval mode if it has dropout or batch norm).
        loss_fn: ``loss_fn(outputs, targets)``.
        data: One ``(inputs, targets)`` batch or an iterable of them.
        method: ``"hap"``, ``"obd"``, ``"magnitude"``, ``"obs_kfac"`` or ``"obs_ekfac"``.
        granularity: ``"weight"``, ``"channel"`` or ``"layer"``.
        num_matvecs: Hutchinson probes (at least 2), or None for the exact diagonal.
        generator: The source of the probes; None draws from a copy of torch's global generator without
            advancing it.
        layers: The candidate layers by module name; None for every ``nn.Linear`` and ``nn.Conv1d/2d/3d``. Leave
            the classifier out to keep it unpruned.
        diagonal: For ``"obd"`` and ``"hap"``: ``"hessian"`` (default) for the Hessian's diagonal and block traces
            (Hutchinson with ``num_matvecs`` probes, or exact with ``None``), or ``"exact"`` for the exact
            diagonal of the generalized Gauss-Newton matrix from its structure
            (:meth:`curvature.GGNOperator.diagonal`: one vectorized pullback per sample and output column, no
            products, no noise; ``num_matvecs`` is ignored). The latter is LeCun et al.'s own choice: OBD
            drops the second derivatives of the activations (their "Levenberg-Marquardt approximation"), which
            is the GGN's diagonal; it needs a loss with a closed-form output Hessian (MSE, cross-entropy, BCE).
        damping: For OBS only: :math:`\gamma \ge 0` added to every layer's block, or None (default) for
            :math:`\gamma_\ell = 0.01 \operatorname{tr}(K_\ell) / P_\ell`, 1% of each block's mean eigenvalue
            (:data:`curvature.pruning.obs.RELATIVE_DAMPING`).
        **operator_kwargs: Passed to :class:`~curvature.HessianOperator` (``reduction=``, ``keep_graph=``, ...), or
            for OBS to the K-FAC operator (``fisher_type=``, ``kfac_approx=``, ...).

    Returns:
        A :class:`Sensitivity`: a mapping from ``"<module>.weight"`` to scores, with ``traces``, ``std_error`` and
        ``num_matvecs``.

    Raises:
        TypeError: On a bad generator or ``layers``.
        ValueError: On an unknown method or granularity, ``num_matvecs`` below 2, no prunable layer, a
            ``damping`` with a method other than OBS or a negative one, a singular damped block, or (OBS) a layer
            K-FAC does not factor (``nn.Conv3d``).

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        >>> x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
        >>> scores = sensitivity(model, nn.CrossEntropyLoss(), (x, y), "hap", "channel", num_matvecs=None,
        ...                      layers=["0"])
        >>> list(scores), scores["0.weight"].shape
        (['0.weight'], torch.Size([6]))
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if num_matvecs is not None:
        check_count(num_matvecs, "num_matvecs", minimum=2)
    if diagonal not in ("hessian", "exact"):
        raise ValueError(f"diagonal must be 'hessian' or 'exact' (the GGN's exact diagonal), got {diagonal!r}.")
    if diagonal == "exact" and method not in ("obd", "hap"):
        raise ValueError(f"diagonal='exact' applies to method='obd' and 'hap' only, not to {method!r}.")
    if damping is not None and method not in OBS_METHODS:
        raise ValueError(f"damping applies to the OBS methods {tuple(OBS_METHODS)} only, not to {method!r}.")
    check_generator(generator)
    chosen = prunable_layers(model, layers)
    if method in OBS_METHODS:
        blocks = inverse_blocks(model, loss_fn, data, method, chosen, damping, resolve_generator(generator),
                                operator_kwargs)
        scores = {}
        for name, module in chosen.items():
            block = blocks[f"{name}.weight"]
            bias = module.bias.detach() if block.bias else None  # the effective (masked) tensors
            scores[f"{name}.weight"] = obs_scores(block, module.weight.detach(), bias, granularity)
        return Sensitivity(scores, method, granularity, {}, {}, {}, 0, blocks)
    if method == "magnitude":
        scores = {f"{n}.weight": _magnitude(m, granularity) for n, m in chosen.items()}
        return Sensitivity(scores, method, granularity, {}, {}, {}, 0)

    # The candidate tensors: each layer's weight and bias (``weight_orig`` once torch's prune masked it).
    named = dict(model.named_parameters())
    owner_of = {}
    for name, module in chosen.items():
        for kind in ("weight", "bias"):
            key = f"{name}.{kind}_orig" if hasattr(module, f"{kind}_orig") else f"{name}.{kind}"
            if key in named and named[key].requires_grad:
                owner_of[key] = (name, kind)
    H = (GGNOperator if diagonal == "exact" else HessianOperator)(model, loss_fn, data, params=list(owner_of),
                                                                   **operator_kwargs)
    if diagonal == "exact" and not H.has_exact_diagonal:
        raise ValueError(f"diagonal='exact' needs a loss with a closed-form output Hessian (MSE, cross-entropy, "
                         f"BCE with logits), got {type(loss_fn).__name__}; use diagonal='hessian'.")
    # The operator lays out its vectors in model.parameters() order; locate every layer's weight and bias there.
    offsets, start = {}, 0
    for key in H.param_names:
        layer, kind = owner_of[key]
        value = getattr(chosen[layer], kind).detach()  # the effective (masked) tensor
        offsets[(layer, kind)] = (start, value)
        start += value.numel()
    segments = _segments(offsets, chosen, granularity)
    if num_matvecs is None or diagonal == "exact":
        diag = H.diagonal() if diagonal == "exact" else exact_diagonal(H, method="exact").value
        block = torch.stack([diag[idx].sum() for _, idx in segments]) if segments else diag.new_zeros(0)
        diag_se, block_se = torch.zeros_like(diag), torch.zeros_like(block)
    else:
        diag, diag_se, block, block_se = _hutchinson(H, segments, num_matvecs, resolve_generator(generator))
    flat_w = torch.zeros(H.shape[0], dtype=H.dtype, device=H.device)
    for (begin, value) in offsets.values():
        flat_w[begin:begin + value.numel()] = value.reshape(-1)
    return _assemble(method, granularity, chosen, offsets, segments, flat_w, diag, diag_se, block, block_se,
                     H.num_matvecs)


def _magnitude(module: nn.Module, granularity: str) -> torch.Tensor:
    w = module.weight.detach()
    if granularity == "weight":
        return w.abs().clone()
    if granularity == "channel":
        return w.abs().reshape(w.shape[0], -1).sum(1)
    return w.abs().mean()


def _segments(offsets: dict, chosen: dict[str, nn.Module], granularity: str) -> list[tuple[tuple[str, int], Any]]:
    """The flat indices of every structure, ``((layer, channel or -1), indices)``; none for ``"weight"``."""
    if granularity == "weight":
        return []
    segments = []
    for layer in chosen:
        w_start, weight = offsets[(layer, "weight")]
        bias = offsets.get((layer, "bias"))
        if granularity == "layer":
            idx = torch.arange(w_start, w_start + weight.numel())
            if bias is not None:
                idx = torch.cat([idx, torch.arange(bias[0], bias[0] + bias[1].numel())])
            segments.append(((layer, -1), idx))
            continue
        per_channel = weight.numel() // weight.shape[0]
        for c in range(weight.shape[0]):
            idx = torch.arange(w_start + c * per_channel, w_start + (c + 1) * per_channel)
            if bias is not None:
                idx = torch.cat([idx, torch.tensor([bias[0] + c])])
            segments.append(((layer, c), idx))
    return segments


def _hutchinson(H: HessianOperator, segments: list, num_matvecs: int,
                generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Diagonal and block traces from the same Rademacher probes, with standard errors from per-probe values.

    The probe blocks and the per-entry mean and standard error are :func:`curvature.diagonal`'s own
    (:func:`~curvature.linalg.trace.probe_blocks`, :func:`~curvature.linalg.diagonal.per_entry_estimate`); the
    block sums are added to the same pass.
    """
    operand = Operand(H, deferred=True)  # finiteness read once, at the end (no host read per product)
    sums = torch.zeros(operand.size, dtype=torch.float64, device=H.device)
    squares = torch.zeros_like(sums)
    index = torch.cat([idx for _, idx in segments]).to(H.device) if segments else None
    owner = (torch.cat([torch.full((len(idx),), i, dtype=torch.long) for i, (_, idx) in enumerate(segments)])
             .to(H.device) if segments else None)
    block_sums = torch.zeros(len(segments), dtype=torch.float64, device=H.device)
    block_squares = torch.zeros_like(block_sums)
    for V in probe_blocks(operand, num_matvecs, "rademacher", generator):
        terms = (V * (operand @ V)).double()  # column i: v_i ⊙ H v_i, an unbiased estimate of diag(H)
        sums += terms.sum(1)
        squares += terms.pow(2).sum(1)
        if segments:
            blocks = torch.zeros(len(segments), terms.shape[1], dtype=torch.float64, device=H.device)
            blocks.index_add_(0, owner, terms[index])  # per-probe block sums: correlated entries kept together
            block_sums += blocks.sum(1)
            block_squares += blocks.pow(2).sum(1)
    diag = per_entry_estimate(sums, squares, num_matvecs, operand)
    block = per_entry_estimate(block_sums, block_squares, num_matvecs, operand)
    return diag.value, diag.std_error, block.value, block.std_error


def _assemble(method: str, granularity: str, chosen: dict[str, nn.Module], offsets: dict, segments: list,
              flat_w: torch.Tensor, diag: torch.Tensor, diag_se: torch.Tensor, block: torch.Tensor,
              block_se: torch.Tensor, num_matvecs: int) -> Sensitivity:
    scores, traces, trace_errors, errors = {}, {}, {}, {}
    if granularity == "weight":  # HAP of a single weight is H_jj w_j², twice OBD's saliency
        factor = 1.0 if method == "hap" else 0.5
        for layer in chosen:
            begin, w = offsets[(layer, "weight")]
            end = begin + w.numel()
            d, se = diag[begin:end].reshape(w.shape), diag_se[begin:end].reshape(w.shape)
            scores[f"{layer}.weight"] = factor * d * w.pow(2)
            errors[f"{layer}.weight"] = factor * se * w.pow(2)
            if method == "hap":
                traces[f"{layer}.weight"], trace_errors[f"{layer}.weight"] = d.clone(), se.clone()
        return Sensitivity(scores, method, granularity, traces, trace_errors, errors, num_matvecs)
    w2 = flat_w.pow(2)
    per_layer: dict[str, list[int]] = {}
    for i, ((layer, _), _) in enumerate(segments):
        per_layer.setdefault(layer, []).append(i)
    for layer, rows in per_layer.items():
        if method == "hap":
            sizes = torch.tensor([len(segments[i][1]) for i in rows], dtype=flat_w.dtype, device=flat_w.device)
            norms = torch.stack([w2[segments[i][1].to(w2.device)].sum() for i in rows])
            value, error = block[rows] / sizes * norms, block_se[rows] / sizes * norms
            traces[f"{layer}.weight"], trace_errors[f"{layer}.weight"] = block[rows].clone(), block_se[rows].clone()
        else:
            saliency = 0.5 * diag * w2
            saliency_se = 0.5 * diag_se * w2  # per-entry errors summed in quadrature (a lower bound, see docs)
            value = torch.stack([saliency[segments[i][1].to(w2.device)].sum() for i in rows])
            error = torch.stack([saliency_se[segments[i][1].to(w2.device)].pow(2).sum().sqrt() for i in rows])
        if granularity == "layer":
            value, error = value[0], error[0]
            if method == "hap":
                name = f"{layer}.weight"
                traces[name], trace_errors[name] = traces[name][0], trace_errors[name][0]
        scores[f"{layer}.weight"], errors[f"{layer}.weight"] = value, error
    return Sensitivity(scores, method, granularity, traces, trace_errors, errors, num_matvecs)
