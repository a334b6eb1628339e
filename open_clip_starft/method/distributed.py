"""The one all-gather of this package (every rank's values, in rank order, without gradient).

The Star term gathers its columns' class ids, the train step its per-rank report, the evaluator its
per-image scores; all go through here. Features that need a gradient across processes go through
OpenCLIP's ``gather_features`` (``method/loss.py``), not this. Horovod is used when asked, as OpenCLIP does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

try:
    import horovod.torch as hvd
except ImportError:
    hvd = None


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_gather_cat(values: torch.Tensor, use_horovod: bool = False) -> torch.Tensor:
    """``values [n, ...]`` of every process concatenated along dim 0 in rank order (``[N·n, ...]``; the
    same ``n`` on every process), no gradient. One process (no group, no Horovod): ``values`` itself."""
    if use_horovod:
        return hvd.allgather(values)
    if not is_distributed():
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def all_gather_objects(value: Any) -> list:
    """Every process's picklable ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts
