"""The built-in run of ``curvature report``: a 64-32-10 tanh MLP trained on scikit-learn's digits.

:func:`load_split` is also the data of the examples (``examples/_digits.py`` calls it), so that with
``--dtype float64 --seed 0`` the built-in model is the one of ``examples/sharpness.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import UsageError

__all__ = ["BUILTIN_DATA", "BUILTIN_MODEL", "DEFAULT_EPOCHS", "load_split"]

BUILTIN_MODEL = "built-in: 64-32-10 tanh MLP"
BUILTIN_DATA = "built-in: scikit-learn digits, training split (1347 of 1797 samples, standardized)"
DEFAULT_EPOCHS = 30


def load_split(
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""scikit-learn's digits, split 75/25 and standardized with the training statistics.

    The 1797 8x8 images of 10 classes ship with scikit-learn (no download). The split is stratified with
    ``random_state=0``: 1347 training and 450 test samples. Each pixel is standardized,
    :math:`x \mapsto (x - \mu) / \sigma`, by the mean and standard deviation of the training split (a pixel
    that is always 0 there keeps :math:`\sigma = 1`).

    Args:
        dtype: The dtype of the inputs.
        device: The device of every tensor.

    Returns:
        ``X_train, X_test, y_train, y_test``: inputs of shape ``(N, 64)``, integer class labels of shape ``(N,)``.

    Raises:
        ImportError: If scikit-learn is not installed.

    Example:
        >>> X_train, X_test, y_train, y_test = load_split()
        >>> tuple(X_train.shape), tuple(X_test.shape), int(y_train.max())
        ((1347, 64), (450, 64), 9)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_train.mean(0), X_train.std(0)
    std[std == 0] = 1.0  # a few border pixels are always 0

    def prep(a: Any) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype, device=device)

    return (prep(X_train), prep(X_test), torch.tensor(y_train, device=device),
            torch.tensor(y_test, device=device))


def _digits(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`load_split` for the command: without scikit-learn, a :class:`UsageError` naming both ways out."""
    try:
        return load_split(dtype, device)
    except ImportError as error:
        raise UsageError(
            "the built-in example needs scikit-learn for its digits data: pip install scikit-learn, or bring "
            "your own model and data with --model FILE.py:FACTORY --data FILE.py:FACTORY."
        ) from error


def _builtin_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, hide_bars: bool) -> None:
    """Minibatch SGD with momentum (lr 0.05, momentum 0.9, batch 64), shuffled by a generator seeded with ``seed``."""
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # The same loader as examples/sharpness.py (so the same model there for the same seed and dtype).
    loader = DataLoader(TensorDataset(X.cpu(), y.cpu()), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    with tqdm(range(epochs), desc="training", unit="epoch", disable=hide_bars, leave=False) as bar:
        for _ in bar:
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(xb.to(X.device)), yb.to(y.device))
                loss.backward()
                optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    optimizer.zero_grad(set_to_none=True)


def _accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())
