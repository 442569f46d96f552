"""Apply pruning scores as ``torch.nn.utils.prune`` masks, so existing pruning scripts keep working."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._checks import check_scalar
from .obs import obs_update
from .sensitivity import PRUNABLE

__all__ = ["SCOPES", "prune"]

SCOPES = ("global", "layer")


def prune(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    amount: float,
    scope: str = "global",
    structured: Optional[bool] = None,
    *,
    allow_empty_layers: bool = False,
    compensate: bool = False,
) -> dict[str, torch.Tensor]:
    r"""Mask the lowest-scoring weights, output channels or layers through ``torch.nn.utils.prune``.

    The granularity follows the scores' shapes (as :func:`~curvature.pruning.sensitivity` returns them): a
    score per weight (the weight's shape) prunes single weights; one per output channel (``(out,)``) prunes
    whole channels, a conv filter or a linear layer's row together with its bias entry, so the channel's
    output is exactly zero; a 0-d score per layer prunes whole layers. Only the layers named in ``scores`` are
    candidates: leave the classifier out of ``scores`` and it stays whole.

    ``scope="global"`` ranks all candidates of all layers together and masks the ``round(amount · N)`` lowest of
    the ``N`` still live (ties broken by order, deterministically); ``"layer"`` masks that fraction of each
    layer's live units. Units an earlier mask removed stay removed and are not ranked again, so ``amount`` is a
    fraction of what remains, as in ``torch.nn.utils.prune``'s iterative pruning. Unless
    ``allow_empty_layers=True``, a global ranking never masks the last weight or channel of a layer (the
    next-lowest candidate elsewhere is taken instead), so a layer is pruned away only when asked for, by
    layer scores. Masks go through ``prune.custom_from_mask``: they combine with masks already there, survive
    ``state_dict`` round-trips, keep pruned weights at zero in the forward pass whatever the optimizer does to
    ``weight_orig`` (their gradient is zero), and ``prune.remove(module, "weight")`` makes them permanent.

    With ``compensate=True`` (scores of an OBS method, :func:`~curvature.pruning.sensitivity` with
    ``method="obs_kfac"`` or ``"obs_ekfac"``), the weights that remain in each pruned layer take the Optimal Brain
    Surgeon update :math:`\delta = -B^{-1} E_Q ([B^{-1}]_{QQ})^{-1} w_Q` for the set :math:`Q` of the layer's
    masked weights, all removed together, with the damped K-FAC inverse the scores carry
    (:func:`curvature.pruning.obs.obs_update`): the change that keeps the quadratic model of the loss lowest. It
    is added to ``weight_orig`` (and the bias) at the entries kept; entries masked before stay masked. Pruning
    whole layers changes no other layer (the curvature is block diagonal).

    Args:
        model: The model whose layers the scores name (``"<module>.weight"``).
        scores: Name to scores, from :func:`~curvature.pruning.sensitivity` or any other source.
        amount: The fraction in ``[0, 1)`` of candidates to mask.
        scope: ``"global"`` or ``"layer"``.
        structured: None to follow the scores' shapes; True or False to insist on channel or weight scores.
        allow_empty_layers: Let a global ranking mask every weight or channel of a layer.
        compensate: Move the remaining weights by the OBS update (OBS scores only).

    Returns:
        The masks now in place (combined with earlier ones), name to a 0/1 tensor of the weight's shape.

    Raises:
        TypeError: If ``scores`` is not a dict (a mapping) of tensors.
        ValueError: If ``amount`` is outside ``[0, 1)``, ``scope`` is unknown, ``scores`` is empty or names
            something that is not the weight of a ``nn.Linear``/``nn.Conv`` layer of the model or a weight tied
            to another layer, a score has the wrong shape, the scores mix granularities, ``structured``
            contradicts them, they are not finite, per-layer scores come with ``scope="layer"``, or
            ``compensate=True`` comes with scores that are not an OBS method's.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> masks = prune(model, {"0.weight": torch.arange(6.0)}, amount=0.5)  # channels 0, 1, 2 go
        >>> masks["0.weight"].sum(1).tolist(), model[0].bias.abs().tolist()[:3]
        ([0.0, 0.0, 0.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0])
    """
    amount = _checked_options(amount, scope, scores)
    layers, kinds = {}, set()
    modules = dict(model.named_modules())
    for name, score in scores.items():
        module, vector, unit = _candidate(name, score, modules)
        layers[name] = (module, vector)
        kinds.add(unit)
    kind = _granularity(kinds, scope, structured)
    blocks = _compensation_blocks(scores, compensate)
    keep = _select(layers, amount, scope, kind, allow_empty_layers)
    before = {} if blocks is None else {name: _effective(module) for name, (module, _) in layers.items()}
    masks = _apply_masks(layers, keep, kind)
    for name, (weight, bias) in before.items():
        _compensate(layers[name][0], blocks[name], weight, bias)
    return masks


def _compensation_blocks(scores: Mapping[str, torch.Tensor], compensate: bool) -> Optional[dict[str, Any]]:
    """The OBS inverse of every scored layer when ``compensate``, else None.

    Raises:
        TypeError: If ``compensate`` is not a bool.
        ValueError: If ``compensate`` and the scores carry no inverse for every layer (not an OBS method's).
    """
    if not isinstance(compensate, bool):
        raise TypeError(f"compensate must be True or False, got {compensate!r}.")
    if not compensate:
        return None
    blocks = getattr(scores, "inverse_blocks", None) or {}
    missing = [name for name in scores if name not in blocks]
    if missing:
        raise ValueError(
            f"compensate=True needs the scores of sensitivity(method='obs_kfac' or 'obs_ekfac'), which carry each "
            f"layer's inverse curvature; {missing[:3]} have none (method "
            f"{getattr(scores, 'method', 'unknown')!r})."
        )
    return dict(blocks)


def _effective(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Copies of the layer's effective weight and bias (masked by any earlier mask)."""
    bias = getattr(module, "bias", None)
    return module.weight.detach().clone(), None if bias is None else bias.detach().clone()


@torch.no_grad()
def _compensate(module: nn.Module, block: Any, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Add the OBS update of the layer's masked weights to the entries that remain."""
    weight_mask = module.weight_mask
    bias_mask = getattr(module, "bias_mask", None)
    dw, db = obs_update(block, weight, bias if block.bias else None, weight_mask, bias_mask)
    module.weight_orig.add_(dw * weight_mask)
    if db is not None:
        target = getattr(module, "bias_orig", module.bias)
        target.add_(db if bias_mask is None else db * bias_mask)
    with torch.enable_grad():  # the masked tensors as torch's prune makes them before each forward pass
        for kind in ("weight", "bias"):
            if hasattr(module, f"{kind}_mask"):
                setattr(module, kind, getattr(module, f"{kind}_orig") * getattr(module, f"{kind}_mask"))


def _checked_options(amount: float, scope: str, scores: Any) -> float:
    """Check ``amount``, ``scope`` and the type of ``scores`` (in this order); return ``amount`` as a float.

    Raises:
        TypeError: If ``scores`` is not a mapping of tensors.
        ValueError: If ``amount`` is outside ``[0, 1)``, ``scope`` is unknown or ``scores`` is empty.
    """
    amount = check_scalar(amount, "amount")
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1) (the fraction to prune), got {amount}.")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}.")
    if not isinstance(scores, Mapping) or not all(isinstance(v, torch.Tensor) for v in scores.values()):
        raise TypeError("scores must be a dict from '<module>.weight' to a tensor of scores.")
    if not scores:
        raise ValueError("scores is empty: no layer is a candidate for pruning.")
    return amount


def _candidate(name: str, score: torch.Tensor, modules: dict[str, nn.Module]) -> tuple[nn.Module, torch.Tensor, str]:
    """The layer ``name`` scores, its scores as a float64 CPU vector, and their granularity.

    Raises:
        ValueError: If ``name`` is not the weight of a prunable layer, the score's shape fits no granularity, it
            is not finite, or the weight is tied to another layer's.
    """
    module_name, _, attr = name.rpartition(".")
    module = modules.get(module_name)
    if attr != "weight" or not isinstance(module, PRUNABLE):
        raise ValueError(
            f"scores names {name!r}, which is not the weight of an nn.Linear or nn.Conv1d/2d/3d layer of the "
            "model; prune scores the weights of such layers."
        )
    weight = module.weight
    if score.shape == weight.shape:
        kind = "weight"
    elif score.shape == weight.shape[:1]:
        kind = "channel"
    elif score.dim() == 0:
        kind = "layer"
    else:
        raise ValueError(
            f"scores[{name!r}] has shape {tuple(score.shape)}; use the weight's shape {tuple(weight.shape)} "
            f"(weights), ({weight.shape[0]},) (output channels) or () (the layer)."
        )
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"scores[{name!r}] holds NaN or Inf.")
    own = getattr(module, "weight_orig", module.weight)
    if any(other is not module and getattr(other, "weight_orig", getattr(other, "weight", None)) is own
           for other in modules.values()):
        raise ValueError(
            f"{name!r} is tied to another layer's weight; torch.nn.utils.prune cannot mask a tied weight in "
            "both places, so leave it out of the scores."
        )
    return module, score.detach().to("cpu", torch.float64).reshape(-1), kind


