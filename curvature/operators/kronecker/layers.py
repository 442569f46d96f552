r"""The layers K-FAC factors: which modules, what their input rows and output-gradient rows are, and their layout.

A factored layer computes, at every *row* :math:`r` of a sample (a sequence position, a convolution patch; one row
for a plain batch), :math:`s_r = W a_r` (or the elementwise :math:`s_r = \gamma \odot \hat x_r + \beta` of a
normalization layer). Its weight gradient is :math:`\sum_r g_r a_r^\top` with :math:`g_r = \partial \ell/\partial
s_r`, which is what makes the Kronecker factorization possible (Martens & Grosse 2015). This module turns a module's
recorded input and output gradient into rows of shape ``(N, R, groups, width)`` and maps the parameters' flat
entries to the matrices the factors act on; the factors themselves are in :mod:`.blocks`.

==================================  ==================================  ===========================================
module                              input rows :math:`a` (column side)  output rows :math:`g` (row side)
==================================  ==================================  ===========================================
``Linear``                          the input's last dim (+1 for bias)  the output's last dim
``Conv1d``/``Conv2d``               unfolded patches per group (+1)     output channels per group, per location
``Embedding``                       one-hot tokens (a diagonal factor)  the embedding dimension
``LayerNorm``/``GroupNorm``/        :math:`[\hat x; 1]` (normalized     the normalized dimension (channels)
``BatchNorm`` (eval)                input, ones for the bias)
==================================  ==================================  ===========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FACTORED_MODULES", "DiagonalPart", "Layer", "factored_layers"]

_CONV = (nn.Conv1d, nn.Conv2d)
_NORM = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: The modules whose channels are dimension 1 (moved last to make rows); the others' features are already last.
_CHANNELS_FIRST = (*_CONV, *_NORM[1:])
#: The module types whose parameters K-FAC factors.
FACTORED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV, nn.Embedding, *_NORM)


@dataclass
class Layer:
    """One factored module and the positions of its parameters in the operator's parameter list.

    Attributes:
        name: The module's name in the model.
        module: The module.
        weight: Index of its weight among the operator's parameters, or None if not selected.
        bias: Index of its bias, or None.
        kind: ``"kronecker"`` (Linear, convolutions), ``"embedding"`` (a diagonal input factor) or ``"norm"``
            (an elementwise layer: a Hadamard-factored block).
        groups: Independent Kronecker blocks of the layer (a grouped convolution's groups; 1 otherwise).
    """

    name: str
    module: nn.Module
    weight: int | None
    bias: int | None
    kind: str
    groups: int = 1

    @property
    def indices(self) -> list[int]:
        """The layer's parameter indices, weight first."""
        return [i for i in (self.weight, self.bias) if i is not None]

    def sizes(self) -> tuple[int, int, int]:
        """``(groups, rows, cols)`` of the layer's matrices (:meth:`to_matrix`)."""
        m = self.module
        if self.kind == "embedding":
            return 1, m.num_embeddings, m.embedding_dim
        if self.kind == "norm":
            return 1, 1, self.width() * len(self.indices)
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        cols = (fan_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)
        return self.groups, self.width() // self.groups, cols

    def width(self) -> int:
        """The size of the layer's output dimension (channels, features, normalized entries)."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return math.prod(m.normalized_shape)
        if isinstance(m, nn.Embedding):
            return m.embedding_dim
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, _CONV):
            return m.out_channels
        return m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features

    # -- rows ----------------------------------------------------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows :math:`a` of one call's input: ``(N, R, groups, width)`` (token ids ``(N, R)`` for embeddings)."""
        m = self.module
        if self.kind == "embedding":
            return x.reshape(x.shape[0], -1)
        if self.kind == "norm":
            xhat = _normalized(m, x)
            rows = _channels_last(m, xhat)
            parts = ([rows] if self.weight is not None else []) + ([torch.ones_like(rows)] if self.bias is not None
                                                                   else [])
            return torch.cat(parts, dim=-1).unsqueeze(2)
        if isinstance(m, nn.Linear):
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            rows = _patches(m, x)  # (N, L, C_in/groups * prod(kernel) * groups)
        rows = rows.reshape(*rows.shape[:2], self.groups, -1)
        if self.weight is None:  # only the bias: the input is the constant 1
            return rows.new_ones(*rows.shape[:3], 1)
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:3], 1)], dim=-1)
        return rows

    def output_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The rows :math:`g` of the gradient with respect to one call's output: ``(N, R, groups, width)``."""
        m = self.module
        if isinstance(m, _CHANNELS_FIRST) and grad.ndim > 2:
            grad = grad.movedim(1, -1)
        return grad.reshape(grad.shape[0], -1, self.groups, self.width() // self.groups)

    # -- the parameters as the matrices the factors act on --------------------------------------------------------
    def to_matrix(self, tensors: dict[int, torch.Tensor]) -> torch.Tensor:
        """The layer's parameter-shaped ``(k, *shape)`` tensors as ``(k, groups, rows, cols)`` matrices.

        Rows index the output (row) factor and columns the input (column) factor; an embedding's rows are tokens.
        A norm layer's matrix is one row: ``[weight, bias]``.
        """
        w = tensors.get(self.weight) if self.weight is not None else None
        b = tensors.get(self.bias) if self.bias is not None else None
        k = (w if w is not None else b).shape[0]
        if self.kind == "norm":
            parts = [t.reshape(k, -1) for t in (w, b) if t is not None]
            return torch.cat(parts, dim=1).reshape(k, 1, 1, -1)
        if self.kind == "embedding":
            return w.unsqueeze(1)
        parts = []
        if w is not None:
            parts.append(w.reshape(k, self.groups, w.shape[1] // self.groups, -1))
        if b is not None:
            parts.append(b.reshape(k, self.groups, -1, 1))
        return torch.cat(parts, dim=-1)

    def from_matrix(self, X: torch.Tensor, shapes: dict[int, torch.Size]) -> dict[int, torch.Tensor]:
        """The inverse of :meth:`to_matrix`: parameter-shaped tensors by index."""
        k = X.shape[0]
        out: dict[int, torch.Tensor] = {}
        if self.kind == "norm":
            flat = X.reshape(k, -1)
            if self.weight is not None:
                size = math.prod(shapes[self.weight])
                out[self.weight] = flat[:, :size].reshape(k, *shapes[self.weight])
                flat = flat[:, size:]
            if self.bias is not None:
                out[self.bias] = flat.reshape(k, *shapes[self.bias])
            return out
        if self.kind == "embedding":
            out[self.weight] = X.squeeze(1)
            return out
        if self.bias is not None:
            out[self.bias] = X[..., -1].reshape(k, *shapes[self.bias])
            X = X[..., :-1]
        if self.weight is not None:
            out[self.weight] = X.reshape(k, *shapes[self.weight])
        return out


def _normalized(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    r"""The normalized input :math:`\hat x` of a normalization layer (before its affine map)."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, None, None, m.eps)
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _channels_last(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``(N, R, width)`` rows of a normalization layer's per-row tensor."""
    if isinstance(m, nn.LayerNorm):
        return t.reshape(t.shape[0], -1, math.prod(m.normalized_shape))
    t = t.movedim(1, -1) if t.ndim > 2 else t
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches of a convolution: ``(N, L, C_in * prod(kernel))``, channel slowest."""
    padding = m.padding
    if isinstance(padding, str) or m.padding_mode != "zeros":  # padded explicitly, as the module's forward does
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(m.kernel_size)
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        padding = (0, padding[0])
    else:
        kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C*k, L)
    return cols.transpose(1, 2)


def factored_layers(model: nn.Module, params: list[torch.Tensor], param_names: list[str],
                    shared: str = "error") -> tuple[list[Layer], list[int]]:
    """The factored layers owning the selected parameters, and the indices of the parameters no layer owns.

    Args:
        model: The model.
        params: The operator's selected parameters, in flat-vector order.
        param_names: Their names.
        shared: What to do with a parameter several factored modules use (tied weights): ``"error"``, or
            ``"unowned"`` (no layer owns it).

    Returns:
        ``(layers, unowned)``.

    Raises:
        ValueError: For a factored module whose options change its gradient (``Embedding`` with ``max_norm`` or
            ``scale_grad_by_freq``), or (``shared="error"``) a parameter several factored modules use.
    """
    index = {id(p): i for i, p in enumerate(params)}
    found: list[tuple[str, nn.Module, int | None, int | None]] = []
    users: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        if not isinstance(m, FACTORED_MODULES):
            continue
        w = index.get(id(getattr(m, "weight", None)))
        b = index.get(id(getattr(m, "bias", None)))
        if w is None and b is None:
            continue
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
            raise ValueError(f"module {mname!r}: Embedding with max_norm= or scale_grad_by_freq= changes its "
                             "weight or its gradient in ways K-FAC does not model; pass params= without it.")
        found.append((mname, m, w, b))
        for i in (w, b):
            if i is not None:
                users.setdefault(i, []).append(mname)
    tied = {i for i, names in users.items() if len(names) > 1}
    if tied and shared == "error":
        i = min(tied)
        raise ValueError(f"parameter {param_names[i]!r} is used by modules {users[i][0]!r} and {users[i][1]!r} "
                         "(tied weights); K-FAC needs one module per parameter. Exclude it with params=, or pass "
                         "unsupported='diagonal' to cover it with its exact diagonal.")
    layers: list[Layer] = []
    for mname, m, w, b in found:
        w, b = (None if w in tied else w), (None if b in tied else b)
        if w is None and b is None:
            continue
        kind = "embedding" if isinstance(m, nn.Embedding) else "norm" if isinstance(m, _NORM) else "kronecker"
        layers.append(Layer(mname, m, w, b, kind, m.groups if isinstance(m, _CONV) else 1))
    owned = {i for layer in layers for i in layer.indices}
    return layers, [i for i in range(len(param_names)) if i not in owned]


@dataclass
class DiagonalPart:
    """The parameters no factored layer owns, covered by their exact diagonal (``unsupported="diagonal"``).

    It plays a layer's part for products: its matrix is one row holding every entry of its parameters.
    """

    indices: list[int]
    name: str = "(exact diagonal)"
    kind: str = "diagonal"
    weight: None = None
    bias: None = None

    def to_matrix(self, tensors: dict[int, torch.Tensor]) -> torch.Tensor:
        """``(k, *shape)`` tensors as one ``(k, 1, 1, size)`` row."""
        k = tensors[self.indices[0]].shape[0]
        return torch.cat([tensors[i].reshape(k, -1) for i in self.indices], dim=1).reshape(k, 1, 1, -1)

    def from_matrix(self, X: torch.Tensor, shapes: dict[int, torch.Size]) -> dict[int, torch.Tensor]:
        """The inverse of :meth:`to_matrix`."""
        k = X.shape[0]
        sizes = [math.prod(shapes[i]) for i in self.indices]
        return {i: t.reshape(k, *shapes[i]) for i, t in zip(self.indices, X.reshape(k, -1).split(sizes, dim=1))}
