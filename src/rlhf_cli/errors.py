"""One exception for bad input: the CLI prints its message as one sentence and exits 2.

Also the words for what the operating system refused (disk full, file-size limit, permissions), which
safetensors reports inside its own error type ("... (os error 28)").
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, paths). The message is one sentence."""


OS_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew past the file-size limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EMFILE: "too many open files",
    errno.EIO: "an input/output error from the storage",
}
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write that ran out of room


def os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one; else None."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return int(found.group(1)) if found else None


def os_problem(e: BaseException) -> str | None:
    """What the operating system refused, in words (None when `e` is not an OS-level failure)."""
    code = os_errno(e)
    if code is None:
        return None
    return OS_PROBLEMS.get(code) or (getattr(e, "strerror", None) or str(e)).strip().lower()


def is_corrupt_safetensors(e: BaseException) -> bool:
    return type(e).__name__ == "SafetensorError" and os_errno(e) is None


# Stop requests live here, not beside the training loop, so that the CLI installs its signal handlers
# without importing torch (`rlhf --help` and every one-sentence refusal stay fast).
class StopFlag:
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, then exit.

    Armed while a training loop runs (`Run` arms it); unarmed, a signal interrupts at once.
    A second signal always interrupts at once.
    """

    def __init__(self):
        self.armed = False
        self.requested = False
        self.announce = True  # False in a launcher: its rank-0 worker says it

    def signal(self, signum, frame) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce and os.environ.get("RANK", "0") == "0":  # every process got the signal; one says so
            print("stopping: a checkpoint is written after the current step (interrupt again to abort at once)",
                  file=sys.stderr, flush=True)


STOP = StopFlag()


class Interrupted(KeyboardInterrupt):
    """Raised after the checkpoint of a requested stop is written."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped at step {step}")
        self.step, self.path = step, path
