"""The process group as the checkpoint and optimizer-state code sees it: works the same in one process."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def distributed() -> bool:
    """Several processes in an initialised default group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world() -> int:
    return dist.get_world_size() if distributed() else 1


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (collective); [obj] in one process."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
