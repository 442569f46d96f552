"""scikit-learn's digits (8x8 images, 10 classes; real data shipped with scikit-learn) for the examples.

The split and standardization are those of the ``curvature report`` command's built-in run
(:func:`curvature.cli.digits.load_split`), so the examples and the command measure the same data.
"""

from __future__ import annotations

import torch

from curvature.cli.digits import load_split


def load_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Digits split 75/25, standardized with the training statistics: ``X_train, X_test, y_train, y_test``."""
    return load_split(dtype)
