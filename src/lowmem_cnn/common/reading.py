"""Reading files that come from elsewhere: every byte is untrusted until checked.

A small file is read only if it is a regular one and no larger than its kind ever is; a
JSON text is parsed only once its brackets are known not to nest deeper than its format.
"""

import os
import re
import stat
from pathlib import Path

from lowmem_cnn.common.errors import LowmemError

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def shown(value, most: int = 40) -> str:
    """A value from an untrusted file as a message may print it: escaped, and short."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def shown_name(value) -> str:
    """A name (a layer type, a setting) as a message says it: as it is if it prints."""
    return value if isinstance(value, str) and value.isprintable() and len(value) <= 40 else shown(value)


def _nonblocking(path, flags):
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path: Path, what: str, buffering: int = -1):
    """`path` opened for binary reading if it is a regular file. A FIFO or a device
    (/dev/zero), or a link to one, is refused: the open does not wait for a writer
    (O_NONBLOCK) and the kind is checked on the open file. `what` names the kind of
    file in the error ("an IDX images file")."""
    try:
        f = open(path, "rb", buffering=buffering, opener=_nonblocking)
    except OSError as err:
        raise LowmemError(f"{path}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise LowmemError(f"{path}: not a regular file, so not {what}")
    return f


def read_small_regular_file(path: Path, limit: int, what: str) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes, or None if there is none.
    A FIFO, a device (/dev/zero) or a link to one is refused before a byte is read: the
    open does not wait for a writer (O_NONBLOCK) and its kind is checked on the open file.
    `what` names the kind of file in the errors ("a parameter file's description")."""
    data = read_regular_file(path, limit, what)
    return None if data is None else bytes(data)


def read_regular_file(path: Path, limit: int, what: str) -> bytearray | None:
    """read_small_regular_file's bytes, in a bytearray of the file's size: what a reader
    that keeps views of the bytes (and may change them in place) takes."""
    if not os.path.exists(path):
        if os.path.lexists(path):
            raise LowmemError(f"{path}: a link to nothing, not {what}")
        return None
    with open_regular(path, what, buffering=0) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise LowmemError(f"{path}: {size:,} bytes, more than {what} ever holds ({limit:,})")
            data = bytearray(size)
            view, got = memoryview(data), 0
            while got < len(data):
                count = f.readinto(view[got:])
                if not count:
                    break
                got += count
            view.release()
            if got < len(data) or f.read(1):  # changed while read
                raise LowmemError(f"{path}: it changed while it was read; try again")
            return data
        except OSError as err:
            raise LowmemError(f"{path}: cannot read ({err.strerror})") from None


def nesting(text: str, most: int) -> int:
    """How deep the brackets of a JSON text nest (strings aside), counted up to `most` + 1:
    json.loads recurses once per level, so 100,000 of them end in RecursionError."""
    depth = deepest = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > most:
                break
    return deepest


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON has")


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a field is given twice")
    return dict(pairs)


def parse_json(where: Path, data: bytes, what: str, most_nesting: int, constants: bool = False):
    """The JSON value of `data`: UTF-8, nested at most `most_nesting` deep, no NaN or
    Infinity (unless `constants`), no field given twice; a LowmemError naming `where`
    otherwise."""
    import json  # here: the IDX files are read through open_regular, and need no JSON

    refused = f"{where}: not {what}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LowmemError(f"{refused}: not UTF-8 text (byte {err.start})") from None
    if nesting(text, most_nesting) > most_nesting:
        raise LowmemError(f"{refused}: it nests deeper than {most_nesting} levels")
    try:
        return json.loads(text, parse_constant=None if constants else _refuse_constant,
                          object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise LowmemError(f"{refused}: not valid JSON ({shown(str(err), 80)})") from None
