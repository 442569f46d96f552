r"""What the operators need to know about a loss function, in closed form where it exists.

For ``torch.nn.MSELoss`` and ``torch.nn.CrossEntropyLoss`` a batch loss is
:math:`L = c \sum_u \ell_u(z_u)` over *units* ``u`` (output entries for MSE, positions for CE), with
:math:`c = 1` for ``reduction="sum"`` and :math:`c = 1/\text{count}` for ``"mean"``. This module gives:

* :func:`mean_count`: the ``count`` that ``"mean"`` divides by (used to weight uneven batches); a callable
  loss reports its own with a ``normalizer(outputs, targets)`` method (:class:`NormalizedLoss`), and
  :func:`check_additive` tests on a batch that the count it uses is the loss's;
* :func:`output_hessian`: :math:`U \mapsto \nabla^2_z L\, U` in closed form (MSE: :math:`2cI`; CE:
  :math:`c\,w_u(\operatorname{diag} p_u - p_u p_u^\top)` per position), or by autodiff for any other loss;
* :func:`sampled_output_gradients`: gradients of the negative log-likelihood at targets drawn from the
  model's predictive distribution (Monte-Carlo Fisher);
* :func:`per_sample_losses`: the loss of each sample alone (empirical Fisher).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from .._checks import no_graph_reason
from .._modes import autograd_enabled, recordable

__all__ = [
    "NormalizedLoss",
    "check_additive",
    "loss_kind",
    "mean_count",
    "output_hessian",
    "per_sample_losses",
    "resolve_reduction",
    "sampled_output_gradients",
]

Reduction = Literal["mean", "sum"]
Kind = Literal["mse", "ce", "other"]


class NormalizedLoss:
    r"""A mean loss that reports the count it divides by, so that any batching gives the same operator.

    The operators weight each batch's curvature by its share of the normalizer of a mean loss. For
    ``torch.nn`` losses that count is known (samples, output entries, non-ignored targets); for any other
    callable it is assumed to be the number of samples, which is wrong for a loss that averages over a count
    that varies between batches, such as a language-model cross-entropy over the tokens that are not padding:

    .. math:: L_b = \frac{1}{C_b} \sum_{t \in b} \ell_t, \qquad
              L = \frac{\sum_b C_b L_b}{\sum_b C_b} \quad (\text{not } \tfrac{\sum_b N_b L_b}{\sum_b N_b}).

    Wrapping the callable with its count ``C_b`` makes every batching exact. Any callable that has a
    ``normalizer(outputs, targets)`` method is read the same way; this class adds one to a plain function.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the mean of per-unit losses over the batch's units.
        normalizer: ``normalizer(outputs, targets)``, the number (or total weight) of units that ``loss_fn``
            divides by for that batch: a number or a 0-d tensor, non-negative.

    Example:
        >>> def lm_loss(logits, labels):  # shifted next-token cross-entropy, padding labelled -100
        ...     return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        >>> loss_fn = NormalizedLoss(lm_loss, lambda logits, labels: (labels[:, 1:] != -100).sum())
        >>> labels = torch.tensor([[1, 2, -100], [0, 1, 2]])
        >>> float(loss_fn.normalizer(torch.zeros(2, 3, 4), labels))
        3.0
    """

    reduction = "mean"

    def __init__(self, loss_fn: Callable[..., torch.Tensor], normalizer: Callable[..., Any]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        if not callable(normalizer):
            raise TypeError(
                f"normalizer must be callable as normalizer(outputs, targets), got {type(normalizer).__name__}; "
                "e.g. lambda outputs, targets: (targets != -100).sum()."
            )
        self.loss_fn = loss_fn
        self._normalizer = normalizer

    def __call__(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """The loss of the batch."""
        return self.loss_fn(outputs, targets)

    def normalizer(self, outputs: torch.Tensor, targets: Any) -> Any:
        """The count the batch's mean divides by."""
        return self._normalizer(outputs, targets)

    def __repr__(self) -> str:
        return f"NormalizedLoss({getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def has_normalizer(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` reports its mean's count through a ``normalizer(outputs, targets)`` method."""
    return callable(getattr(loss_fn, "normalizer", None))


