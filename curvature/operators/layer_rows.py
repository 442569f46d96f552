r"""Per-sample pullbacks of the factored layers from their recorded rows (BackPACK's way), without ``vmap``.

A ``Linear`` or convolution layer computes :math:`s_r = W a_r` at each row :math:`r` of a sample (one row for a plain
batch, one per position or patch otherwise), so the pullback of an output column through sample :math:`n` is, for
its weight,

.. math:: J_n^\top c_{kn} \big|_W = \sum_r g_{knr}\, a_{nr}^\top, \qquad g_{kn} = \partial \langle z, c_k \rangle /
          \partial s_n,

from one forward pass that records each layer's input rows :math:`a` and one batched backward pass of the ``K``
columns to the layers' outputs (Dangel, Kunstner & Hennig 2020, arXiv:1912.10985; Goodfellow 2015,
arXiv:1510.01799). With one row, a squared pullback summed over the columns factorizes:
:math:`\sum_k (g_{kn} a_n^\top)^{\odot 2} = (\sum_k g_{kn}^{\odot 2})(a_n^{\odot 2})^\top`, and its sum over the
samples is a single matrix product (the exact GGN diagonal at the cost of a gradient per column). The same holds
elementwise for the affine parameters of normalization layers. The layers are those of
:mod:`curvature.operators.kronecker.layers` (``Linear``, ``Conv1d``/``Conv2d`` with any groups, ``LayerNorm``,
``GroupNorm``, eval-mode ``BatchNorm``); every other parameter (embeddings, tied weights, parameters no such layer
owns, or used outside their layer's forward pass, which the first chunk detects by rebuilding the gradient) is left
to the caller's ``vmap`` path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .._func import model_outputs
from .kronecker.layers import Layer, factored_layers
from .kronecker.statistics import backward_columns, per_sample_gradients, summed_gradient

__all__ = ["RowLayers"]


class RowLayers:
    """The parameters whose per-sample pullbacks come from recorded rows, and the computation.

    Args:
        model: The model.
        params: The selected parameters, in flat-vector order.
        names: Their names.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], names: list[str]) -> None:
        self.model = model
        self.names = names
        self._shapes = {i: p.shape for i, p in enumerate(params)}
        try:
            layers, _ = factored_layers(model, params, names, shared="unowned")
        except ValueError:  # a module whose options change its gradient (Embedding(max_norm=)): vmap handles all
            layers = []
        self.layers: list[Layer] = [layer for layer in layers if layer.kind in ("kronecker", "norm")]
        self.checked = False

    @property
    def indices(self) -> set[int]:
        """The parameter indices this object computes."""
        return {i for layer in self.layers for i in layer.indices}

    @contextlib.contextmanager
    def _recorded(self) -> Iterator[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
        records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def hook(index: int) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                records.setdefault(index, []).append((args[0].detach(), output))
            return record

        handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

    def pullbacks(self, state: dict[str, torch.Tensor], params: list[torch.Tensor], inputs: Any, cols: torch.Tensor,
                  square: bool, out: torch.Tensor, offsets: list[int], mode: str = "rows") -> set[int]:
        r"""Each row layer's per-sample pullbacks of ``cols`` (``(K, n, *z_sample)``) for the samples of ``inputs``.

        Each parameter's ``(n, numel)`` columns of ``out`` (which start at ``offsets[i]``) receive the pullback of the
        single column (``square=False``), or the sum over the columns of the squared pullbacks (``square=True``),
        written in place where the layout allows (one pass over the result, as BackPACK's per-parameter tensors).
        With ``mode="sum"``, ``out`` is ``(1, P)`` and receives the sum over the samples instead, which for one row is
        a single matrix product per layer, :math:`\sum_n g_n a_n^\top = G^\top A` (never a per-sample matrix). With
        ``mode="norms"`` (gradients), ``out`` is ``(n, parameters)`` and receives each parameter's squared norm per
        sample, for one row :math:`\|g a^\top\|^2 = \|g\|^2 \|a\|^2` (BackPACK's ``BatchL2Grad``).
        On the first call, the rows are checked to rebuild autograd's gradient; a layer that fails (its parameter is
        also used elsewhere) is dropped from :attr:`layers`, and its parameters are not written.

        Returns:
            The indices of the parameters written.
        """
        if not self.layers:
            return set()
        leaves = [p.detach().requires_grad_(True) for p in params]
        check = not self.checked
        with torch.enable_grad(), self._recorded() as records:
            z = model_outputs(self.model, {**state, **dict(zip(self.names, leaves))}, inputs)
            calls = [records.get(i, []) for i in range(len(self.layers))]
            outputs = [s for c in calls for _, s in c]
            targets = outputs + ([leaves[i] for i in sorted(self.indices)] if check else [])
            grads = backward_columns(z, targets, list(cols)) if targets else []
        n, K = cols.shape[1], cols.shape[0]
        written: set[int] = set()
        start = 0
        failed: list[Layer] = []
        for layer, c in zip(self.layers, calls):
            parts = grads[start:start + len(c)]
            start += len(c)
            if not c:  # never called: its gradient is zero
                for i in layer.indices:
                    (out[:, i] if mode == "norms" else _slot(out, offsets, i, self._shapes)).zero_()
                written.update(layer.indices)
                continue
            a = _cat([layer.input_rows(x) for x, _ in c])  # (n, R, groups, in)
            g = _cat([torch.zeros(K, *s.shape, dtype=s.dtype, device=s.device) if p is None else
                      layer.output_rows(p.flatten(0, 1)).unflatten(0, (K, n)) for p, (_, s) in zip(parts, c)],
                     dim=2)  # (K, n, R, groups, out)
            if check and not self._rebuilds(layer, a, g[0], grads, outputs, leaves):
                failed.append(layer)
                continue
            if not _write_plain(layer, a, g, square, out, offsets, self._shapes, mode):
                matrix = _squared(layer, a, g) if square else per_sample_gradients(layer, a, g[0])
                if mode == "sum":
                    matrix = matrix.sum(0, keepdim=True)
                for i, value in layer.from_matrix(matrix, self._shapes).items():
                    if mode == "norms":
                        out[:, i] = value.reshape(n, -1).square().sum(1)
                    else:
                        _slot(out, offsets, i, self._shapes).copy_(value.reshape(out.shape[0], -1))
            written.update(layer.indices)
        if check:
            self.layers = [layer for layer in self.layers if layer not in failed]
            self.checked = True
        return written

    def _rebuilds(self, layer: Layer, a: torch.Tensor, g: torch.Tensor, grads: list[Any],
                  outputs: list[torch.Tensor], leaves: list[torch.Tensor]) -> bool:
        """Whether the rows' gradient of the first column is autograd's, to the square root of the unit roundoff."""
        order = sorted(self.indices)
        leaf_grads = {i: grads[len(outputs) + order.index(i)] for i in layer.indices}
        actual = {i: (torch.zeros_like(leaves[i]).unsqueeze(0) if leaf_grads[i] is None else leaf_grads[i][:1])
                  for i in layer.indices}
        expected = layer.to_matrix(actual)[0]
        rebuilt = summed_gradient(layer, a, g)
        magnitude = summed_gradient(layer, a.abs(), g.abs())
        scale = max(float(magnitude.max()), float(expected.abs().max()))
        return scale == 0 or float((expected - rebuilt).abs().max()) <= math.sqrt(torch.finfo(a.dtype).eps) * scale


def _slot(out: torch.Tensor, offsets: list[int], i: int, shapes: dict[int, torch.Size]) -> torch.Tensor:
    """Parameter ``i``'s ``(n, numel)`` columns of the flat result (a view)."""
    return out[:, offsets[i]:offsets[i] + math.prod(shapes[i])]


def _write_plain(layer: Layer, a: torch.Tensor, g: torch.Tensor, square: bool, out: torch.Tensor,
                 offsets: list[int], shapes: dict[int, torch.Size], mode: str) -> bool:
    r"""A ``Linear`` or convolution with one group, written straight into ``out``; False for other layers.

    With one row the weight's rows are the outer products :math:`g a^\top` (or :math:`(\sum_k g_k^{\odot 2})
    (a^{\odot 2})^\top`), the bias's :math:`g`; with several, the per-sample matrix products
    :math:`\sum_r g_r a_r^\top` of each column. ``mode`` as for :meth:`RowLayers.pullbacks`.
    """
    if layer.kind != "kronecker" or layer.groups != 1:
        return False
    if mode == "norms":
        return _write_norms(layer, a, g[0], out)
    reduce = mode == "sum"
    rows = out.shape[0]
    fan_in = a.shape[-1] - (1 if layer.bias is not None and layer.weight is not None else 0)
    if a.shape[1] == 1:
        a1, gk = a[:, 0, 0, :fan_in], g[:, :, 0, 0]  # (n, in), (K, n, out)
        g1 = gk.square().sum(0) if square else gk[0]
        a1 = a1.square() if square else a1
        if layer.weight is not None:
            weight = _slot(out, offsets, layer.weight, shapes).view(rows, g1.shape[1], fan_in)
            if reduce:
                torch.mm(g1.T, a1, out=weight[0])
            else:
                torch.mul(g1.unsqueeze(2), a1.unsqueeze(1), out=weight)
        if layer.bias is not None:
            _slot(out, offsets, layer.bias, shapes).copy_(g1.sum(0, keepdim=True) if reduce else g1)
        return True
    if square:
        return False
    a_w, g1 = a[:, :, 0, :fan_in], g[0, :, :, 0]  # (n, R, in), (n, R, out)
    if layer.weight is not None:
        weight = _slot(out, offsets, layer.weight, shapes).view(rows, g1.shape[2], fan_in)
        weight.copy_(g1.flatten(0, 1).T @ a_w.flatten(0, 1) if reduce else torch.bmm(g1.transpose(1, 2), a_w))
    if layer.bias is not None:
        _slot(out, offsets, layer.bias, shapes).copy_(g1.sum((0, 1)).unsqueeze(0) if reduce else g1.sum(1))
    return True


def _write_norms(layer: Layer, a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> bool:
    """Each sample's squared gradient norm of a one-group ``Linear`` or convolution's weight and bias."""
    fan_in = a.shape[-1] - (1 if layer.bias is not None and layer.weight is not None else 0)
    a_w, g1 = a[:, :, 0, :fan_in], g[:, :, 0]  # (n, R, in), (n, R, out)
    if layer.weight is not None:
        if a.shape[1] == 1:  # ||g a^T||^2 = ||g||^2 ||a||^2
            out[:, layer.weight] = g1[:, 0].square().sum(1) * a_w[:, 0].square().sum(1)
        else:
            out[:, layer.weight] = torch.bmm(g1.transpose(1, 2), a_w).square().sum((1, 2))
    if layer.bias is not None:
        out[:, layer.bias] = g1.sum(1).square().sum(1)
    return True


def _squared(layer: Layer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""``sum_k`` of the squared per-sample pullbacks as ``(n, groups, rows, cols)`` matrices.

    One row: :math:`(\sum_k g_k^{\odot 2})(a^{\odot 2})^\top` without forming a pullback per column; several rows:
    the pullbacks per column, squared and summed.
    """
    if a.shape[1] == 1:
        a2, g2 = a[:, 0].square(), g[:, :, 0].square().sum(0)  # (n, groups, in), (n, groups, out)
        if layer.kind == "norm":
            copies = a2.shape[-1] // g2.shape[-1]
            return (a2 * g2.repeat(1, 1, copies)).unsqueeze(2)
        return g2.unsqueeze(-1) * a2.unsqueeze(-2)
    total = None
    for gk in g:
        term = per_sample_gradients(layer, a, gk).square()
        total = term if total is None else total + term
    return total


def _cat(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The rows of a module's calls in one forward pass, side by side (one call: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
