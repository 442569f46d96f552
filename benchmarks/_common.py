"""The problem container shared by the benchmark scripts (the harness itself is _harness.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Problem:
    """A model, its loss and one batch of data: the same for every library.

    ``reference`` says, where a script needs it, how the ground truth is computed.
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    reference: str = ""

    @property
    def args(self) -> tuple:
        """``(model, loss_fn, data)``, the positional arguments of curvature's operators."""
        return self.model, self.loss_fn, (self.x, self.y)

    @property
    def params(self) -> list:
        """The trainable parameters, in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        """The number of trainable scalars ``P``."""
        return sum(p.numel() for p in self.params)

    @property
    def num_samples(self) -> int:
        """The number of samples ``N``."""
        return self.x.shape[0]