def reported_count(loss_fn: Any, outputs: torch.Tensor, targets: Any) -> float:
    """Call ``loss_fn.normalizer(outputs, targets)`` and check that it is a finite non-negative number.

    Raises:
        TypeError: If it returns something other than a real number or a one-element tensor.
        ValueError: If the count is negative or not finite.
    """
    value = loss_fn.normalizer(outputs, targets)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"loss_fn.normalizer must return one number, got a tensor of shape {tuple(value.shape)}.")
        value = value.detach().double().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"loss_fn.normalizer must return a number (the count its mean divides by), got "
                        f"{type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"loss_fn.normalizer returned {value}; the count a mean divides by is finite and >= 0.")
    return float(value)


# torch.nn losses whose reduction="mean" divides by the number of entries of the elementwise loss.
_ENTRY_MEANS = (nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss, nn.SoftMarginLoss,
                nn.PoissonNLLLoss, nn.HingeEmbeddingLoss)


def averages_entries(loss_fn: Any) -> bool:
    """Whether ``loss_fn`` is a ``torch.nn`` loss whose mean is over every entry (not over samples)."""
    if isinstance(loss_fn, nn.KLDivLoss):
        return loss_fn.reduction == "mean"
    return isinstance(loss_fn, _ENTRY_MEANS)


def known_count(loss_fn: Any) -> bool:
    """Whether the count a mean divides by is known for ``loss_fn``: a reported normalizer or a ``torch.nn`` loss.

    For any other callable the operators assume the batch size and check it where they can.
    """
    return has_normalizer(loss_fn) or averages_entries(loss_fn) or isinstance(loss_fn, (nn.NLLLoss, nn.KLDivLoss))


def loss_kind(loss_fn: Callable[..., torch.Tensor]) -> Kind:
    """Classify ``loss_fn`` as MSE, cross-entropy, or any other callable.

    Args:
        loss_fn: The loss.

    Returns:
        ``"mse"``, ``"ce"`` or ``"other"``.
    """
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "ce"
    return "other"


def resolve_reduction(loss_fn: Callable[..., torch.Tensor], reduction: str | None) -> Reduction | None:
    """Return the loss's batch reduction: the explicit argument, else ``loss_fn.reduction``, else None.

    Args:
        loss_fn: The loss.
        reduction: What the user passed (None to infer).

    Returns:
        ``"mean"``, ``"sum"``, or None when it has to be inferred from data.

    Raises:
        ValueError: If the reduction is not ``"mean"`` or ``"sum"``, or contradicts ``loss_fn.reduction``.
    """
    attribute = getattr(loss_fn, "reduction", None)
    if attribute == "batchmean":  # KLDivLoss: the sum divided by the batch size, a mean over samples
        attribute = "mean"
    if attribute is None and has_normalizer(loss_fn):  # a loss that reports its mean's count is a mean
        attribute = "mean"
    if reduction is None:
        reduction = attribute
    elif attribute is not None and attribute != reduction:
        raise ValueError(f"reduction={reduction!r} contradicts loss_fn.reduction={attribute!r}; drop the argument.")
    if reduction is None:
        return None
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"the loss must reduce the batch to a scalar with reduction 'mean' or 'sum', got {reduction!r}; "
            "e.g. use torch.nn.CrossEntropyLoss(reduction='mean')."
        )
    return reduction  # type: ignore[return-value]


