"""Writing files so that a crash leaves either the old complete file or the new one."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowmem_cnn.errors import LowmemError


@contextmanager
def atomic_write(path: Path, what: str = "file"):
    """Yield a binary file object; on success it replaces `path` atomically.

    A temporary file in the same directory is written, flushed and fsynced, then
    renamed over `path`. On any error the temporary file is removed and `path` is
    untouched.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as err:
        raise LowmemError(f"cannot write {what} {path}: {err.strerror}") from None
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise LowmemError(f"cannot write {what} {path}: {err.strerror or err}") from None
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, or what a plain open() would give a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path):
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
