"""`python tests/helpers/fault_run.py <pretrain options>`: the app with the faults of $AMP_TEST_FAULTS
(see faults.py) installed in every rank (Fabric's launcher re-runs this script for the other ranks)."""
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]  # repo, tests/

from helpers import faults  # noqa: E402

faults.install(setattr, **faults.from_env(os.environ.get("AMP_TEST_FAULTS", "")))
if os.environ.get("AMP_TEST_RECORD"):
    faults.record_batches(os.environ["AMP_TEST_RECORD"])

from pretrain.__main__ import main  # noqa: E402

sys.exit(main())
