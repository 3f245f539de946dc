"""`python -m checkpoints_util` / `amp-ckpt`: inspect, consolidate, export and import checkpoints.

    amp-ckpt inspect     CKPT [--json] [--verify]
    amp-ckpt consolidate CKPT --out FILE [--with-optimizer] [--dtype D]
    amp-ckpt export      CKPT --format litgpt|hf --out DIR [--dtype D] [--max-shard-size 5GB]
    amp-ckpt convert     OLD_CKPT [--out DIR]      (a checkpoint of format 1 -> the current format)
    amp-ckpt import      SRC --out DIR [--dtype D] (Hugging Face Llama or litgpt weights -> a checkpoint folder)

CKPT is a `step-XXXXXXXX/` folder or a run folder (its newest complete checkpoint). Runs in one process
on CPU, whatever strategy and world size wrote the checkpoint. Exit status (amp_common/exits.py): 0 done,
2 a checkpoint or usage error, 3 the disk (no space, not writable, a file the OS could not read), 130
interrupted; errors are one line on stderr naming the path and the problem, and nothing half-written is left.
"""
from __future__ import annotations

import argparse
import os
import sys

from amp_common import exits
from amp_common.atomic import WriteError
from checkpoints_util import consolidate, convert, export, importer, inspect
from checkpoints_util.layout import CheckpointError
from data.cli import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="amp-ckpt", description=__doc__.split("\n\n")[0],  # usage errors: one line, exit 2
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See checkpoints_util/README.md for examples.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect.add_parser(sub)
    consolidate.add_parser(sub)
    export.add_parser(sub)
    convert.add_parser(sub)
    importer.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.DISK
    except BrokenPipeError:  # `amp-ckpt inspect ... | head`: stop quietly, as other CLI tools do (before OSError,
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # of which it is one)
        return 0
    except OSError as e:  # a file that could not be read or written: name it
        print(f"error: {exits.os_error_line(e)}", file=sys.stderr)
        return exits.DISK
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return exits.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
