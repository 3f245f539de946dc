"""`python -m pretrain` / `amp-pretrain` / `fabric run launch/train.py`: see `python -m pretrain --help`.

Exit status: 0 done (or stopped by SIGUSR1 after saving: requeue), 143 stopped by SIGTERM after saving,
1 non-finite loss (nothing saved; the newest checkpoint is the last good state), 2 configuration or
checkpoint error.
"""
from __future__ import annotations

import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError, parse_args

    try:
        cfg, print_only = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if print_only:
        print(cfg.to_yaml(), end="")
        return 0

    from checkpoints_util.save import CheckpointError
    from pretrain.loop import NonFiniteLossError, fit

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ for the fp32 parts
    try:
        result = fit(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
