"""`python -m pretrain` / `amp-pretrain` / `fabric run launch/train.py`: see `python -m pretrain --help`.

Exit status (amp_common/exits.py): 0 done (or stopped by SIGUSR1 after saving: requeue), 143 stopped by
SIGTERM after saving, 1 non-finite loss (nothing saved; the newest checkpoint is the last good state),
2 a configuration, data or checkpoint error, 3 the disk (no space, not writable, a file the OS could not
read), 4 another rank stopped answering (system.collective_timeout_s) or died, 130 interrupted (Ctrl-C), 128 + N
ended by signal N without saving (a second signal, or the step did not end within system.stop_grace_s).
Every error is one line on stderr that names the option, file or folder.
"""
from __future__ import annotations

import sys

from amp_common import exits


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError, build_parser, parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return exits.OK
    try:
        cfg, print_only = parse_args(argv)
    except ConfigError as e:
        return _error(e, exits.BAD_INPUT)
    if print_only:
        print(cfg.to_yaml(), end="")
        return exits.OK
    return run(cfg)


def run(cfg) -> int:
    import torch

    from amp_common.atomic import WriteError
    from amp_common.dist import PeerLostError
    from checkpoints_util.layout import CheckpointError
    from data.errors import DataError
    from pretrain.config import ConfigError
    from pretrain.loop import fit
    from pretrain.step import NonFiniteLossError

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ for the fp32 parts
    try:
        return fit(cfg).exit_code
    except PeerLostError as e:
        return _error(e, exits.PEER_LOST)
    except (ConfigError, CheckpointError) as e:
        return _error(e, exits.BAD_INPUT)
    except DataError as e:  # bad data: 2; its DataWriteError: 3
        return _error(e, e.exit_code)
    except NonFiniteLossError as e:
        return _error(e, exits.NON_FINITE)
    except WriteError as e:
        return _error(e, exits.DISK)
    except OSError as e:
        return _error(exits.os_error_line(e), exits.DISK)
    except KeyboardInterrupt:
        return _error("interrupted", exits.INTERRUPTED)


def _error(message, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
