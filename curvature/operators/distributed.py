"""Data-parallel curvature: process groups, wrapped models, and the one all-reduce of each product.

With a process group, the whole data is the union of every rank's shard: each rank sums its weighted batch
products and one all-reduce adds the sums (:class:`ShardReduction`), together with the weights, a failure flag
per rank and a digest of the vector that proves every rank multiplied the same one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShardReduction", "all_reduce_product", "resolve_process_group", "unwrap_model"]

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)

def unwrap_model(model: Any) -> tuple[Any, Any]:
    """Return the module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper, and its group.

    Curvature products call the inner module functionally, so the wrapper's gradient all-reduce hooks
    never fire; the data-parallel reduction is the operator's own (see :class:`ShardReduction`).

    Args:
        model: A module, possibly wrapped.

    Returns:
        ``(module, group)``: the inner module (or ``model`` itself) and the wrapper's process group (None
        for ``DataParallel`` and unwrapped models).
    """
    if isinstance(model, _WRAPPERS):
        return model.module, getattr(model, "process_group", None)
    return model, None


def resolve_process_group(process_group: Any, default: Any = None) -> Any:
    """Resolve an operator's ``process_group=`` argument to a process group or None.

    Args:
        process_group: None (one process: no reduction), ``"auto"`` (``default`` if given, else the default
            group when ``torch.distributed`` is initialized, else None), or a ``ProcessGroup``.
        default: The group of a ``DistributedDataParallel`` wrapper, preferred by ``"auto"``.

    Returns:
        The process group, or None for a single process.

    Raises:
        ValueError: For a string other than ``"auto"``, or a group while ``torch.distributed`` is not
            initialized.
        TypeError: For anything that is not a process group.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be None, 'auto' or a ProcessGroup, got {process_group!r}.")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return default if default is not None else dist.group.WORLD
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None, 'auto' or a torch.distributed ProcessGroup, got "
            f"{type(process_group).__name__}."
        )
    if not dist.is_initialized():
        raise ValueError("process_group was given, but torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first.")
    return process_group


_DIGEST_BYTES = 8  # bytes per 64-bit digest sum
_DIGEST_CHUNK = 1 << 22


def _digest(V: torch.Tensor) -> torch.Tensor:
    """Sixteen small integers (as ``V``'s dtype) that identify ``V`` bit for bit.

    Two 64-bit integer sums of ``V``'s bits, plain and weighted by position, are cut into bytes: a byte is
    exact in every floating dtype, so the digests travel in the same all-reduce as the products. Integer
    sums do not depend on the order of addition, so equal operands give equal digests on every rank
    whatever its thread count.
    """
    bits = V.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16,
                                         1: torch.int8}[V.element_size()]).reshape(-1)
    sums = torch.zeros(2, dtype=torch.int64, device=V.device)
    for start in range(0, bits.numel(), _DIGEST_CHUNK):  # int64 temporaries of a chunk, not of all of V
        chunk = bits[start:start + _DIGEST_CHUNK].to(torch.int64)
        position = torch.arange(start + 1, start + chunk.numel() + 1, device=V.device, dtype=torch.int64)
        sums += torch.stack([chunk.sum(), (chunk * position).sum()])
    shifts = torch.arange(0, 64, 8, device=V.device)  # made on the device: no host-to-device copy per product
    return ((sums.unsqueeze(1) >> shifts) & 0xFF).reshape(-1).to(V.dtype)


