"""Writing files so that a crash leaves either the old complete file or the new one, and
checking a command's outputs before it does any work.

`atomic_write` writes a temporary file beside the output, `.NAME.XXXXXXXX.tmp`, and
renames it over the output. Its writer holds an OS lock on it (locks.try_lock) until
the rename, so a temporary file that nobody holds is a killed writer's: the next write of
the same output removes it, and leaves alone those of writers still at work.

`check_outputs` refuses, before a command starts, an output that is one of its inputs or
another of its outputs, one that is not a regular file (a device, a FIFO, a directory),
and one whose folder is missing or not writable.
"""

import hashlib
import os
import re
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.locks import still_at, try_lock

# Times a new temporary file may be taken from under its writer (by another writer's
# clean-up, in the instant before it is locked) before the write is given up on.
_ATTEMPTS = 10


@contextmanager
def atomic_write(path: Path, what: str = "file"):
    """Yield a binary file object; on success it replaces `path` atomically.

    A temporary file in the same directory is written, flushed and fsynced, then
    renamed over `path`. On any error the temporary file is removed and `path` is
    untouched. `path` must be a regular file or nothing: a device or a FIFO is never
    replaced by a file.
    """
    path = Path(path)
    problem = _file_name_problem(path) or _not_regular(path)
    if problem:
        raise LowmemError(f"cannot write {what} {path}: {problem}")
    remove_stale_temporaries(path)
    fd, tmp = _locked_temporary(path, what)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
            os.fsync(fd)
        if sys.platform == "win32":  # an open file cannot be renamed there
            os.close(fd)
            fd = None
        os.replace(tmp, path)  # while locked: a clean-up cannot take it first
    except BaseException as err:
        if fd is not None:
            os.close(fd)  # (Windows removes no open file)
            fd = None
        _remove(tmp)
        if isinstance(err, OSError):
            raise LowmemError(f"cannot write {what} {path}: {err.strerror or err}") from None
        raise
    finally:
        if fd is not None:
            os.close(fd)  # lets go of the lock
    _fsync_dir(path.parent)


class HashingWriter:
    """A file that also hashes what is written to it, so that a file's SHA-256 is known
    once it is written, without reading it back (parameter files, checkpoints)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)


def _temporary_pattern(path: Path) -> re.Pattern:
    # tempfile.mkstemp's names: the prefix, 8 of [a-z0-9_], the suffix
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")


def _locked_temporary(path: Path, what: str) -> tuple[int, str]:
    """A new temporary file beside `path`, locked: (descriptor, name)."""
    for _ in range(_ATTEMPTS):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                       dir=path.parent or ".")
        except OSError as err:
            raise LowmemError(f"cannot write {what} {path}: {err.strerror}") from None
        if sys.platform == "win32" or (try_lock(fd) and still_at(fd, tmp)):
            return fd, tmp
        os.close(fd)  # another write's clean-up took it before the lock: it removes it
    raise LowmemError(f"cannot write {what} {path}: its temporary files keep being removed")


def remove_stale_temporaries(path: Path):
    """Remove the temporary files of `path` whose writer is gone (killed before its
    rename): those no process holds locked. Not on Windows, where nothing is locked."""
    if sys.platform == "win32":
        return
    path = Path(path)
    pattern = _temporary_pattern(path)
    try:
        names = [entry.name for entry in os.scandir(path.parent or ".")
                 if pattern.fullmatch(entry.name)]
    except OSError:
        return  # the write itself will say what is wrong with the folder
    for name in names:
        stale = path.parent / name
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already (renamed by its writer), or not one of ours
        try:
            if (stat.S_ISREG(os.fstat(fd).st_mode) and try_lock(fd)
                    and still_at(fd, stale)):
                os.unlink(stale)  # while locked: its writer is dead
        except OSError:
            pass
        finally:
            os.close(fd)


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


# --- a command's outputs, checked before it starts -----------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _file_name_problem(path: Path) -> str | None:
    if str(path) in ("", "."):  # click makes "" the path "."
        return "an empty path is not a file name"
    if path.name in ("", ".", ".."):
        return "a directory, not a file name"
    return None


def _not_regular(path: Path) -> str | None:
    """Why `path` cannot be replaced by a file (it exists and is not a regular one)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # nothing there (or a link to nothing): the file is made
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a file to replace"


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: the file itself (device and inode) when it
    exists, else where the path leads."""
    try:
        st = os.stat(path)
        return ("file", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    return (_identity(a) == _identity(b)
            or os.path.realpath(a) == os.path.realpath(b))


def check_file_names(paths: list):
    """`paths`: (how the user named it, e.g. "--out", path or None). A one-line error
    for an empty path, before anything is made from it (its PATH.json, its lock)."""
    for name, path in paths:
        if path is not None and (problem := _file_name_problem(Path(path))):
            raise LowmemError(f"{name} {str(path)!r}: {problem}")


def check_outputs(outputs: list, inputs: list = ()):
    """Refuse, before a command does any work, outputs it cannot write without harm.

    `outputs` and `inputs`: (how the user knows the file, e.g. "--plot" or "the parameter
    file's description", path or None). An output must be a file name, not be any
    input or other output (the same file, or the same path), not be an existing
    device, FIFO, socket or directory, and be in a folder that exists and is writable.
    """
    outputs = [(name, Path(path)) for name, path in outputs if path is not None]
    inputs = [(name, Path(path)) for name, path in inputs if path is not None]
    check_file_names(outputs + inputs)
    for i, (name, path) in enumerate(outputs):
        for other, other_path in inputs:
            if _same(path, other_path):
                shown = "" if str(other_path) == str(path) else f" ({other_path})"
                raise LowmemError(f"{name} {path} would replace {other}{shown}, which the "
                                  f"command reads; choose another {name}")
        for other, other_path in outputs[:i]:
            if _same(path, other_path):
                raise LowmemError(f"{other} {other_path} and {name} {path} are the same file; "
                                  f"choose another {name}")
        if problem := _not_regular(path):
            raise LowmemError(f"{name} {path}: {problem}")
        folder = path.parent
        if not folder.is_dir():
            missing = "does not exist" if not folder.exists() else "is not a folder"
            raise LowmemError(f"{name} {path}: the folder {folder} {missing}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LowmemError(f"{name} {path}: the folder {folder} is not writable")
