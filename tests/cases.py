"""The registry of model cases every operator and estimator is checked on.

Each case is a small dict made by a factory from a dtype: ``model``, ``loss_fn``, ``data`` (one batch,
a list of uneven batches, or a DataLoader with an uneven last batch), and ``likelihood`` (whether the
loss is the negative log-likelihood that the Fisher needs), and for a plain callable loss its ``reduction``
(what the dense empirical-Fisher reference cannot read off the loss). Models are small (P < 300) so that the dense
float64 references stay fast. Seeds are fixed: a case is the same every time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MeanEmbedding(nn.Module):
    """Token embedding, mean over the sequence, linear classifier."""

    def __init__(self, vocab: int = 11, dim: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


class TiedDictModel(nn.Module):
    """Two layers sharing one weight (registered under two names), called with a dict of inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight  # weight tying: one parameter, two uses
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x) + shift))))


class Squeeze(nn.Module):
    """Drop the last dimension: ``(N, 1)`` outputs become the ``(N,)`` of the usual regression layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(-1)


class TinyLM(nn.Module):
    """Token embedding and a per-position linear head: next-token logits ``(N, T, V)``."""

    def __init__(self, vocab: int = 7, dim: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The usual causal language-model loss: next-token cross-entropy, padding labelled -100, mean over tokens."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def counted_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens ``shifted_lm_loss`` averages over."""
    return (labels[:, 1:] != -100).sum()


def _mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _split(x: Any, y: torch.Tensor, sizes: list[int]) -> list[tuple[Any, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append((x[start:start + size], y[start:start + size]))
        start += size
    return out


def _classes(n: int, c: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, c, (n, *shape))


def mlp_tanh_ce_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([5, 8, 3])
    x = torch.randn(24, 5)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(x, _classes(24, 3)))


def mlp_relu_mse_sum(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([5, 8, 2], act=nn.ReLU)
    x = torch.randn(20, 5)
    return dict(model=model, loss_fn=nn.MSELoss(reduction="sum"), data=(x, torch.randn(20, 2)))


def cnn_ce_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(12, 1, 6, 6)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(x, _classes(12, 3)))


def nobias_mse_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([4, 6, 2], bias=False)
    x = torch.randn(16, 4)
    return dict(model=model, loss_fn=nn.MSELoss(), data=(x, torch.randn(16, 2)))


def frozen_ce_sum(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([4, 6, 3])
    model[0].weight.requires_grad_(False)
    x = torch.randn(18, 4)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), data=(x, _classes(18, 3)))


def layernorm_ce_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():  # a non-trivial affine part
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(16, 4)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(x, _classes(16, 3)))


def batchnorm_eval_mse_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(16, 4)
    return dict(model=model, loss_fn=nn.MSELoss(), data=(x, torch.randn(16, 2)))


def embedding_ce_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = MeanEmbedding()
    tokens = torch.randint(0, 11, (20, 5))
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(tokens, _classes(20, 3)))


def loader_uneven_ce_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([5, 7, 3])
    x, y = torch.randn(30, 5), _classes(30, 3)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=DataLoader(TensorDataset(x, y), batch_size=7))


def loader_uneven_mse_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([3, 6, 2])
    x, y = torch.randn(30, 3), torch.randn(30, 2)
    return dict(model=model, loss_fn=nn.MSELoss(), data=DataLoader(TensorDataset(x, y), batch_size=7))


def ce_nd_logits_sum(dtype: torch.dtype) -> dict[str, Any]:
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1))
    x, y = torch.randn(13, 2, 5), _classes(13, 3, 5)
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), data=_split(x, y, [5, 5, 3]))


def ce_nd_ignore_index_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1))
    x, y = torch.randn(13, 2, 5), _classes(13, 3, 5)
    y[torch.rand(y.shape) < 0.3] = -100  # about a third of the positions ignored, unevenly per batch
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=_split(x, y, [6, 4, 3]))


def ce_weighted_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([4, 6, 3])
    x, y = torch.randn(21, 4), _classes(21, 3)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]))
    return dict(model=model, loss_fn=loss_fn, data=_split(x, y, [8, 8, 5]), likelihood=False)


def tied_dict_inputs_ce_sum(dtype: torch.dtype) -> dict[str, Any]:
    model = TiedDictModel()
    x, shift, y = torch.randn(15, 4), torch.randn(15, 4), _classes(15, 3)
    batches = [({"x": x[:8], "shift": shift[:8]}, y[:8]), ({"x": x[8:], "shift": shift[8:]}, y[8:])]
    return dict(model=model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), data=batches)


def ce_soft_targets_smoothed_mean(dtype: torch.dtype) -> dict[str, Any]:
    """Probability targets that do not sum to one (some rows all zero: masked), with label smoothing."""
    model = _mlp([4, 6, 3])
    x = torch.randn(17, 4)
    q = 1.3 * torch.softmax(torch.randn(17, 3), dim=1)
    q[::5] = 0.0
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    return dict(model=model, loss_fn=loss_fn, data=_split(x, q, [7, 7, 3]), likelihood=False)


