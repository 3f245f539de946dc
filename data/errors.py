"""One exception type for every bad-input case in `data/`.

Why a dedicated class: the CLIs catch exactly this type and print its one-line message (file, line or
offset, what is wrong) without a traceback and exit with status 2, while genuine bugs still surface as
ordinary tracebacks. Library callers (the training loop) can catch it the same way. Writing that fails
(disk full, a folder that is not writable) is a `DataWriteError`, exit status 3, as in every other tool
(`amp_common.exits`).
"""

from __future__ import annotations

from amp_common import exits


class DataError(Exception):
    """Bad input data: a corrupt source file, an invalid shard, a mismatched tokenizer, ...

    `where` names the file and, when known, the line or byte offset, so the message alone is enough
    to find the problem.
    """

    exit_code = exits.BAD_INPUT

    def __init__(self, where: str, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")

    def __reduce__(self):  # keep it picklable across worker processes
        return (type(self), (self.where, self.what))


class DataWriteError(DataError):
    """The output could not be written (no space, no permission): the disk's fault, not the input's."""

    exit_code = exits.DISK
