"""The few torch.distributed collectives the study needs; all are no-ops in a single process."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor with rank `src`'s copy (EnCodec's `distrib.broadcast_tensors`)."""
    if not is_distributed():
        return
    handles = [dist.broadcast(t.data, src=src, async_op=True) for t in tensors]
    for handle in handles:
        handle.wait()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """SUM-all-reduce in place; every rank ends with the same bytes (one reduction per chunk)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of `x` [n_r, d] from all ranks in rank order; n_r may differ per rank."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_int = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes_int), *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in sizes_int]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes_int)])