def generic_loss_mean(dtype: torch.dtype) -> dict[str, Any]:
    model = _mlp([3, 5, 2])
    x, y = torch.randn(22, 3), torch.randn(22, 2)

    def log_cosh(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.cosh(outputs - targets)).sum(1).mean()

    return dict(model=model, loss_fn=log_cosh, data=_split(x, y, [10, 10, 2]), likelihood=False,
                reduction="mean")


def mse_1d_outputs_mean(dtype: torch.dtype) -> dict[str, Any]:
    """Regression with ``model(x).squeeze(-1)`` outputs of shape ``(N,)``, over a loader with an uneven last batch."""
    model = nn.Sequential(*_mlp([3, 5, 1]), Squeeze())
    x, y = torch.randn(26, 3), torch.randn(26)
    return dict(model=model, loss_fn=nn.MSELoss(), data=DataLoader(TensorDataset(x, y), batch_size=8))


def mse_nd_outputs_mean(dtype: torch.dtype) -> dict[str, Any]:
    """Regression with N-D outputs ``(N, C, L)`` from a convolution, in uneven batches."""
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 1))
    x, y = torch.randn(13, 2, 4), torch.randn(13, 2, 4)
    return dict(model=model, loss_fn=nn.MSELoss(), data=_split(x, y, [6, 4, 3]))


def bce_1d_logits_mean(dtype: torch.dtype) -> dict[str, Any]:
    """Binary classification with ``(N,)`` logits and ``BCEWithLogitsLoss``: a Bernoulli likelihood per sample."""
    model = nn.Sequential(*_mlp([4, 5, 1]), Squeeze())
    x, y = torch.randn(18, 4), torch.randint(0, 2, (18,)).float()
    return dict(model=model, loss_fn=nn.BCEWithLogitsLoss(), data=_split(x, y, [8, 6, 4]))


def bce_2d_logits_sum(dtype: torch.dtype) -> dict[str, Any]:
    """Multi-label classification with ``(N, C)`` logits, summed ``BCEWithLogitsLoss``, over an uneven loader."""
    model = _mlp([4, 6, 3])
    x, y = torch.randn(19, 4), torch.randint(0, 2, (19, 3)).float()
    return dict(model=model, loss_fn=nn.BCEWithLogitsLoss(reduction="sum"),
                data=DataLoader(TensorDataset(x, y), batch_size=8))


def bce_weighted_soft_mean(dtype: torch.dtype) -> dict[str, Any]:
    """``(N, C)`` logits, soft targets, per-class ``weight`` and ``pos_weight``: a closed-form GGN, no likelihood."""
    model = _mlp([4, 6, 3])
    x, y = torch.randn(17, 4), torch.rand(17, 3)
    loss_fn = nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 1.0, 2.0]), pos_weight=torch.tensor([3.0, 0.5, 1.0]))
    return dict(model=model, loss_fn=loss_fn, data=_split(x, y, [7, 7, 3]), likelihood=False)


def lm_shifted_tokens_mean(dtype: torch.dtype) -> dict[str, Any]:
    """A language model with the usual shifted cross-entropy over tokens that are not padding (-100), padded
    differently in every batch, its token count reported through ``curvature.NormalizedLoss``."""
    import curvature

    model = TinyLM()
    tokens = torch.randint(0, 7, (12, 6))
    labels = tokens.clone()
    for i, length in enumerate([6, 5, 3, 6, 2, 4, 6, 6, 3, 5, 4, 2]):
        labels[i, length:] = -100
    loss_fn = curvature.NormalizedLoss(shifted_lm_loss, counted_tokens)
    return dict(model=model, loss_fn=loss_fn, data=_split(tokens, labels, [4, 5, 3]), likelihood=False)


FACTORIES: dict[str, Callable[[torch.dtype], dict[str, Any]]] = {
    f.__name__: f
    for f in [
        mlp_tanh_ce_mean, mlp_relu_mse_sum, cnn_ce_mean, nobias_mse_mean, frozen_ce_sum, layernorm_ce_mean,
        batchnorm_eval_mse_mean, embedding_ce_mean, loader_uneven_ce_mean, loader_uneven_mse_mean,
        ce_nd_logits_sum, ce_nd_ignore_index_mean, ce_weighted_mean, ce_soft_targets_smoothed_mean,
        tied_dict_inputs_ce_sum, generic_loss_mean, mse_1d_outputs_mean, mse_nd_outputs_mean, bce_1d_logits_mean,
        bce_2d_logits_sum, bce_weighted_soft_mean, lm_shifted_tokens_mean,
    ]
}


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {key: _cast(val, dtype) for key, val in obj.items()}
    if isinstance(obj, DataLoader):
        return DataLoader(TensorDataset(*_cast(list(obj.dataset.tensors), dtype)), batch_size=obj.batch_size)
    return obj


def make_case(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, Any]:
    """Build case ``name`` in ``dtype`` with a fixed seed."""
    torch.manual_seed(seed)
    case = FACTORIES[name](dtype)
    case["model"] = case["model"].to(dtype)
    if isinstance(case["loss_fn"], nn.Module):
        case["loss_fn"] = case["loss_fn"].to(dtype)
    case["data"] = _cast(case["data"], dtype)
    case.setdefault("likelihood", True)
    case["name"] = name
    return case
