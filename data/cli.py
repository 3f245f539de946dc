"""What the data command lines share: one-line usage errors and checked numeric options.

Every numeric option is parsed by `int_in`, so a value that cannot work (``--shard-tokens 0``,
``--workers -1``) is refused before anything is read or written: one line naming the option on stderr,
exit status 2 (`amp_common.exits.BAD_INPUT`).
"""

from __future__ import annotations

import argparse
from typing import Callable

from amp_common import exits

MAX_THREADS = 1024  # SentencePiece's own limit on encoding and training threads


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(exits.BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``lo <= n`` (and ``n <= hi`` when given), else a one-line refusal."""
    bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {n}")
        return n

    return parse
