"""Silence the known, harmless warnings that torch.distributed.checkpoint prints on every save and load."""
from __future__ import annotations

import contextlib
import warnings

_MESSAGES = (
    r".*deprecating ShardedTensor.*",                                   # still fully supported by DCP (torch 2.13)
    r".*assuming the intent is to (save|load) in a single process.*",   # no_dist, asked for on purpose
    r".*Multiple backends are registered with this ProcessGroup.*",     # FSDP1's sharded state dict on gloo
    r".*`_get_pg_default_device` will be deprecated.*",
)


@contextlib.contextmanager
def quiet_checkpoint_warnings():
    with warnings.catch_warnings():
        for message in _MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield
