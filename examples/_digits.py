"""scikit-learn's digits (8x8 images, 10 classes; real data shipped with scikit-learn) for the examples."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load_data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """Digits split 75/25, standardized with the training statistics: ``X_train, X_test, y_train, y_test``."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_train.mean(0), X_train.std(0)
    std[std == 0] = 1.0  # a few border pixels are always 0

    def prep(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype)

    return prep(X_train), prep(X_test), torch.tensor(y_train), torch.tensor(y_test)
