"""Modes switched for a block and restored: autograd, train/eval flags, TF32 and the attention backend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["autograd_enabled", "differentiable_attention", "eval_mode", "float32_precision", "recordable"]


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """Run the block with autograd recording, whatever the caller's mode, then restore the caller's mode.

    Curvature is made of derivatives, so every product, estimator, optimizer step and regularizer computes its
    autograd work inside this block: under ``torch.no_grad()`` and under ``torch.inference_mode()`` alike, the
    numbers are the ones computed outside them (without it, a product under inference mode records no graph
    and comes out as zeros). Tensors created under inference mode cannot enter a graph that is differentiated
    (PyTorch refuses to save them for backward); :func:`recordable` makes normal copies of them.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def recordable(t: torch.Tensor) -> torch.Tensor:
    """Return ``t``, or a normal copy of it if it is an inference tensor (made under ``torch.inference_mode()``).

    An inference tensor cannot be saved for backward or be given ``requires_grad``; a copy made outside
    inference mode can. Call it inside :func:`autograd_enabled`. Costs a copy only for inference tensors.

    Args:
        t: Any tensor.

    Returns:
        A tensor with the same values that autograd can record.
    """
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


@contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put every module of ``model`` in eval mode for the block, then restore each module's own flag.

    ``model.train()`` afterwards would not do: it sets every submodule to train mode, also those the user had in
    eval mode (a frozen backbone, say). With ``enabled=False`` the block runs with the modes unchanged.

    Args:
        model: The model.
        enabled: Switch to eval mode (True) or leave the modes alone (False).
    """
    modes = [(module, module.training) for module in model.modules()]
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _tf32_slots() -> list[object]:
    backends = torch.backends
    return [backends.cuda.matmul, backends.cudnn.conv, backends.cudnn.rnn]


@contextmanager
def float32_precision(device: torch.device, dtype: torch.dtype, allow_tf32: bool) -> Iterator[None]:
    """Run the block with TensorFloat-32 on or off for float32 CUDA matmuls and convolutions, then restore.

    PyTorch lets cuDNN convolutions use TF32 by default, which rounds float32 inputs to a 10-bit mantissa
    (relative errors near 1e-3 in a curvature product); curvature products use full float32 unless the
    user opts in. Only the flags' values are swapped, through the API that this PyTorch offers (the
    ``fp32_precision`` attributes, or the older ``allow_tf32`` flags), so the user's own settings return
    unchanged on exit. Other devices and dtypes run the block as it is. With the ``fp32_precision`` API
    (PyTorch 2.9 and later), PyTorch's legacy getters (``torch.backends.cudnn.allow_tf32``,
    ``torch.get_float32_matmul_precision()``) may raise about "a mix of the legacy and new APIs" inside the
    block, so a model should not read them in its forward pass; outside the block they read as before.

    Args:
        device: The device of the products.
        dtype: Their dtype.
        allow_tf32: Whether TF32 may be used.
    """
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    slots = _tf32_slots()
    if hasattr(slots[0], "fp32_precision"):
        names, value = ["fp32_precision"] * len(slots), "tf32" if allow_tf32 else "ieee"
    else:  # PyTorch before 2.9
        slots, names, value = [torch.backends.cuda.matmul, torch.backends.cudnn], ["allow_tf32"] * 2, allow_tf32
    saved = [getattr(slot, name) for slot, name in zip(slots, names)]
    try:
        for slot, name in zip(slots, names):
            setattr(slot, name, value)
        yield
    finally:
        for slot, name, old in zip(slots, names, saved):
            setattr(slot, name, old)


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run the block with ``F.scaled_dot_product_attention`` on its math backend, then restore the choice.

    The fused attention kernels (flash and memory-efficient, on CPU and CUDA) have a backward pass that
    cannot be differentiated again and no forward-mode rule, so a Hessian or Gauss-Newton product through a
    model that calls ``scaled_dot_product_attention`` fails with "derivative for
    aten::_scaled_dot_product_flash_attention..._backward is not implemented". The math backend computes the
    same function from differentiable operations: curvature products run their forward passes with it.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older PyTorch without the context: leave the choice to it
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
