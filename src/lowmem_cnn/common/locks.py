"""Run locks: one training run at a time on a checkpoint (and on a parameter file).

The lock is an OS lock on a small file beside the guarded one, `.NAME.lock`. The OS
releases it when the process ends, however it ends, so a run killed with SIGKILL
leaves no stale lock (only its file, which is no obstacle). A run that lets go of its
lock removes the file, while still holding the lock: a process that opened the file
just before then gets a lock on a file that is no longer at the path, sees so, and
opens the path again, so that two processes never hold "the" lock at once. That
relies on the path's stat being current, as on a local filesystem (NFS may answer
from a cache). Windows cannot remove an open file: there the file stays.
"""

import contextlib
import os
import sys
import time
from pathlib import Path

from lowmem_cnn.common.errors import LowmemError

# On Windows the locked byte is read-protected, so the pid is written before it.
_LOCKED_BYTE = 64
# Times a lock file may turn out to have been removed before the path is given up on
# (each time another run let go of it just then; a filesystem whose stat and fstat
# never agree would otherwise loop forever).
_ATTEMPTS = 10


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def try_lock(fd) -> bool:
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
        self._target = target = lock_path(self.path)
        for _ in range(_ATTEMPTS):
            fd = None
            try:
                fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
                locked, current = try_lock(fd), still_at(fd, target)
            except OSError as err:
                if fd is not None:
                    os.close(fd)
                raise LowmemError(f"cannot lock {what} {self.path} ({target}: {err.strerror})") from None
            if current and not locked:
                holder = _holder(fd)
                mine = _held_here(fd) if holder == os.getpid() else None
                os.close(fd)
                if mine is not None and mine.what != what:  # one run's two files
                    raise LowmemError(f"{what} {self.path} and {mine.what} {mine.path} are the "
                                      f"same file; choose another {what}")
                by = f"process {holder}" if holder else "another process"
                raise LowmemError(f"{what} {self.path} is in use by {by} (another lowmem-cnn "
                                  "train); wait for it to finish, or choose another file")
            if current:
                break
            os.close(fd)  # removed by its holder as it let go: try the file now at the path
        else:
            raise LowmemError(f"cannot lock {what} {self.path}: {target} keeps being replaced")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode().ljust(_LOCKED_BYTE - 1, b" "))
        self._fd = fd
        _HELD.append(self)

    def release(self):
        """Let go of the lock and remove its file (see the module's docstring)."""
        if self._fd is None:
            return
        if sys.platform != "win32":
            try:
                if still_at(self._fd, self._target):  # not another run's (mine removed by hand)
                    os.unlink(self._target)  # before the lock goes (see still_at)
            except OSError:
                pass  # gone already, or not ours to remove: it stays, as a killed run's does
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None
        _HELD.remove(self)


# The locks this process holds: a run whose two files are one is told so, not that
# it is in use by its own process.
_HELD: list[RunLock] = []


def _held_here(fd) -> RunLock | None:
    """The lock of this process on the file open as `fd`, if it holds one."""
    locked = os.fstat(fd)
    return next((lock for lock in _HELD if os.path.samestat(os.fstat(lock._fd), locked)), None)


def release_all(locks: list):
    while locks:
        locks.pop().release()


@contextlib.contextmanager
def released_on_error():
    """A list for the locks a caller takes, let go again if it raises (a refusal, a
    finished run, an interrupt), so that nothing is left behind: the lock files go
    with them."""
    locks = []
    try:
        yield locks
    except BaseException:
        release_all(locks)
        raise


def still_at(fd, target: Path) -> bool:
    """Whether the locked file is still the one at `target`."""
    if sys.platform == "win32":  # never removed there
        return True
    try:
        here = os.stat(target)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


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
