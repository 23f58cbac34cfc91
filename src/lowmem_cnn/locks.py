"""Run locks: one training run at a time on a checkpoint (and on a parameter file).

The lock is an OS lock on a small file beside the guarded one, `.NAME.lock`. The OS
releases it when the process ends, however it ends, so a run killed with SIGKILL
leaves no stale lock. The lock file itself is left in place: removing it would let a
third process lock a new file while a second still holds the old one.
"""

import os
import sys
import time
from pathlib import Path

from lowmem_cnn.errors import LowmemError

# On Windows the locked byte is read-protected, so the pid is written before it.
_LOCKED_BYTE = 64


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _try_lock(fd) -> bool:
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunLock:
    """Holds the lock on `path` for `what` (e.g. "checkpoint") until `release()` or exit."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self._fd = None
        target = lock_path(self.path)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise LowmemError(f"cannot lock {what} {self.path} ({target}: {err.strerror})") from None
        if not _try_lock(fd):
            holder = _holder(fd)
            os.close(fd)
            by = f"process {holder}" if holder else "another process"
            raise LowmemError(f"{what} {self.path} is in use by {by} (another lowmem-cnn train); "
                              "wait for it to finish, or choose another file")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode().ljust(_LOCKED_BYTE - 1, b" "))
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _holder(fd) -> int | None:
    """The pid the holder wrote. A new lock file is empty from the holder's lock until
    its write, a few microseconds: two runs started together met that window (the
    refusal named "another process"), so wait for the pid, up to a second."""
    deadline = time.monotonic() + 1.0
    while (holder := _read_pid(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    return holder


def _read_pid(fd) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        words = os.read(fd, _LOCKED_BYTE - 1).split()
        return int(words[0]) if words else None
    except (OSError, ValueError):
        return None
