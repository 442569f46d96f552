r"""``torch.nn.MSELoss``: the Gaussian likelihood :math:`\mathcal N(z, \tfrac12 I)`, output Hessian :math:`2cI`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Loss, OutputMatrix, Reduction, require_tensor_targets

__all__ = ["MSE"]


class MSE(Loss):
    r"""Mean squared error :math:`\ell = \|z - y\|^2` per entry, summed or averaged over every output entry.

    Its output Hessian is :math:`2c\,I` (:math:`c = 1/\text{entries}` for a mean), and it is the negative
    log-likelihood of :math:`\mathcal N(z, \tfrac12 I)` up to a constant, so its Fisher equals its GGN
    (Martens 2020, arXiv:1412.1193, Sec. 9).
    """

    kind = "mse"
    modules = (nn.MSELoss,)

    def check_targets(self, outputs: torch.Tensor, targets: Any) -> None:
        """Targets of the outputs' shape (``MSELoss`` would broadcast others silently) and dtype.

        Raises:
            ValueError: On a shape mismatch.
            TypeError: On targets that are not a tensor of the outputs' dtype.
        """
        require_tensor_targets(self.loss_fn, targets)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match outputs of shape {tuple(outputs.shape)}; "
                "MSELoss would broadcast them silently. Reshape the targets (e.g. y.view_as(outputs))."
            )
        if targets.dtype != outputs.dtype:
            raise TypeError(f"targets have dtype {targets.dtype} but outputs {outputs.dtype}; convert them.")

    def mean_count(self, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
        """The number of output entries (the targets match the outputs' shape)."""
        return float(targets.numel())

    def _scale(self, z: torch.Tensor, reduction: Reduction) -> float:
        return 2.0 / z.numel() if reduction == "mean" and z.numel() else 2.0

    def output_hessian(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> OutputMatrix:
        r""":math:`U \mapsto 2c\,U`."""
        scale = self._scale(outputs, reduction)
        return lambda U: scale * U

    def output_hessian_sqrt(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        r""":math:`\sqrt{2c}` at every entry: shape ``(1, *z.shape)``, one unit per entry."""
        z = outputs.detach()
        return torch.full((1, *z.shape), self._scale(z, reduction) ** 0.5, dtype=z.dtype, device=z.device)

    def sampled_output_gradients(
        self, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        r""":math:`g = 2(z - \hat y) = \sqrt 2\,\xi`, :math:`\xi \sim \mathcal N(0, I)`."""
        z = outputs.detach()
        noise = torch.randn((num_samples, *z.shape), generator=generator, dtype=z.dtype, device=generator.device)
        return (2.0**0.5) * noise.to(z.device)

    def per_sample_losses(self, outputs: torch.Tensor, targets: Any, reduction: Reduction) -> torch.Tensor:
        """The mean (or sum) of each sample's squared errors."""
        entries = F.mse_loss(outputs, targets, reduction="none").reshape(outputs.shape[0], -1)  # (N,) outputs too
        return entries.mean(1) if reduction == "mean" else entries.sum(1)
