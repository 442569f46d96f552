"""Parameter blocks: the names ``blocks=`` of :func:`~curvature.sharpness` selects, one block per module or your own.

A block is a tuple of parameter names of the model (first names of tied weights), taken within the operator's
selection (``params=``); :func:`parameter_blocks` resolves a specification and names what it cannot find.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .operators.curvature import select_parameters

__all__ = ["ROOT_BLOCK", "parameter_blocks", "resolve_blocks"]

ROOT_BLOCK = "(model)"  # the name of the block of the parameters the model itself registers (not a submodule)


def parameter_blocks(model: nn.Module, blocks: Any, params: Any = None) -> dict[str, tuple[str, ...]]:
    """The parameter blocks ``blocks=`` of :func:`~curvature.sharpness` names: each block's parameter names.

    A selection by name takes the parameter of that name, or every parameter under the module of that name
    (``"encoder"`` and ``"encoder."`` take ``encoder.layer.weight``, never ``encoder2.weight``); a tied
    weight answers to each of its names and is reported under its first (``model.named_parameters()``).
    Only the parameters ``params`` selects (every trainable one by default) are taken; a selection that
    also covers frozen ones keeps the others. Blocks may overlap: a block for ``"encoder"`` next to one for
    ``"encoder.layers.0"`` is allowed (their traces then do not add up to the full trace). With
    ``"modules"``, a module used at two places, or a parameter registered by two modules, is counted once,
    at its first place, so those blocks partition the selection.

    Args:
        model: The model.
        blocks: True or ``"modules"``, ``"parameters"``, or a mapping from block names to selections (see
            :func:`~curvature.sharpness`); None or False give no blocks.
        params: The parameters of the operator (as in :func:`~curvature.sharpness`); None takes every trainable one.

    Returns:
        Block names to parameter names (in the model's order), in the order of the modules, the parameters or
        the mapping.

    Raises:
        ValueError: On an unknown string for ``blocks``, an empty mapping, or a selection that names no
            parameter or module of the model, holds a tensor or module that is not the model's, or leaves a
            block without a parameter that ``params`` selects (all of it frozen or left out).
        TypeError: On ``blocks`` of another type, a block name that is not a string, or a selection that is
            neither a name, a tensor, a module nor a list of these.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> parameter_blocks(model, "modules")
        {'0': ('0.weight', '0.bias'), '2': ('2.weight', '2.bias')}
        >>> parameter_blocks(model, {"weights": ["0.weight", model[2].weight], "last": "2."})
        {'weights': ('0.weight', '2.weight'), 'last': ('2.weight', '2.bias')}
    """
    names = [name for name, _ in select_parameters(model, params)]
    return resolve_blocks(model, blocks, names) if blocks is not None and blocks is not False else {}


def resolve_blocks(model: nn.Module, blocks: Any, selected: list[str], strip: str = "") -> dict[str, tuple[str, ...]]:
    """:func:`parameter_blocks` on the parameter names ``selected`` (an operator's ``param_names``).

    Args:
        model: The model.
        blocks: As for :func:`parameter_blocks` (not None or False).
        selected: The names blocks are taken within, in the model's order.
        strip: A prefix removed from the names the user gives (``"module."`` of a wrapped model).

    Returns:
        Block names to parameter names.
    """
    first = {id(p): name for name, p in model.named_parameters()}  # a tied weight's first name, as in the operator
    chosen = set(selected)
    if blocks is True or blocks == "modules":
        out: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        for path, module in model.named_modules():
            names = [first[id(p)] for _, p in module.named_parameters(recurse=False)]
            names = [n for n in dict.fromkeys(names) if n in chosen and n not in seen]
            seen.update(names)
            if names:
                out[path or ROOT_BLOCK] = tuple(n for n in selected if n in names)
        return out
    if blocks == "parameters":
        return {name: (name,) for name in selected}
    if isinstance(blocks, str):
        raise ValueError(f"blocks must be 'modules' or 'parameters' as a string, got {blocks!r}; for a block of "
                         f"your own pass a mapping, e.g. blocks={{{blocks!r}: {blocks!r}}}.")
    if not isinstance(blocks, Mapping):
        raise TypeError("blocks must be None, True, 'modules', 'parameters' or a mapping from block names to "
                        "parameter or module names, e.g. {'encoder': 'encoder', 'head': ['fc.weight', 'fc.bias']}; "
                        f"got {type(blocks).__name__}.")
    if not blocks:
        raise ValueError("blocks is an empty mapping; name at least one block, or pass None for no table.")
    out = {}
    for key, selection in blocks.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"blocks keys name the blocks and must be non-empty strings, got {key!r}.")
        names = _selected_names(model, key, selection, first, strip)
        kept = [n for n in selected if n in names]
        if not kept:
            raise ValueError(f"blocks[{key!r}] selects only {sorted(names)[:6]}, which are not measured (frozen, "
                             "requires_grad=False, or left out of params=); select trainable parameters.")
        out[key] = tuple(kept)
    return out


def _some(names: list[str], count: int = 8) -> str:
    """The first ``count`` names as a list, with ``...`` when there are more."""
    return f"{names[:count]}{' ...' if len(names) > count else ''}"


def _selected_names(model: nn.Module, key: str, selection: Any, first: dict[int, str], strip: str) -> set[str]:
    """The parameter names (first names of tied weights) of one block's selection, frozen ones included."""
    where = f"blocks[{key!r}]"
    items = [selection] if isinstance(selection, (str, torch.Tensor, nn.Module)) else selection
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{where} must be a parameter or module name, a parameter, a submodule or a list of "
                        f"these, got {type(selection).__name__}.") from None
    if not items:
        raise ValueError(f"{where} is empty; name its parameters or modules, e.g. {{{key!r}: 'encoder'}}.")
    every = [(name, first[id(p)]) for name, p in model.named_parameters(remove_duplicate=False)]
    names: set[str] = set()
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            item = item[1]  # a (name, parameter) pair of named_parameters(): its name may be a submodule's
        if isinstance(item, str):
            path = item.removeprefix(strip).rstrip(".")
            found = {name for alias, name in every if alias == path or alias.startswith(path + ".")} if path else set()
            if not found:
                modules = dict(model.named_modules())
                if path in modules:
                    raise ValueError(f"{where} names the module {item!r} ({type(modules[path]).__name__}), which has "
                                     "no parameters.")
                owners = [m for m, mod in modules.items() if m and next(mod.parameters(False), None) is not None]
                raise ValueError(f"{where} names {item!r}, which is neither a parameter nor a module of the model; "
                                 f"its modules with parameters are {_some(owners)}, its parameters "
                                 f"{_some([alias for alias, _ in every])}.")
            names |= found
        elif isinstance(item, torch.Tensor):
            if id(item) not in first:
                raise ValueError(f"{where} holds a tensor that is not a parameter of the model.")
            names.add(first[id(item)])
        elif isinstance(item, nn.Module):
            if not any(item is module for module in model.modules()):
                raise ValueError(f"{where} holds a module that is not a submodule of the model.")
            found = {first[id(p)] for p in item.parameters()}
            if not found:
                raise ValueError(f"{where} holds a module without parameters ({type(item).__name__}).")
            names |= found
        else:
            raise TypeError(f"{where} entries must be parameter or module names, parameters or submodules, got "
                            f"{type(item).__name__}; e.g. {{{key!r}: ['fc.weight', 'fc.bias']}} or {{{key!r}: 'fc'}}.")
    return names
