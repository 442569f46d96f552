"""Pieces shared by the benchmark scripts in this folder: the problem container and the load report."""

from __future__ import annotations

import os
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


def print_load() -> None:
    """Other processes on a 2-core machine distort timings: show the load next to the numbers."""
    if hasattr(os, "getloadavg"):
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
