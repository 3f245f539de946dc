"""``data.prepare --part K/N``: which sources the K-th of N prepare jobs tokenises, and its journal's name.

A part is a set of whole source files: source i of the sorted source list (`data.readers.expand_sources`)
belongs to part ``i mod N + 1``. Every source's shards are named after the source alone
(``<stem>-<sha1(path)[:8]>-NNNN.bin``, see data/prepare.py), so N jobs can write into the same ``--out`` at
once without ever writing the same file, and each records the sources it finished in its own journal,
``progress.part-K-of-N.jsonl`` (no two writers append to one file, which a shared file system would not
order). The manifest is not written by a part: a final run of the same command without ``--part`` reads
every journal, keeps each finished source whose shards validate (as any resume does), tokenises what no part
finished and writes the manifest. The result is the one a single process makes, byte for byte: the shards
do not depend on which process wrote them and the manifest lists sources in the same sorted order.

A failed part is re-run alone with the same command (it resumes from its journal); N can change between
attempts, as the journals are keyed by source path.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence, TypeVar

JOURNAL_NAME = "progress.jsonl"
_PART = re.compile(r"^progress\.part-(\d+)-of-(\d+)\.jsonl$")

T = TypeVar("T")


def part_arg(text: str) -> tuple[int, int]:
    """argparse ``type`` of ``--part K/N``: integers with 1 <= K <= N, else a one-line refusal."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 2/8), got {text!r}")
    k, n = int(m[1]), int(m[2])
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"K must be between 1 and N, got {k}/{n}")
    return k, n


def part_sources(sources: Sequence[T], part: tuple[int, int]) -> list[T]:
    """The sources of part ``K/N``: every N-th of the sorted list, starting at the K-th."""
    k, n = part
    return list(sources[k - 1::n])


def journal_names(split_dir: str | Path, part: tuple[int, int] | None = None) -> list[str]:
    """With `part`: ``[its journal's name]``. Without: every journal in `split_dir` (the one-process
    ``progress.jsonl`` last, so that its entries win), sorted."""
    if part is not None:
        return [f"progress.part-{part[0]}-of-{part[1]}.jsonl"]
    split_dir = Path(split_dir)
    names = sorted(p.name for p in split_dir.iterdir() if _PART.match(p.name)) if split_dir.is_dir() else []
    return names + [JOURNAL_NAME]