def _granularity(kinds: set[str], scope: str, structured: Optional[bool]) -> str:
    """The one granularity of all the scores, checked against ``scope`` and ``structured``.

    Raises:
        ValueError: If the scores mix granularities, per-layer scores come with ``scope="layer"``, or
            ``structured`` contradicts the scores.
    """
    if len(kinds) > 1:
        raise ValueError(f"the scores mix granularities {sorted(kinds)}; score every layer the same way.")
    kind = kinds.pop()
    if kind == "layer" and scope == "layer":
        raise ValueError("per-layer scores rank layers against each other: use scope='global' with them.")
    if structured is not None and structured != (kind == "channel"):
        raise ValueError(
            f"structured={structured} but the scores are per {kind}; pass channel scores (shape (out,)) for "
            "structured pruning and weight-shaped scores for unstructured pruning."
        )
    return kind


def _apply_masks(layers: dict[str, Any], keep: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Mask every layer's pruned units through ``prune.custom_from_mask`` (a channel's bias entry with it).

    Returns:
        The masks now in place (combined with earlier ones), name to a 0/1 tensor of the weight's shape.
    """
    masks = {}
    for name, (module, _) in layers.items():
        weight = module.weight
        unit = keep[name]
        if kind == "weight":
            mask = unit.reshape(weight.shape)
        else:  # a channel (or the whole layer) and its bias go together
            per_unit = unit if kind == "channel" else unit.expand(weight.shape[0])
            mask = per_unit.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight)
            if getattr(module, "bias", None) is not None:
                torch_prune.custom_from_mask(module, "bias", per_unit.to(weight.device, weight.dtype))
        mask = mask.to(weight.device, weight.dtype).contiguous()
        torch_prune.custom_from_mask(module, "weight", mask)
        masks[name] = module.weight_mask.detach().clone()  # combined with any earlier mask
    return masks


def _live(module: nn.Module, kind: str) -> torch.Tensor:
    """Which units are not masked yet (1.0) by an earlier ``torch.nn.utils.prune`` mask, as a float64 CPU vector."""
    mask = getattr(module, "weight_mask", None)
    weight = module.weight
    if mask is None:
        count = {"weight": weight.numel(), "channel": weight.shape[0], "layer": 1}[kind]
        return torch.ones(count, dtype=torch.float64)
    mask = mask.detach().to("cpu", torch.float64)
    if kind == "weight":
        return mask.reshape(-1)
    if kind == "channel":
        return (mask.reshape(mask.shape[0], -1).sum(1) > 0).double()
    return (mask.sum() > 0).double().reshape(1)


def _select(layers: dict[str, Any], amount: float, scope: str, kind: str,
            allow_empty: bool) -> dict[str, torch.Tensor]:
    """Which units to keep (1.0) and mask (0.0), per layer, as float64 CPU vectors.

    Units an earlier mask removed stay removed and are not ranked again; ``amount`` is a fraction of the units
    still live, as in ``torch.nn.utils.prune``'s iterative pruning.
    """
    keep = {name: _live(module, kind) for name, (module, _) in layers.items()}
    if amount == 0:
        return keep
    if scope == "layer":
        for name, (_, score) in layers.items():
            live = torch.nonzero(keep[name]).flatten()
            count = int(round(amount * live.numel()))
            if count >= live.numel() and not allow_empty:
                count = live.numel() - 1
            keep[name][live[torch.argsort(score[live], stable=True)[:count]]] = 0.0
        return keep
    names = list(layers)
    candidates = [(float(layers[n][1][j]), i, int(j)) for i, n in enumerate(names)
                  for j in torch.nonzero(keep[n]).flatten().tolist()]
    count = int(round(amount * len(candidates)))
    remaining = {n: int(keep[n].sum()) for n in names}
    masked = 0
    for _, i, j in sorted(candidates, key=lambda c: c[0]):  # stable: ties keep layer and index order
        if masked == count:
            break
        name = names[i]
        if kind != "layer" and not allow_empty and remaining[name] == 1:
            continue  # the last unit of a layer: the layer would be pruned away
        keep[name][j] = 0.0
        remaining[name] -= 1
        masked += 1
    return keep
