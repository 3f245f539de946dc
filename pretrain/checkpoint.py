"""What a checkpoint holds, as `Stateful` entries of one DCP save (checkpoints_util/store.py writes them).

- "model": the parameters by original name (`get_model_state_dict`: FSDP1/FSDP2 shards or full tensors;
  DCP reshards them on load, so any strategy and world size can read any checkpoint);
- "optimizer": Adam-mini's or AdamW's state by original parameter name (optim/state.py);
- "data": the global data position (epoch, windows of its order consumed), independent of the world size;
- "trainer": the step and tokens seen (`TrainState`).
No RNG state is saved: nothing in a training step draws random numbers (litgpt's Llama has no dropout; the
data order is a seeded permutation of (seed, epoch), and the initial weights are seeded by name), so a
resumed run repeats the uninterrupted one exactly on the same world size and to rounding on another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from checkpoints_util.layout import CheckpointError


@dataclass
class TrainState:
    """Where training stands: optimizer steps taken and training tokens consumed."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step), "tokens_seen": torch.tensor(self.tokens_seen)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.step, self.tokens_seen = int(sd["step"]), int(sd["tokens_seen"])


class ModelState:
    """The model's parameters by original name (wrappers, FSDP flattening and compile stripped)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, sd, options=StateDictOptions(strict=True))


# the loader state's fields that go into the checkpoint (as int64 scalars: a DCP folder holds tensors only)
_DATA_FIELDS = ("version", "epoch", "position", "windows_consumed", "seed", "shuffle", "seq_len", "num_tokens")


class DataState:
    """The training stream's global data position (pretrain.batches.BatchStream, data/loader.py)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.stream.state_dict()
        return {k: torch.tensor(int(sd[k]), dtype=torch.int64) for k in _DATA_FIELDS}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        state = {k: int(sd[k]) for k in _DATA_FIELDS}
        state.update(shuffle=bool(state["shuffle"]), split="train")
        try:
            self.stream.load_state_dict(state)
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's data position does not fit this run's data: {e}") from None
