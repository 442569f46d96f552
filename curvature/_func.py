"""Functional core: curvature products on plain functions, in the spirit of ``torch.func``.

Two families live here:

* :func:`hvp` and :func:`ggn_vp` are pure ``torch.func`` compositions (forward-over-reverse
  ``jvp(grad(f))`` and ``jvp`` → loss Hessian → ``vjp``). They compose with ``vmap`` and ``grad`` and
  can be differentiated again (``create_graph=True``), which regularizers need.
* :func:`vjp_columns` is the one engine for products through a kept autograd graph: ``k`` cotangents at
  once, vectorized (``is_grads_batched``) or in a loop, differentiable when asked (``create_graph=True``).
  Through a gradient with its graph (:func:`gradient`) they are Hessian products, one backward pass each:
  the exact operators, the optimizers' graph Hessian and the trace and alignment penalties all use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch.func import functional_call, grad, jvp, vjp

__all__ = ["call_model", "ggn_vp", "gradient", "hvp", "model_outputs", "vjp_batched", "vjp_columns"]



def _detach_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def hvp(
    f: Callable[..., torch.Tensor],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    create_graph: bool = False,
) -> tuple[Any, ...]:
    r"""Hessian-vector product of a scalar function by forward-over-reverse differentiation.

    .. math:: H v = \frac{\partial}{\partial \epsilon} \nabla f(x + \epsilon v) \Big|_{\epsilon = 0}

    computed as ``torch.func.jvp(torch.func.grad(f), primals, tangents)`` (Pearlmutter 1994, "Fast
    exact multiplication by the Hessian"). Costs about one gradient plus one forward-mode pass.

    Args:
        f: Function of ``*primals`` returning a scalar tensor.
        primals: Tuple of arguments of ``f`` (tensors or pytrees of tensors, e.g. a parameter dict).
        tangents: Tuple with the structure of ``primals``: the vector ``v``.
        create_graph: Keep the result differentiable (with respect to primals and tangents that require
            grad) so that the product can be differentiated again. Otherwise the result is detached.

    Returns:
        ``H v`` with the structure of ``primals``.

    Raises:
        TypeError: If ``primals`` or ``tangents`` is not a tuple.

    Example:
        >>> x = torch.tensor([1.0, 2.0])
        >>> hvp(lambda x: (x**3).sum(), (x,), (torch.ones(2),))[0]
        tensor([ 6., 12.])
    """
    if not isinstance(primals, tuple) or not isinstance(tangents, tuple):
        raise TypeError("primals and tangents must be tuples, like torch.func.jvp's; wrap one tensor as (x,).")
    argnums = tuple(range(len(primals)))
    out = jvp(grad(f, argnums=argnums), primals, tangents)[1]
    return out if create_graph else _detach_tree(out)


def ggn_vp(
    model_fn: Callable[..., torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    create_graph: bool = False,
) -> tuple[Any, ...]:
    r"""Generalized Gauss-Newton-vector product of ``loss_fn(model_fn(*primals))``.

    .. math:: G v = J^\top \, \nabla^2_{z} \ell(z) \, J v, \qquad z = m(\theta),\; J = \partial z / \partial\theta

    computed as ``jvp`` of the model, a Hessian-vector product of the loss in output space and a ``vjp``
    (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent").
    Costs about one forward, one forward-mode and one backward pass of the model.

    Args:
        model_fn: Function of ``*primals`` returning the outputs ``z``.
        loss_fn: Function of the outputs returning a scalar (targets closed over).
        primals: Tuple of arguments of ``model_fn`` (tensors or pytrees).
        tangents: Tuple with the structure of ``primals``.
        create_graph: Keep the result differentiable; otherwise it is detached.

    Returns:
        ``G v`` with the structure of ``primals``.

    Raises:
        TypeError: If ``primals`` or ``tangents`` is not a tuple.

    Example:
        >>> w = torch.tensor([2.0])
        >>> ggn_vp(lambda w: w * 3.0, lambda z: (z**2).sum(), (w,), (torch.ones(1),))[0]
        tensor([18.])
    """
    if not isinstance(primals, tuple) or not isinstance(tangents, tuple):
        raise TypeError("primals and tangents must be tuples, like torch.func.jvp's; wrap one tensor as (x,).")
    outputs, jv = jvp(model_fn, primals, tangents)
    hjv = jvp(grad(loss_fn), (outputs,), (jv,))[1]
    _, pullback = vjp(model_fn, *primals)
    out = pullback(hjv)
    return out if create_graph else _detach_tree(out)


def _arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The one dispatch of inputs: ``model(**x)`` for a dict, ``model(*x)`` for a tuple or list, else ``model(x)``."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs as the operators do: ``model(x)``, ``model(*x)`` or ``model(**x)``.

    Args:
        model: The model (any callable).
        inputs: The batch's inputs.

    Returns:
        The model's outputs.

    Example:
        >>> call_model(lambda a, b: a + b, (torch.ones(1), torch.ones(1)))
        tensor([2.])
    """
    args, kwargs = _arguments(inputs)
    return model(*args, **kwargs)


def model_outputs(
    model: torch.nn.Module, params_and_buffers: dict[str, torch.Tensor], inputs: Any
) -> torch.Tensor:
    """Call ``model`` functionally on ``inputs`` with the given parameters and buffers.

    ``inputs`` is dispatched as :func:`call_model` does. Buffers are passed explicitly (see DESIGN.md: a buffer
    captured from the module breaks ``torch.func`` transforms).

    Args:
        model: The module.
        params_and_buffers: Mapping of every parameter and buffer name to the tensor to use.
        inputs: The batch's inputs.

    Returns:
        The model's outputs.
    """
    args, kwargs = _arguments(inputs)
    return functional_call(model, params_and_buffers, args, kwargs)


def gradient(
    loss: torch.Tensor, params: Sequence[torch.Tensor], *, create_graph: bool = False
) -> tuple[list[torch.Tensor], list[bool]]:
    """The gradient of a scalar loss, one tensor per parameter (zeros where unused), and which are unused.

    With ``create_graph=True`` it keeps its graph: :func:`vjp_columns` through it gives Hessian products.

    Example:
        >>> w, spare = torch.tensor([1.0, 2.0], requires_grad=True), torch.ones(1, requires_grad=True)
        >>> gradient((w**2).sum(), [w, spare])
        ([tensor([2., 4.]), tensor([0.])], [False, True])
    """
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)], [g is None for g in grads]


def _differentiable(
    outputs: Sequence[torch.Tensor | None], cotangents: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The outputs that have a graph, with their cotangents (the others contribute nothing)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _filled(grads: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor],
            batch: tuple[int, ...]) -> list[torch.Tensor]:
    """Zeros of shape ``(*batch, *input.shape)`` where autograd found no path (None)."""
    return [g if g is not None else torch.zeros((*batch, *x.shape), dtype=x.dtype, device=x.device)
            for g, x in zip(grads, inputs)]


def vjp_batched(
    outputs: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """:func:`vjp_columns` in one vectorized pass (``is_grads_batched``, also for ``k = 1``); the graph is kept.

    Raises:
        RuntimeError: (or ``NotImplementedError``) from autograd where vmap cannot batch the graph, with
            nothing computed: :func:`vjp_columns` then loops; callers with their own policy catch it.
    """
    k = cotangents[0].shape[0]
    outs, cots = _differentiable(outputs, cotangents)
    if not outs:
        return _filled([None] * len(inputs), inputs, (k,))
    grads = torch.autograd.grad(outs, inputs, cots, retain_graph=True, create_graph=create_graph,
                                allow_unused=True, is_grads_batched=True)
    return _filled(grads, inputs, (k,))


def vjp_columns(
    outputs: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    vectorize: bool,
    retain_graph: bool = True,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    r"""Reverse-mode products :math:`J^\top c_j` for ``k`` cotangents through a kept autograd graph.

    The graph is retained, so the call can be repeated with new cotangents at the cost of one backward
    pass each; with ``retain_graph=False`` the last backward pass of the column loop frees it as it goes (a
    graph used once then peaks lower; a vectorized call keeps it, in case vmap fails and the loop needs it).
    Inputs that the outputs do not depend on get zeros. With a gradient and its graph as the outputs, the
    products are :math:`H c_j` (Pearlmutter 1994, "Fast exact multiplication by the Hessian").

    Args:
        outputs: Tensors of the graph (entries that are None or do not require grad are skipped).
        inputs: Leaves to differentiate with respect to.
        cotangents: One tensor of shape ``(k, *output.shape)`` per output.
        vectorize: Push all ``k`` cotangents through the graph at once with ``is_grads_batched`` (vmap);
            if the graph cannot be vmapped, a loop is used, with a ``RuntimeWarning`` that the ``warnings``
            filters show once per place and reason by default (``warnings.simplefilter("always")``: every time).
        retain_graph: Keep the graph after the last column (False: this is its last use).
        create_graph: Keep the products differentiable (the graph is then always retained).

    Returns:
        One tensor of shape ``(k, *input.shape)`` per input.
    """
    k = cotangents[0].shape[0]
    outs, cots = _differentiable(outputs, cotangents)
    if not outs:
        return _filled([None] * len(inputs), inputs, (k,))
    if vectorize and k > 1:
        try:
            # The graph is kept even on its last use: if vmap fails half-way, the loop below needs it whole.
            return vjp_batched(outs, inputs, cots, create_graph=create_graph)
        except RuntimeError as err:  # an op without a batching rule
            # Shown once per place by the warnings registry (Python's "default" action), not by a flag of ours:
            # warnings.simplefilter("always") shows every one, "ignore" none, "error" raises.
            warnings.warn(
                f"vectorized products are not supported by this model ({str(err).splitlines()[0]}); "
                "falling back to one backward pass per column. Pass vectorize=False to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    columns = [
        _filled(torch.autograd.grad(outs, inputs, [c[j] for c in cots], allow_unused=True, create_graph=create_graph,
                                    retain_graph=retain_graph or create_graph or j + 1 < k), inputs, ())
        for j in range(k)
    ]
    if k == 1:
        return [g.unsqueeze(0) for g in columns[0]]
    return [torch.stack(col) for col in zip(*columns)]
