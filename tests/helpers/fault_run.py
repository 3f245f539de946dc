"""`python tests/helpers/fault_run.py <pretrain options>`: the app with the faults of $AMP_TEST_FAULTS
(see faults.py) and the dtype probe of $AMP_TEST_PROBE (see precision_probe.py) installed in every rank
(Fabric's launcher re-runs this script for the other ranks). A rank whose process group is still initialised
at exit prints `faults.PG_LEFT`."""
import atexit
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

from helpers import faults  # noqa: E402


def _process_group_left() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the app tears it down itself (strategy.end_process_group)
        print(f"{faults.PG_LEFT} (rank {dist.get_rank()})", flush=True)


atexit.register(_process_group_left)
faults.install(setattr, **faults.from_env(os.environ.get("AMP_TEST_FAULTS", "")))
if os.environ.get("AMP_TEST_RECORD"):
    faults.record_batches(os.environ["AMP_TEST_RECORD"])
if os.environ.get("AMP_TEST_PROBE"):
    from helpers import precision_probe  # noqa: E402

    precision_probe.install(os.environ["AMP_TEST_PROBE"])

from pretrain.__main__ import main  # noqa: E402

sys.exit(main())
