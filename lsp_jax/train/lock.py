"""One trainer per workdir: an exclusive lock held for the whole run.

The lock is an flock(2) on WORKDIR/.lsp_jax.lock, which the kernel releases when the
process ends in any way (a crash, kill -9), so a stale lock never blocks a resume. The
file also names the holder (host, pid, start time) for the error a second trainer gets.
Object-store workdirs (gs://) cannot be locked this way and are not locked.
"""

import fcntl
import json
import os
import socket
import sys
import time

from lsp_jax.errors import UserError
from lsp_jax.runtime import paths

LOCK_FILE = ".lsp_jax.lock"


class WorkdirLock:
    """Context manager: holds the workdir's lock, or raises UserError naming its holder."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd = None

    def __enter__(self):
        if paths.is_remote(self.workdir):
            return self
        path = os.path.join(self.workdir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise UserError(
                f"Another trainer is running on {self.workdir} ({holder}). Two trainers on "
                "one workdir would write into the same checkpoints and logs: wait for it to "
                "finish or stop it, or pass another --workdir."
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False


def _describe(data: bytes) -> str:
    try:
        holder = json.loads(data.decode("utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