class ShardReduction:
    r"""Adds every rank's weighted partial product with one all-reduce over a process group.

    Rank :math:`r` holds batches :math:`b \in S_r` with weights :math:`w_b` (their share of a mean
    loss's normalizer; 1 for a sum). The operator over the union of the shards is

    .. math:: A V = \frac{\sum_r \sum_{b \in S_r} w_b A_b V}{\sum_r \sum_{b \in S_r} w_b}

    (no denominator for a summed loss), so each rank sends its partial sum together with its weight sum
    and batch count, a failure flag (a rank whose products raised still joins, so that no rank waits for
    it), and a 16-byte digest of :math:`V` that proves every rank multiplied the same :math:`V` (estimators
    must draw the same probes on every rank: pass identically seeded generators): one all-reduce of
    :math:`P k + 2 + 17 R` numbers for :math:`R` ranks, in the products' dtype (float32 for
    half-precision products, whose sample counts would round). A rank with an empty shard sends
    zeros; every rank gets the same result.

    Args:
        group: The process group.
        device: The device of the products (NCCL reduces CUDA tensors only).

    Raises:
        ValueError: If the group's backend cannot reduce tensors on ``device``.
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        backend = str(dist.get_backend(group)).lower()
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the process group uses NCCL, which reduces CUDA tensors only, but the model is on "
                             f"{device}; move the model to its rank's GPU, or use a gloo group for CPU models.")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def gather_rows(self, row: list[float], device: torch.device) -> torch.Tensor:
        """Return every rank's ``row`` of numbers as a ``(world_size, len(row))`` float64 tensor on the host.

        Args:
            row: This rank's numbers.
            device: Where the exchange happens (the products' device).
        """
        table = torch.zeros(self.world_size, len(row), dtype=torch.float64, device=device)
        table[self.rank] = torch.tensor(row, dtype=torch.float64)
        dist.all_reduce(table, group=self.group)
        return table.cpu()

    def __call__(self, partial: torch.Tensor | None, V: torch.Tensor, weight: float, batches: int,
                 failed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All-reduce this rank's weighted partial sum.

        Args:
            partial: The sum of ``w_b A_b V`` over this rank's batches, shape ``(k, P)``, or None if the
                shard is empty or its products failed.
            V: The operand, ``(P, k)``.
            weight: This rank's weight sum.
            batches: This rank's number of non-empty batches.
            failed: Whether this rank's products raised. It still joins the all-reduce, so that the other
                ranks learn of it instead of waiting for it until the group's timeout.

        Returns:
            ``(total, totals, digests, failures)``, all on the device: the summed products ``(k, P)``, the
            summed ``(weight, batches)``, every rank's digest of ``V`` (one row per rank) and every rank's
            failure flag.
        """
        P, k = V.shape
        size, width, world = P * k, 2 * _DIGEST_BYTES, self.world_size
        # Half-precision products travel in float32, so that the weight totals (sample counts) stay exact.
        dtype = torch.promote_types(V.dtype, torch.float32)
        buffer = torch.zeros(size + 2 + world + width * world, dtype=dtype, device=V.device)
        if partial is not None:
            buffer[:size].copy_(partial.reshape(-1))
        buffer[size].fill_(weight)
        buffer[size + 1].fill_(batches)
        buffer[size + 2 + self.rank].fill_(float(failed))
        start = size + 2 + world + width * self.rank
        buffer[start:start + width] = _digest(V)
        dist.all_reduce(buffer, group=self.group)
        return (buffer[:size].view(k, P).to(V.dtype), buffer[size:size + 2],
                buffer[size + 2 + world:].view(world, width), buffer[size + 2:size + 2 + world])


def all_reduce_product(shards: ShardReduction, total: torch.Tensor | None, first_weight: float | None,
                       weight_sum: float, batches: int, V: torch.Tensor, failed: bool,
                       verify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce this rank's weighted partial product; check that every rank succeeded and multiplied ``V``.

    Args:
        shards: The reduction over the operator's process group.
        total: This rank's sum of batch products ``(k, P)``, still unscaled when ``first_weight`` is not None
            (one batch), or None for an empty shard or failed products.
        first_weight: The weight of the single batch of ``total`` not yet applied, or None.
        weight_sum: This rank's weight sum.
        batches: This rank's number of non-empty batches.
        V: The operand ``(P, k)``.
        failed: Whether this rank's products raised (it joins with its failure flag, then raises its own error).
        verify: Read the failure flags and digests on the host and raise naming the ranks; without it a
            mismatch or failure turns the product into NaN (no host synchronisation).

    Returns:
        ``(total, totals)``: the summed, not yet normalized product ``(k, P)`` and the summed
        ``(weight, batches)`` on the device.

    Raises:
        ValueError: With ``verify``, if a rank failed or the vectors differ between ranks.
    """
    if total is not None and first_weight is not None:
        total = total.mul(first_weight)  # the other ranks' batches need the weights
    total, totals, digests, failures = shards(total, V, weight_sum, batches, failed=failed)
    if failed:
        return total, totals
    same = (digests == digests[shards.rank]).all() & (failures == 0).all()
    if verify:
        failed_ranks = [r for r, flag in enumerate(failures.tolist()) if flag]
        if failed_ranks:
            raise ValueError(f"the curvature product failed on rank(s) {failed_ranks} of the process group; see the "
                             "error raised there.")
        if not bool(same):
            differ = [r for r in range(len(digests)) if not torch.equal(digests[r], digests[0])]
            raise ValueError(
                f"the vector multiplied differs between the ranks of the process group (rank(s) {differ} "
                "differ from rank 0), so their products cannot be added; every rank must multiply the "
                "same vector: give estimators identically seeded generators on every rank, e.g. "
                "torch.Generator().manual_seed(0), never generator=None."
            )
    else:  # no host read: a mismatch poisons the product instead
        total = total * torch.where(same, 1.0, torch.nan).to(total.dtype)
    return total, totals
