"""Pure (no processes) checks of the FSDP adapters' arithmetic and error paths."""
from __future__ import annotations

import random

import pytest
import torch

from optim import flat
from optim.dtensor import row_shard
from optim.flat import even_shard_bounds, flat_shard_segments
from optim.units import canonical_name


def _chunk_reference(total: int, rank: int, world: int):
    """FSDP1's rule spelled with torch itself: flat.chunk(world), right-padded to chunk 0's size."""
    chunks = torch.arange(total).chunk(world)
    held = chunks[rank] if rank < len(chunks) else torch.empty(0, dtype=torch.long)
    return held, chunks[0].numel() - held.numel()


@pytest.mark.parametrize("seed", range(30))
def test_flat_shard_segments_match_torch_chunk(seed):
    rnd = random.Random(seed)
    numels = [rnd.choice([1, 2, 3, 7, 64, 100, 4096]) for _ in range(rnd.randint(1, 7))]
    world = rnd.randint(1, 9)
    total = sum(numels)
    starts = [sum(numels[:i]) for i in range(len(numels))]
    seen = torch.zeros(total, dtype=torch.long)
    for rank in range(world):
        held, pad = _chunk_reference(total, rank, world)
        segs, shard_numel, padding = flat_shard_segments(numels, rank, world)
        assert padding == pad and shard_numel == held.numel() + pad
        lo = held[0].item() if held.numel() else None
        # rebuild the held flat indices from the segments
        rebuilt = torch.cat([torch.arange(starts[i] + a, starts[i] + b) for i, a, b, _ in segs]) if segs else held
        assert torch.equal(rebuilt, held)
        for i, a, b, off in segs:
            assert 0 <= a < b <= numels[i]
            assert off == starts[i] + a - lo  # offset in the local shard
            seen[starts[i] + a:starts[i] + b] += 1
    assert torch.all(seen == 1)


def test_even_shard_bounds_more_ranks_than_elements():
    # 5 elements on 4 ranks: chunks of 2 -> [0,2) [2,4) [4,5)+1 pad, rank 3 holds nothing (2 pad)
    assert [even_shard_bounds(5, r, 4) for r in range(4)] == [(0, 2, 0), (2, 4, 0), (4, 5, 1), (5, 5, 2)]
    with pytest.raises(ValueError):
        even_shard_bounds(5, 4, 4)


@pytest.mark.parametrize("rows,world", [(101, 2), (128, 3), (5, 4), (3, 8), (0, 2), (2048, 8)])
def test_row_shard_matches_torch_chunk_and_dtensor(rows, world):
    from torch.distributed.tensor import Shard
    chunks = torch.arange(rows).chunk(world) if rows else ()
    for rank in range(world):
        first, n = row_shard(rows, world, rank)
        if rank < len(chunks):
            assert (first, n) == (chunks[rank][0].item(), chunks[rank].numel())
        else:
            assert n == 0
        if rows:
            size, offset = Shard.local_shard_size_and_offset(rows, world, rank)
            assert size == n and (n == 0 or offset == first)


def test_canonical_name_strips_fsdp_and_checkpoint_wrappers():
    name = "_forward_module.transformer.h.3._fsdp_wrapped_module._checkpoint_wrapped_module.attn.qkv.weight"
    assert canonical_name(name) == "transformer.h.3.attn.qkv.weight"
    assert canonical_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_missing_private_field_names_torch_version():
    class Handle:
        pass

    with pytest.raises(RuntimeError, match=r"_shard_param_infos.*torch 2\.13\.0.*this is torch"):
        flat._field(Handle(), "_shard_param_infos", "FSDP1 unit 'x'")


def test_shard_param_info_fields():
    from torch.distributed.fsdp._flat_param import _ShardParamInfo
    info = _ShardParamInfo(True, 3, 5, 10, 14)
    assert flat._info_fields(info) == (True, 3, 5, 10, 14)
    with pytest.raises(RuntimeError, match="unexpected _ShardParamInfo"):
        flat._info_fields(object())


def test_plain_model_dispatch_is_single_device():
    import models
    from optim.build import model_units
    from optim.units import units_from_module
    model = models.build_model(models.get_config("debug"), device="cpu")
    units, shapes = model_units(model)
    ref = units_from_module(model)
    assert [(u.names, u.segments, u.group) for u in units] == [(u.names, u.segments, u.group) for u in ref]
    assert not flat.is_fsdp1(model)
