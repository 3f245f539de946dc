"""One exception type for every bad-input case in `data/`.

Why a dedicated class: the CLIs catch exactly this type and print its one-line message (file, line or
offset, what is wrong) without a traceback and exit with status 2, while genuine bugs still surface as
ordinary tracebacks. Library callers (the training loop) can catch it the same way.
"""

from __future__ import annotations


class DataError(Exception):
    """Bad input data: a corrupt source file, an invalid shard, a mismatched tokenizer, ...

    `where` names the file and, when known, the line or byte offset, so the message alone is enough
    to find the problem.
    """

    def __init__(self, where: str, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")

    def __reduce__(self):  # keep it picklable across worker processes
        return (type(self), (self.where, self.what))


EXIT_DATA_ERROR = 2  # bad input data: a source file, a shard, a manifest, a tokenizer, an output path
EXIT_USAGE_ERROR = 2  # a command-line option that cannot work (data/cli.py)
