"""The check that the user's data, model and loss fit: one pass over every batch before any measurement."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch import nn

from .._func import call_model
from ..operators.data import batch_size, is_single_batch
from .errors import UsageError, _describe, _one_line


@contextlib.contextmanager
def _warnings_unless_failing() -> Iterator[None]:
    """Hold back the warnings of a block; show them only if it succeeds (a failure's error says it all)."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _check_fit(model: nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, hide_bars: bool) -> dict[str, Any]:
    """Run the model and the loss over every batch once: count samples, average the loss, catch misfits."""
    from tqdm.auto import tqdm

    total, num_samples, index = 0.0, 0, -1
    batches = iter([data] if is_single_batch(data) else data)
    with torch.no_grad(), tqdm(desc="checking data", unit="batch", delay=2.0, disable=hide_bars, leave=False) as bar:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as error:
                raise UsageError(f"--data: iterating over the data raised {_describe(error)}") from error
            index += 1
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UsageError(f"--data: batch {index} is a {type(batch).__name__}, not an (inputs, targets) pair.")
            inputs, targets = batch
            try:
                n = batch_size(inputs)
            except ValueError as error:
                raise UsageError(f"--data: batch {index}: {_one_line(str(error))}") from error
            try:
                with _warnings_unless_failing():
                    outputs = call_model(model, inputs)  # as the operators call it
            except Exception as error:
                raise UsageError(
                    f"the data does not fit the model: the forward pass on batch {index} raised {_describe(error)}"
                ) from error
            try:
                with _warnings_unless_failing():
                    loss = loss_fn(outputs, targets)
                    scalar = not isinstance(loss, torch.Tensor) or loss.numel() == 1
                    value = float(loss) if scalar else math.nan
            except Exception as error:
                shapes = ", ".join(
                    f"{name} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                    for name, t in (("outputs", outputs), ("targets", targets))
                )
                raise UsageError(
                    f"the loss does not fit the model's outputs and the targets on batch {index} ({shapes}): "
                    f"{_describe(error)}"
                ) from error
            if not scalar:
                raise UsageError(
                    f"the loss returned a tensor of shape {tuple(loss.shape)} on batch {index}, not a scalar: the loss "
                    "must reduce the batch to a scalar with reduction 'mean' or 'sum', e.g. "
                    "torch.nn.functional.cross_entropy(outputs, targets) (reduction='mean')."
                )
            total, num_samples = total + value * n, num_samples + n
            bar.update()
    if index < 0:
        raise UsageError("--data: the data holds no batch.")
    return {"num_samples": num_samples, "num_batches": index + 1, "loss": total / max(num_samples, 1)}