def check_targets(kind: Kind, loss_fn: Any, outputs: torch.Tensor, targets: Any) -> None:
    """Refuse targets that do not match the outputs (where the loss would broadcast or fail cryptically).

    Args:
        kind: The loss kind.
        loss_fn: The loss.
        outputs: The model's outputs for the batch.
        targets: The batch's targets.

    Raises:
        ValueError: On a shape mismatch or class index out of range.
        TypeError: On a target dtype that the loss cannot use.
    """
    if kind == "other":
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor for {type(loss_fn).__name__}, got {type(targets).__name__}.")
    if kind == "mse":
        if targets.shape != outputs.shape:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match outputs of shape {tuple(outputs.shape)}; "
                "MSELoss would broadcast them silently. Reshape the targets (e.g. y.view_as(outputs))."
            )
        if targets.dtype != outputs.dtype:
            raise TypeError(f"targets have dtype {targets.dtype} but outputs {outputs.dtype}; convert them.")
        return
    if outputs.ndim < 2:
        raise ValueError(
            f"CrossEntropyLoss outputs must be batched logits (N, C) or (N, C, d1, ...), got shape "
            f"{tuple(outputs.shape)}; add a batch dimension with unsqueeze(0)."
        )
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ValueError(
                f"class-probability targets of shape {tuple(targets.shape)} do not match logits of shape "
                f"{tuple(outputs.shape)}."
            )
        return
    if targets.dtype != torch.long:
        raise TypeError(
            f"class-index targets must have dtype torch.int64, got {targets.dtype}; use targets.long()."
        )
    expected = (outputs.shape[0], *outputs.shape[2:])
    if tuple(targets.shape) != expected:
        raise ValueError(
            f"class-index targets of shape {tuple(targets.shape)} do not match logits of shape "
            f"{tuple(outputs.shape)}; expected targets of shape {expected}."
        )
    valid = targets[targets != loss_fn.ignore_index]
    num_classes = outputs.shape[1]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"class-index targets must lie in [0, {num_classes}), got values in "
            f"[{int(valid.min())}, {int(valid.max())}]."
        )


