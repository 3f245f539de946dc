"""benchmarks/network_bytes.py against a hand computation (debug model, 2 nodes x 2 GPUs), and the table in
launch/README.md is the script's output (not typed by hand)."""
import re
from pathlib import Path

import benchmarks.network_bytes as nb
import models
from benchmarks.memory_table import fsdp_units

README = Path(__file__).resolve().parents[1] / "launch" / "README.md"


def test_debug_model_on_2_nodes_of_2_gpus_by_hand():
    units = fsdp_units(models.get_config("debug"))  # root: 524352 elements, 8193 blocks; 2 Blocks: 46208, 520
    full = nb.full_shard_bytes(units, nodes=2, gpus=2)
    # W = 4: root chunk 131088 (one all-gather), Block chunk 11552 (two: forward and backward), 3 chunks a link, bf16
    assert full["all_gather"] == 3 * 2 * (131088 + 2 * 2 * 11552) == 1063776
    assert full["reduce_scatter"] == 3 * 2 * (131088 + 2 * 11552) == 925152
    # block sums, fp32 ring all-reduce over 4: 2 x 3 chunks of ceil(B / 4)
    assert full["adam_mini_block_sums"] == 2 * 3 * 4 * (2049 + 2 * 130) == 55416
    hsdp = nb.hsdp_bytes(units, nodes=2, gpus=2)
    # shards of 2 (root 262176, Block 23104), 2 rings of 2 nodes: 2 x (n - 1) chunks of shard / 2 per link, bf16
    assert hsdp["all_reduce"] == 2 * 2 * 1 * 2 * (131088 + 2 * 11552) == 1233536
    assert hsdp["all_gather"] == hsdp["reduce_scatter"] == hsdp["adam_mini_block_sums"] == 0
    # gradient accumulation repeats FULL_SHARD's all-gathers only
    four = nb.full_shard_bytes(units, nodes=2, gpus=2, micro_batches=4)
    assert four["all_gather"] == 4 * full["all_gather"] and four["reduce_scatter"] == full["reduce_scatter"]


def test_launch_readme_table_is_the_scripts_output():
    text = README.read_text()
    m = re.search(r"<!-- network_bytes table:[^\n]*-->\n(.*?)\n<!-- end network_bytes table -->", text, re.S)
    assert m, "launch/README.md lost its network_bytes table markers"
    assert m.group(1) == nb.table(nb.rows([4, 16], 8, 1, 2))
