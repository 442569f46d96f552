"""Hessian-aware pruning: second-order sensitivities and ``torch.nn.utils.prune`` masks.

``sensitivity`` scores weights, output channels or layers (HAP, Optimal Brain Damage, Optimal Brain Surgeon with
K-FAC, magnitude); ``prune`` turns any such scores into ``torch.nn.utils.prune`` masks, so existing pruning scripts
keep working, and with OBS scores moves the remaining weights by the OBS update (:mod:`curvature.pruning.obs`).
"""

from .apply import prune
from .sensitivity import Sensitivity, prunable_layers, sensitivity

__all__ = ["Sensitivity", "prunable_layers", "prune", "sensitivity"]
