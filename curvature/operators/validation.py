"""The checks that run before and during products: the first batch, the batching, each later batch, each vector.

:class:`_BatchValidation` is the part of :class:`~curvature.operators.curvature.CurvatureOperator` that refuses,
before any real work, a model or loss whose curvature would be random, undefined or dependent on how the data is
batched (docs/reliability.md lists every case), agrees on the outcome across the ranks of a process group, and
checks each later batch and each vector as the products reach them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_finite
from .._func import model_outputs
from .data import batch_size, split_batch
from .guards import batch_error, check_batch_statistics, rng_state
from .losses import check_additive, infer_reduction, known_count

__all__: list[str] = []  # the mixin _BatchValidation is the operator base class's own


class _BatchValidation:
    """Validation of the model, the loss and the data, before and during products.

    A mixin of :class:`~curvature.operators.curvature.CurvatureOperator`: it uses the operator's model, loss,
    data, reduction and process-group state, and its ``_prepare_batch``, ``_state``, ``_forward``,
    ``_batch_weight`` and ``_rng_preserved``.
    """

    def _validate(self) -> None:
        if self._shards is None:
            self._validate_first_batch()
        else:
            self._validate_on_every_rank()

    def _validate_on_every_rank(self) -> None:
        """Validate each rank's first batch, then agree: every rank raises if any rank failed.

        One small all-reduce at construction, so that a bad shard on one rank raises everywhere instead of
        leaving the other ranks waiting in the first product's all-reduce. A rank with an empty shard
        passes; the ranks must agree on the reduction and the number of parameters.

        Raises:
            ValueError: If this rank's checks fail (its own error), another rank's did, every shard is
                empty, or the ranks disagree on the reduction or the parameter count.
        """
        error: Exception | None = None
        has_data = False
        try:  # any error, so that no rank is left waiting in the all-reduce below
            with self._rng_preserved():
                has_data = any(batch_size(inputs) > 0 for inputs, _ in self._data)
            if has_data:
                self._validate_first_batch()
        except Exception as err:
            error = err
        reduction = {None: 0, "mean": 1, "sum": 2}[self.reduction]
        table = self._shards.gather_rows(
            [float(error is not None), float(has_data), float(reduction), float(self.shape[0])], self.device)
        if error is not None:
            raise error
        failed = [r for r in range(len(table)) if table[r, 0]]
        if failed:
            raise ValueError(f"building the curvature operator failed on rank(s) {failed} of the process group; "
                             "see the error raised there.")
        if not table[:, 1].any():
            raise ValueError("data is empty on every rank of the process group: no rank yielded a batch.")
        if len(set(table[:, 3].tolist())) > 1:
            counts = sorted({int(n) for n in table[:, 3].tolist()})
            raise ValueError(f"the ranks' models have different numbers of selected parameters {counts}; every "
                             "rank must hold the same model.")
        known = {int(c) for c in table[:, 2].tolist()} - {0}
        if len(known) > 1:
            raise ValueError("the ranks inferred different reductions for loss_fn; pass reduction='mean' or 'sum'.")
        if not known:
            raise ValueError("cannot tell whether loss_fn averages or sums over a batch on any rank; pass "
                             "reduction='mean' or reduction='sum'.")
        self.reduction = {1: "mean", 2: "sum"}[known.pop()]

    def _validate_first_batch(self) -> None:
        versions_before = self._versions()
        buffers_before = {n: b.clone() for n, b in self.model.named_buffers()}
        with self._rng_preserved():  # the global RNG is restored on the way out, whatever happens
            first = self._data.first()
            self._data.check_fixed(first)
            inputs, targets = self._prepare_batch(*first)
            rng_before = rng_state(self.device)
            with torch.no_grad():
                outputs = self._forward("the first batch of data", self._state(), inputs)
            draws_random = any(not torch.equal(a, b) for a, b in zip(rng_before, rng_state(self.device)))
        if draws_random:
            raise ValueError(
                "the model's forward pass draws random numbers, so its curvature would be random; make it "
                "deterministic (model.eval(), no noise layers) before building a curvature operator."
            )
        if self._versions() != versions_before:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(buffers_before[name])
            raise ValueError(
                "the model's forward pass modifies its parameters or buffers (running statistics?); call "
                "model.eval() so that computing curvature leaves the model unchanged."
            )
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(outputs).__name__}.")
        if not outputs.is_floating_point():
            raise TypeError(f"the model returned {outputs.dtype} outputs; curvature needs floating-point outputs.")
        if outputs.ndim and outputs.shape[0] == 0:
            raise ValueError("the first batch of data holds no samples.")
        self._loss_object.check_targets(outputs, targets)
        callable_loss = self._loss_object.kind == "other"  # no closed form: counts and reduction from the loss
        if self.reduction == "mean" and not callable_loss and self._batch_weight(targets, inputs, outputs) == 0:
            raise ValueError("every target of the first batch is ignored (ignore_index), so its mean loss is 0/0.")
        with torch.no_grad():
            try:
                loss = self.loss_fn(outputs, targets)
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise batch_error(err, "the first batch of data: loss_fn(outputs, targets) raised") from err
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}.")
        if not loss.is_floating_point():
            raise TypeError(
                f"loss_fn returned a {loss.dtype} tensor; curvature needs a floating-point loss (one that can be "
                "differentiated), e.g. without .long(), .argmax() or a count."
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}; reduce the batch with "
                "'mean' or 'sum'."
            )
        check_finite(loss, "the loss on the first batch", "check the model's outputs and the data for NaN/Inf.")
        if self.reduction is None:
            inferred = infer_reduction(self.loss_fn, outputs, targets) if callable_loss else None
            if inferred is None and not self._data.single:
                raise ValueError(
                    "cannot tell whether loss_fn averages or sums over a batch (the first batch has one "
                    "sample); pass reduction='mean' or reduction='sum'."
                )
            self.reduction = inferred or "mean"
        if self.reduction == "mean" and callable_loss and self._batch_weight(targets, inputs, outputs) == 0:
            raise ValueError("the first batch's count (loss_fn.normalizer) is 0, so its mean loss is 0/0.")
        if not self._data.single or self._shards is not None:  # several batches: the batching must not matter
            self._check_samples_independent(inputs, outputs)
            if callable_loss and self._weights_by_loss:
                check_additive(self.loss_fn, outputs, targets, inputs, self.reduction, "the first batch of data")
                if self.reduction == "mean" and not known_count(self.loss_fn):
                    self._sample_shape = tuple(outputs.shape[1:])

    def _check_samples_independent(self, inputs: Any, outputs: torch.Tensor) -> None:
        """Refuse a model whose outputs for a sample depend on the other samples of its batch.

        Such a model (a layer with batch statistics, attention across the batch) has a curvature that depends on
        how the data is batched, which an operator over several batches must not. Batch-norm layers without
        running statistics are refused by name (:func:`check_batch_statistics`); for any other model the first
        half of the first batch is run alone (no graph) and its outputs compared with the first half of the whole
        batch's, to the rounding of the dtype. Inputs that are not batch-first (a sequence-first transformer or
        RNN) show the same dependence along their first dimension and are refused too: nothing tells them apart
        from a model that mixes the samples of a batch, and accepting one of those would be silently wrong. A batch
        that cannot be split, or a model that cannot take half of it, is not checked.

        Raises:
            ValueError: If the outputs differ.
        """
        check_batch_statistics(self.model)
        change = self._half_batch_change(inputs, outputs)
        if change is None or change[0] <= change[1]:
            return
        n = outputs.shape[0]
        raise ValueError(
            f"the model's outputs for the first {n // 2} samples of the first batch change (by {change[0]:.3g}, "
            f"allowed {change[1]:.3g}) when the rest of the batch is left out: a sample's outputs depend on the "
            "other samples of its batch (a layer with batch statistics, attention across the batch, or inputs "
            "that are not batch-first, such as nn.Transformer or nn.LSTM without batch_first=True), so the "
            "curvature over several batches would depend on how the data is batched. Pass the data as one "
            "(inputs, targets) batch, or make the samples independent along the first dimension (batch_first=True, "
            "eval-mode normalization with running statistics)."
        )

    def _half_batch_change(self, inputs: Any, outputs: torch.Tensor) -> tuple[float, float] | None:
        """How much the first half of the batch changes when run alone: ``(change, allowed)``.

        None when the batch cannot be split by samples or the model cannot take the half.
        """
        if outputs.ndim == 0:
            return None
        n = outputs.shape[0]
        ok, part = split_batch(inputs, 0, n // 2, n)
        if n < 2 or not ok:
            return None
        try:
            with torch.no_grad(), self._rng_preserved():
                alone = model_outputs(self.model, self._state(), part)
        except (RuntimeError, ValueError, TypeError, IndexError):  # the model needs the whole batch: cannot tell
            return None
        together = outputs[: n // 2]
        if not isinstance(alone, torch.Tensor) or alone.shape != together.shape:
            return None
        change = float((alone - together).abs().max())
        if not math.isfinite(change):
            return None
        return change, math.sqrt(torch.finfo(outputs.dtype).eps) * float(together.abs().max())

    def _check_batch(self, index: int, outputs: torch.Tensor, targets: Any, inputs: Any) -> None:
        """The per-batch checks of a product: targets against outputs; the loss's weighting, once per batch."""
        where = f"batch {index} of data"
        if self._loss_object.kind != "other":
            try:
                self._loss_object.check_targets(outputs, targets)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}: {err}") from err
            return
        if self._sample_shape is not None and tuple(outputs.shape[1:]) != self._sample_shape:
            raise ValueError(
                f"{where} has outputs of {tuple(outputs.shape[1:])} per sample where the first batch had "
                f"{self._sample_shape}: loss_fn may average over entries rather than samples, and the operator "
                "weights each batch by its number of samples, which would then be wrong (7% off on sequences of "
                "2 and 9 tokens). Say what loss_fn divides by: curvature.NormalizedLoss(loss_fn, normalizer=lambda "
                "outputs, targets: outputs.shape[0]) for a mean over samples, or normalizer=lambda outputs, "
                "targets: outputs.numel() (or the tokens that count) for a mean over entries."
            )
        if (self.verify and self._weights_by_loss and index not in self._additive
                and (not self._data.single or self._shards is not None)):
            check_additive(self.loss_fn, outputs.detach(), targets, inputs, self.reduction, where)
            self._additive.add(index)

    def _check_totals(self, weight_sum: float, batches: float, where: str) -> None:
        if not batches:
            raise ValueError(f"data is empty{where}: it yielded no (inputs, targets) batch.")
        if self.reduction == "mean" and weight_sum == 0:
            raise ValueError(f"every target in the data{where} is ignored (ignore_index, or a normalizer of 0), so "
                             "the mean loss is undefined.")

    def _check_vector(self, V: torch.Tensor) -> None:
        """With ``verify``, refuse a NaN or Inf in ``V`` before the product, so that it is not blamed on the model.

        In a process group it runs inside the product's error handling: a rank whose vector is not finite joins the
        all-reduce with its failure flag, and the others raise naming it instead of waiting for it.
        """
        if self.verify:
            check_finite(V, "the vector multiplied by the operator",
                         "pass a finite vector (the NaN or Inf is in v, not in the model or the data).")
