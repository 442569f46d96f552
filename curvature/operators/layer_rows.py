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
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .._func import model_outputs
from .._tree import map_leaves
from .kronecker.layers import Layer, factored_layers
from .kronecker.statistics import backward_columns, per_sample_gradients, rows_rebuild

__all__ = ["CHECK_SAMPLES", "Recording", "RowLayers"]

#: The samples the first chunk's check of the rows against autograd uses.
CHECK_SAMPLES = 8


class Recording(NamedTuple):
    """A forward pass of :meth:`RowLayers.record`.

    Attributes:
        outputs: The model's outputs, with their graph.
        calls: Each layer's recorded calls ``(input, output)``.
        leaves: The parameter leaves the graph starts from.
        layers: The layers recorded (the check may drop some afterwards).
    """

    outputs: torch.Tensor
    calls: list[list[tuple[torch.Tensor, torch.Tensor]]]
    leaves: list[torch.Tensor]
    layers: list[Layer]


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

    def record(self, state: dict[str, torch.Tensor], params: list[torch.Tensor], inputs: Any,
               forward: Callable[[dict[str, torch.Tensor], Any], torch.Tensor] | None = None) -> Recording:
        """One forward pass with the layers' inputs and outputs recorded and the graph kept, for :meth:`pullbacks`.

        Its outputs (detached) are the model's outputs for the columns, so that a batch in one chunk takes one forward
        pass, not two. ``forward(state, inputs)`` calls the model (default: ``model_outputs`` on this model).
        """
        leaves = [p.detach().requires_grad_(True) for p in params]
        call = forward or (lambda st, x: model_outputs(self.model, st, x))
        with torch.enable_grad(), self._recorded() as records:
            z = call({**state, **dict(zip(self.names, leaves))}, inputs)
        return Recording(z, [records.get(i, []) for i in range(len(self.layers))], leaves, list(self.layers))

    def pullbacks(self, state: dict[str, torch.Tensor], params: list[torch.Tensor], inputs: Any, cols: torch.Tensor,
                  square: bool, out: torch.Tensor, offsets: list[int], mode: str = "rows",
                  recording: Recording | None = None) -> set[int]:
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

        With ``recording`` (:meth:`record` on the same ``inputs``), its forward pass is used instead of a new one.

        Returns:
            The indices of the parameters written.
        """
        if not self.checked:
            self._check(state, params, inputs, cols)
        if not self.layers:
            return set()
        n = cols.shape[1]
        written: set[int] = set()
        for layer, rows in zip(self.layers, self._rows(state, params, inputs, cols, recording=recording)):
            if rows is None:  # never called: its gradient is zero
                for i in layer.indices:
                    (out[:, i] if mode == "norms" else _slot(out, offsets, i, self._shapes)).zero_()
            elif not _write_plain(layer, *rows, square, out, offsets, self._shapes, mode):
                a, g = rows
                matrix = _squared(layer, a, g) if square else per_sample_gradients(layer, a, g[0])
                if mode == "sum":
                    matrix = matrix.sum(0, keepdim=True)
                for i, value in layer.from_matrix(matrix, self._shapes).items():
                    if mode == "norms":
                        out[:, i] = value.reshape(n, -1).square().sum(1)
                    else:
                        _slot(out, offsets, i, self._shapes).copy_(value.reshape(out.shape[0], -1))
            written.update(layer.indices)
        return written

    def _rows(self, state: dict[str, torch.Tensor], params: list[torch.Tensor], inputs: Any, cols: torch.Tensor,
              leaves_out: list[Any] | None = None, recording: Recording | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Each layer's input rows ``(n, R, groups, in)`` and output rows ``(K, n, R, groups, out)`` (None: not called).

        One forward pass recording the layers and one batched backward pass of the columns; with ``leaves_out`` the
        backward pass also reaches the parameters, whose gradients (and leaves) are appended to it.
        """
        z, calls, leaves, _ = recording or self.record(state, params, inputs)
        every = {id(layer) for layer in self.layers}
        if recording is not None:  # recorded before the check dropped layers: keep the calls of those that remain
            calls = [c for layer, c in zip(recording.layers, calls) if id(layer) in every]
        n, K = cols.shape[1], cols.shape[0]
        with torch.enable_grad():
            outputs = [s for c in calls for _, s in c]
            wanted = [leaves[i] for i in sorted(self.indices)] if leaves_out is not None else []
            grads = backward_columns(z, outputs + wanted, list(cols)) if outputs or wanted else []
        if leaves_out is not None:
            leaves_out.extend([leaves, grads[len(outputs):]])
        result: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        start = 0
        for layer, c in zip(self.layers, calls):
            parts = grads[start:start + len(c)]
            start += len(c)
            if not c:
                result.append(None)
                continue
            a = _cat([layer.input_rows(x) for x, _ in c])
            g = _cat([torch.zeros(K, *s.shape, dtype=s.dtype, device=s.device) if p is None else
                      layer.output_rows(p.flatten(0, 1)).unflatten(0, (K, n)) for p, (_, s) in zip(parts, c)], dim=2)
            result.append((a, g))
        return result

    def _check(self, state: dict[str, torch.Tensor], params: list[torch.Tensor], inputs: Any, cols: torch.Tensor
               ) -> None:
        """Drop the layers whose rows do not rebuild autograd's gradient (a parameter also used elsewhere).

        One pass of its own, on the first column and at most 8 samples: the rows' summed gradient against autograd's
        (:func:`~curvature.operators.kronecker.statistics.rows_rebuild`, the rule K-FAC's check uses).
        """
        self.checked = True
        if not self.layers:
            return
        m = min(cols.shape[1], CHECK_SAMPLES)
        part = map_leaves(lambda t: t[:m] if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == cols.shape[1]
                          else t, inputs)
        extra: list[Any] = []
        rows = self._rows(state, params, part, cols[:1, :m], extra)
        leaves, leaf_grads = extra
        order = sorted(self.indices)
        kept = []
        for layer, found in zip(self.layers, rows):
            actual = {i: (torch.zeros_like(leaves[i]) if leaf_grads[order.index(i)] is None
                          else leaf_grads[order.index(i)][0]).unsqueeze(0) for i in layer.indices}
            expected = layer.to_matrix(actual)[0]
            if found is None:
                if float(expected.abs().max()) == 0:
                    kept.append(layer)
                continue
            a, g = found
            if rows_rebuild(layer, a, g[0], expected, g.dtype):
                kept.append(layer)
        self.layers = kept


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
    rows, fan_out = a.shape[1], g1.shape[-1]
    if layer.weight is not None:
        if rows == 1:  # ||g a^T||^2 = ||g||^2 ||a||^2
            out[:, layer.weight] = g1[:, 0].square().sum(1) * a_w[:, 0].square().sum(1)
        elif rows * (fan_in + fan_out) < fan_in * fan_out:  # the Gram form: sum_{r,r'} (g_r.g_r')(a_r.a_r')
            out[:, layer.weight] = (torch.bmm(g1, g1.transpose(1, 2)) * torch.bmm(a_w, a_w.transpose(1, 2))).sum((1, 2))
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
    total = per_sample_gradients(layer, a, g[0]).square_()
    for gk in g[1:]:
        term = per_sample_gradients(layer, a, gk)
        total.addcmul_(term, term)
    return total


def _cat(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The rows of a module's calls in one forward pass, side by side (one call: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
