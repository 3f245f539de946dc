"""Spawning gloo process groups on CPU for multi-process tests."""
from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, fn, world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still works
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without the interpreter's finalisation, where a gloo worker thread still holding
    # the last collective's work can abort the process ("terminate called without an active exception", SIGABRT;
    # seen once in CI after the worker had finished). A failure above still raises and is reported by mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` processes sharing a gloo process group (joins; raises if one fails)."""
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(fn, world, free_port(), args), nprocs=world, join=True)
