"""The process group as the checkpoint and optimizer-state code sees it: works the same in one process."""
from __future__ import annotations

import re
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


class PeerLostError(RuntimeError):
    """A collective failed because another rank stopped answering or died (exit 4); the message is one line."""


# what gloo and NCCL say when a peer stopped answering or went away (they raise RuntimeError, not DistError)
_PEER_LOST = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|peer|socket closed|"
                        r"NCCL communicator was aborted|watchdog", re.IGNORECASE)


def collective_failure(error: BaseException) -> str | None:
    """One line for an exception of a collective whose peer stopped answering or died (None: something else)."""
    if not dist.is_available():
        return None
    initialized = dist.is_initialized()
    if not isinstance(error, getattr(dist, "DistError", ())) and not (
            initialized and type(error) is RuntimeError and _PEER_LOST.search(str(error))):
        return None
    text = " ".join(str(error).split())
    where = f"rank {dist.get_rank()}: a collective failed" if initialized else "the rendezvous of the ranks failed"
    return f"{where}, another rank stopped answering or died ({text[:300]})"