def _ce_position_weights(
    loss_fn: nn.CrossEntropyLoss | nn.NLLLoss, targets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    r"""Per-position factor ``w_u`` of the cross-entropy Hessian, shape ``(N, d1, ...)``.

    For the loss :math:`-\sum_c w_c q_c \log p_c` with target distribution :math:`q` (after label
    smoothing) and class weights :math:`w` (ones by default) the Hessian in the logits is
    :math:`(\sum_c w_c q_c)(\operatorname{diag} p - p p^\top)`. For class indices without weights that
    factor is 1 (0 at ignored positions); for probability targets it is their (weighted) sum, which is
    not 1 for unnormalized or masked (all-zero) targets. ``NLLLoss`` (class indices only) shares the
    index path, which is also its mean normalizer.
    """
    if targets.is_floating_point():
        smoothing = loss_fn.label_smoothing
        q = targets.to(dtype)
        if smoothing > 0:
            q = q * (1 - smoothing) + smoothing / targets.shape[1]
        if loss_fn.weight is not None:
            q = q * loss_fn.weight.to(dtype).view([1, -1] + [1] * (targets.ndim - 2))
        return q.sum(1)
    mask = targets != loss_fn.ignore_index
    if loss_fn.weight is None:
        return mask.to(dtype)
    return loss_fn.weight.to(dtype)[targets.clamp(min=0)] * mask


def mean_count(kind: Kind, loss_fn: Any, targets: Any, inputs: Any, outputs: torch.Tensor | None = None) -> float:
    """Return what ``reduction="mean"`` divides the batch's summed loss by.

    MSE: the number of output entries (targets match the outputs' shape). CE: the number of non-ignored
    positions, or the sum of their class weights when ``weight=`` is set (as PyTorch defines it);
    ``N * d1 * ...`` for probability targets. ``NLLLoss``: as CE. The other ``torch.nn`` losses that average
    over every entry (``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``, ``BCELoss``, ``BCEWithLogitsLoss``,
    ``SoftMarginLoss``, ``PoissonNLLLoss``, ``HingeEmbeddingLoss``, ``KLDivLoss(reduction="mean")``): the
    number of entries. Any other loss: what its ``normalizer(outputs, targets)`` method reports
    (:class:`NormalizedLoss`), else the batch size, which is exact for losses that average over samples (or
    over a fixed number of entries per sample). A custom loss that averages over a count that varies between
    batches without reporting it is caught where it can be: within a batch by :func:`check_additive`, and
    between batches by the operators, which refuse batches whose outputs have different shapes per sample.

    Args:
        kind: The loss kind.
        loss_fn: The loss.
        targets: The batch's targets.
        inputs: The batch's inputs.
        outputs: The batch's outputs (for a ``normalizer``; may be None for the built-in kinds).

    Returns:
        The count, as a float.
    """
    from .data import batch_size

    if kind == "other" and has_normalizer(loss_fn) and outputs is not None:
        return reported_count(loss_fn, outputs, targets)
    if averages_entries(loss_fn):
        shape = outputs.shape if outputs is not None else targets.shape
        if isinstance(targets, torch.Tensor) and outputs is not None:
            shape = torch.broadcast_shapes(outputs.shape, targets.shape)
        return float(math.prod(shape))
    if kind == "mse":
        return float(targets.numel())
    if kind == "ce":
        if targets.is_floating_point():
            return float(targets.numel() // targets.shape[1])
        return float(_ce_position_weights(loss_fn, targets, torch.float64).sum())
    if isinstance(loss_fn, nn.NLLLoss) and isinstance(targets, torch.Tensor):  # class indices, as for CE
        return float(_ce_position_weights(loss_fn, targets, torch.float64).sum())
    return float(batch_size(inputs))


def output_hessian(
    kind: Kind, loss_fn: Any, outputs: torch.Tensor, targets: Any, reduction: Reduction
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""Return :math:`U \mapsto \nabla^2_z L(z)\, U` for the batch loss, for ``U`` of shape ``(k, *z.shape)``.

    Closed form for MSE (:math:`2c\,U`) and CE (per position :math:`c\,w_u (p_u \odot U_u - p_u\,
    p_u^\top U_u)`, with :math:`p_u` the softmax over the class dimension); any other loss by a
    Hessian-vector product of ``loss_fn`` in output space.

    Args:
        kind: The loss kind.
        loss_fn: The loss.
        outputs: The batch's outputs ``z``.
        targets: The batch's targets.
        reduction: The loss's batch reduction.

    Returns:
        The map ``U -> H U``.
    """
    z = outputs.detach()
    if kind == "mse":
        scale = 2.0 / z.numel() if reduction == "mean" and z.numel() else 2.0
        return lambda U: scale * U
    if kind == "ce":
        weights = _ce_position_weights(loss_fn, targets, z.dtype)
        count = mean_count(kind, loss_fn, targets, None)
        if reduction == "mean" and count > 0:  # a batch with every target ignored has zero curvature
            weights = weights / count
        p = torch.softmax(z, dim=1).unsqueeze(0)
        w = weights.unsqueeze(1).unsqueeze(0)

        def ce_hessian(U: torch.Tensor) -> torch.Tensor:
            pU = p * U
            return w * (pU - p * pU.sum(dim=2, keepdim=True))

        return ce_hessian

    def autodiff_hessian(U: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = z.clone().requires_grad_(True)
            loss = loss_fn(leaf, targets)
            if not loss.requires_grad:
                raise ValueError(
                    f"the loss does not depend on the model's outputs: {no_graph_reason(loss)}; curvature needs it "
                    "differentiable."
                )
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            if not g.requires_grad:  # the loss is linear in the outputs
                return torch.zeros_like(U)
            return torch.stack([torch.autograd.grad(g, leaf, u, retain_graph=True)[0] for u in U])

    return autodiff_hessian


def sampled_output_gradients(
    kind: Kind, loss_fn: Any, outputs: torch.Tensor, targets: Any, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    r"""Gradients in output space of the summed negative log-likelihood at sampled targets.

    MSE is the Gaussian likelihood :math:`\mathcal N(z, \tfrac12 I)` of :math:`\ell = \|z - y\|^2`, so
    :math:`g = 2(z - \hat y) = \sqrt 2\,\xi`, :math:`\xi \sim \mathcal N(0, I)`. CE is the categorical
    likelihood at every position, :math:`g_u = p_u - e_{\hat y_u}`, :math:`\hat y_u \sim p_u`, zero at
    ignored positions. Either way :math:`\mathbb E[g g^\top]` equals the summed loss's Hessian in output
    space, which makes the Monte-Carlo Fisher an unbiased estimate of the GGN.

    Args:
        kind: ``"mse"`` or ``"ce"``.
        loss_fn: The loss.
        outputs: The batch's outputs ``z``.
        targets: The batch's targets (CE: only for the ignore mask).
        num_samples: Samples per data point.
        generator: Source of randomness.

    Returns:
        Tensor of shape ``(num_samples, *z.shape)``.
    """
    z = outputs.detach()
    gen_device = generator.device
    if kind == "mse":
        noise = torch.randn((num_samples, *z.shape), generator=generator, dtype=z.dtype, device=gen_device)
        return (2.0**0.5) * noise.to(z.device)
    probs = torch.softmax(z, dim=1).movedim(1, -1)  # (N, d1, ..., C)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.to(gen_device), num_samples, replacement=True, generator=generator)
    onehot = F.one_hot(draws.to(z.device).T, flat.shape[-1]).to(z.dtype)  # (M, N*d, C)
    grads = (flat.unsqueeze(0) - onehot).reshape(num_samples, *probs.shape).movedim(-1, 2)
    if not targets.is_floating_point():
        grads = grads * (targets != loss_fn.ignore_index).unsqueeze(1).unsqueeze(0).to(z.dtype)
    return grads


def per_sample_losses(
    kind: Kind, loss_fn: Any, outputs: torch.Tensor, targets: Any, reduction: Reduction
) -> torch.Tensor:
    """Return each sample's loss, as ``loss_fn`` would give it for a batch holding only that sample.

    Args:
        kind: The loss kind.
        loss_fn: The loss.
        outputs: The batch's outputs (with graph).
        targets: The batch's targets.
        reduction: The loss's batch reduction.

    Returns:
        Tensor of shape ``(N,)``.
    """
    if kind == "mse":
        entries = F.mse_loss(outputs, targets, reduction="none").reshape(outputs.shape[0], -1)  # (N,) outputs too
        return entries.mean(1) if reduction == "mean" else entries.sum(1)
    if kind == "ce":
        entries = F.cross_entropy(
            outputs, targets, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index, reduction="none",
            label_smoothing=loss_fn.label_smoothing,
        )
        entries = entries.reshape(entries.shape[0], math.prod(entries.shape[1:]))
        if reduction == "sum":
            return entries.sum(1)
        if targets.is_floating_point():
            return entries.mean(1)
        counts = _ce_position_weights(loss_fn, targets, outputs.dtype).reshape(entries.shape).sum(1)
        return entries.sum(1) / counts.masked_fill(counts == 0, 1)  # a sample with every target ignored: 0
    return _generic_per_sample_losses(loss_fn, outputs, targets)


def _generic_per_sample_losses(
    loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any
) -> torch.Tensor:
    def one(z: torch.Tensor, y: Any) -> torch.Tensor:
        return loss_fn(z.unsqueeze(0), tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y))

    def sample(y: Any, i: int) -> Any:
        return tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, y)

    try:
        return torch.func.vmap(one)(outputs, targets)
    except (RuntimeError, ValueError):  # a loss that vmap cannot batch: one call per sample
        return torch.stack([one(outputs[i], sample(targets, i)) for i in range(outputs.shape[0])])


def infer_reduction(loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any) -> Reduction | None:
    """Tell whether a generic ``loss_fn`` averages or sums over the batch, by comparing per-sample losses.

    Args:
        loss_fn: The loss.
        outputs: A batch's outputs.
        targets: Its targets.

    Returns:
        ``"mean"`` or ``"sum"``, or None when the batch has one sample (both agree).

    Raises:
        ValueError: If the batch loss is neither the mean nor the sum of the per-sample losses.
    """
    if outputs.shape[0] < 2:
        return None
    with torch.no_grad():
        total = loss_fn(outputs, targets)
        each = _generic_per_sample_losses(loss_fn, outputs, targets)
    tol = dict(rtol=1e-4, atol=1e-6)
    if torch.allclose(total, each.mean(), **tol):
        return "mean"
    if torch.allclose(total, each.sum(), **tol):
        return "sum"
    raise ValueError(
        "cannot tell how loss_fn reduces over the batch (its value is neither the mean nor the sum of the "
        "per-sample losses); pass reduction='mean' or reduction='sum' to the operator. A loss that averages over "
        "something other than samples (tokens that are not padding, say) must report that count: "
        "curvature.NormalizedLoss(loss_fn, normalizer=lambda outputs, targets: ...)."
    )


def check_additive(
    loss_fn: Callable[..., torch.Tensor], outputs: torch.Tensor, targets: Any, inputs: Any, reduction: Reduction,
    where: str,
) -> None:
    r"""Check on one batch that the operator weights the loss as the loss itself does.

    The operators add batch curvatures with weights :math:`w_b` (for a mean: the count the loss divides by,
    :func:`mean_count`; for a sum: 1), which is exact when the loss of a union of batches is
    :math:`L_{a \cup b} = (w_a L_a + w_b L_b) / (w_a + w_b)` (for a sum: :math:`L_a + L_b`). Splitting one
    batch in two halves tests that identity, through the gradients in the outputs, which the curvature is made
    of: :math:`w_{a \cup b} \nabla_{z_a} L_{a \cup b} = w_a \nabla_{z_a} L_a` for each half. A callable that
    averages over tokens that are not padding, weighted by sample counts, fails it as soon as the halves hold
    different numbers of tokens, by the ratio of the counts (whatever the loss values: near initialization
    every token's loss is about the same, and a test on loss values alone passed a 15% error in float32); so
    does a loss that couples the samples of a batch (contrastive losses). Batches that cannot be split by
    samples, or a loss that cannot take half a batch, are not checked (their weighting is then assumed).

    Args:
        loss_fn: The callable loss.
        outputs: The batch's outputs (detached).
        targets: The batch's targets.
        inputs: The batch's inputs.
        reduction: The loss's batch reduction.
        where: Which batch, for the message (e.g. "batch 2 of data").

    Raises:
        ValueError: If the identity fails beyond the rounding of the outputs' dtype.
    """
    from .data import split_batch

    n = outputs.shape[0] if outputs.ndim else 0
    if n < 2 or not outputs.is_floating_point():
        return
    half = n // 2
    split = [(split_batch(targets, a, b, n), split_batch(inputs, a, b, n)) for a, b in ((0, half), (half, n))]
    if not all(y_ok and x_ok for (y_ok, _), (x_ok, _) in split):
        return
    parts = [(outputs, targets, inputs), (outputs[:half], split[0][0][1], split[0][1][1]),
             (outputs[half:], split[1][0][1], split[1][1][1])]

    def weight(z: torch.Tensor, y: Any, x: Any) -> float:  # the operator's own weighting (mean_count)
        return 1.0 if reduction == "sum" else mean_count("other", loss_fn, y, x, z)

    weights = [weight(*part) for part in parts]
    grads = []
    with autograd_enabled():  # under inference mode too (the operator may be built there)
        for (z, y, _), w in zip(parts, weights):
            leaf = recordable(z.detach()).clone().requires_grad_(True)
            try:
                value = loss_fn(leaf, y)
                (g,) = torch.autograd.grad(value, leaf, allow_unused=True)
            except Exception:  # a loss that cannot take half a batch: nothing to compare
                return
            if g is None:
                return
            grads.append(torch.zeros_like(leaf) if w == 0 else g.detach() * w)  # a count of 0 adds nothing
    whole = grads[0]
    differs = float((whole[:half] - grads[1]).norm() + (whole[half:] - grads[2]).norm())
    scale = float(grads[1].norm() + grads[2].norm())
    if not math.isfinite(differs) or differs <= math.sqrt(torch.finfo(outputs.dtype).eps) * scale + 1e-300:
        return
    if reduction == "sum":
        detail = (f"{where}: the batch's loss is not the sum of the losses of its two halves (their gradients in the "
                  "outputs differ), as reduction='sum' says")
    else:
        counted = "loss_fn.normalizer's counts" if has_normalizer(loss_fn) else "their numbers of samples"
        detail = (f"{where}: the batch's loss is not the mean of the losses of its two halves weighted by {counted} "
                  f"({weights[1]:g} and {weights[2]:g}; their gradients in the outputs differ by "
                  f"{differs / max(scale, 1e-300):.2g} relative)")
    raise ValueError(
        f"{detail}, so the operator would weight batches of different composition wrongly (any batching must "
        "give the same curvature). A loss that averages over something other than samples (tokens that are not "
        "padding, a mask) must report that count: curvature.NormalizedLoss(loss_fn, normalizer=lambda outputs, "
        "targets: (targets != -100).sum()), or a normalizer(outputs, targets) method. A loss that couples the "
        "samples of a batch has no per-batch decomposition: pass the data as one (inputs, targets) batch."
    )
