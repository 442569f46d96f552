"""Argument validation shared by every entry point.

Each check raises a ``ValueError`` or ``TypeError`` whose message names the argument and says how to
fix it. Checks run before any expensive work starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_count",
    "check_finite",
    "check_generator",
    "check_operand",
    "check_scalar",
    "check_uses_params",
    "common_dtype_device",
    "no_graph_reason",
]


def common_dtype_device(tensors: list[torch.Tensor], what: str) -> tuple[torch.dtype, torch.device]:
    """Return the one floating dtype and device shared by ``tensors``.

    Args:
        tensors: Non-empty list of tensors (typically parameters).
        what: How to name the tensors in an error message.

    Returns:
        The common ``(dtype, device)``.

    Raises:
        TypeError: If the tensors are not floating point or their dtypes differ.
        ValueError: If they live on different devices.
    """
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(
            f"{what} have mixed dtypes {sorted(str(d) for d in dtypes)}; convert the model to one dtype "
            "first, e.g. model.double() or model.float()."
        )
    if len(devices) != 1:
        raise ValueError(
            f"{what} live on several devices {sorted(str(d) for d in devices)}; move the model to one "
            "device first, e.g. model.to('cuda')."
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise TypeError(f"{what} must be floating point, got {dtype}.")
    return dtype, devices.pop()


def check_operand(v: Any, size: int, dtype: torch.dtype, device: torch.device, name: str = "v") -> None:
    """Check that ``v`` can be multiplied by a ``(size, size)`` operator.

    Args:
        v: The candidate vector ``(size,)`` or matrix ``(size, k)``.
        size: The operator's number of columns.
        dtype: The operator's dtype.
        device: The operator's device.
        name: The argument's name for error messages.

    Raises:
        TypeError: If ``v`` is not a tensor or has the wrong dtype.
        ValueError: If ``v`` has the wrong shape or lives on another device.
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape ({size},) or ({size}, k), got {type(v).__name__}; "
            "convert numpy arrays with torch.as_tensor, or use op.to_scipy() for a scipy operator."
        )
    if v.ndim not in (1, 2) or v.shape[0] != size:
        raise ValueError(
            f"{name} has shape {tuple(v.shape)}, but the operator needs ({size},) or ({size}, k); "
            "flatten per-parameter tensors with torch.nn.utils.parameters_to_vector."
        )
    if v.dtype != dtype:
        raise TypeError(f"{name} has dtype {v.dtype} but the operator has dtype {dtype}; use {name}.to({dtype}).")
    if v.device != device:
        raise ValueError(
            f"{name} is on {v.device} but the operator is on {device}; use {name}.to('{device}')."
        )


def check_scalar(value: Any, name: str) -> float:
    """Return ``value`` as a Python float, refusing tensors with more than one element and non-numbers.

    Args:
        value: A Python number or a one-element tensor.
        name: The argument's name for error messages.

    Returns:
        The value as a float.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is NaN or infinite.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    return float(value)


def check_finite(t: torch.Tensor, what: str, hint: str) -> None:
    """Raise if ``t`` holds NaN or Inf.

    Args:
        t: The tensor to check.
        what: What ``t`` is, for the message.
        hint: What the user can do about it.

    Raises:
        ValueError: If any entry is not finite.
    """
    # A NaN or Inf entry makes the sum non-finite, so a finite sum proves every entry finite (one cheap
    # reduction); only a non-finite sum, which plain overflow can also cause, needs the entrywise check.
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return
    raise ValueError(f"{what} contains NaN or Inf; {hint}")


def check_generator(generator: Any, name: str = "generator") -> None:
    """Check that ``generator`` is None or a ``torch.Generator``.

    Args:
        generator: The candidate.
        name: The argument's name for error messages.

    Raises:
        TypeError: If it is anything else (an int seed, say).
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator or None, got {type(generator).__name__}; "
            f"for a seed s use torch.Generator().manual_seed(s)."
        )


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int at least ``minimum``.

    Raises:
        TypeError: If it is not an integer.
        ValueError: If it is smaller than ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def check_uses_params(unused: Sequence[bool], what: str = "the loss", name: str = "params") -> None:
    """The regularizers' rule for parameters a loss does not use: refuse a loss that uses none of them.

    ``hessian_trace_penalty``, ``hessian_alignment_penalty``, ``gradient_norm_penalty`` /
    ``GradientRegularization`` and ``SAM`` all follow it. A loss that depends on none of the parameters it is
    regularized over has a penalty of exactly 0 and a zero gradient, which hides a mistake (the parameters of
    another model, or of a copy of the model), so it is refused. Parameters that only part of the loss
    leaves unused get zero gradient and zero curvature, and a loss that is linear in the parameters (a zero
    Hessian) is no error: both depend on the parameters.

    Args:
        unused: For each parameter, whether the loss's autograd graph does not reach it (its gradient from
            ``torch.autograd.grad(..., allow_unused=True)`` is None).
        what: How to name the loss in the message.
        name: The argument that holds the parameters.

    Raises:
        ValueError: If there are parameters and the loss uses none of them.
    """
    if unused and all(unused):
        raise ValueError(
            f"{what} does not depend on any of {name}; pass the parameters it is computed from (e.g. "
            "model.parameters()), not those of another model or of a copy of it."
        )


def no_graph_reason(t: Any = None) -> str:
    """Say why a tensor that should carry an autograd graph has none, naming the mode that caused it.

    Args:
        t: The tensor without a graph (a loss, outputs), or None.

    Returns:
        A sentence for an error message: inference mode when ``t`` is an inference tensor or inference mode is
        on, ``torch.no_grad()`` when gradients are off, else a detach inside the computation.
    """
    if isinstance(t, torch.Tensor) and t.is_inference():
        return ("it was computed under torch.inference_mode(), whose tensors can never be differentiated; compute "
                "it outside inference mode (or inside `with torch.inference_mode(False):`)")
    if torch.is_inference_mode_enabled():
        return ("this runs under torch.inference_mode(), which records no graph; call it outside inference mode "
                "(or inside `with torch.inference_mode(False):`)")
    if not torch.is_grad_enabled():
        return "it was computed under torch.no_grad(); compute it with gradients enabled"
    return "a .detach(), .item() or torch.no_grad() inside the computation cuts the graph"
