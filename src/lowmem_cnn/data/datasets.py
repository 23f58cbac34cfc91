"""What a data set is, whichever files it comes from: splits of images read as rows on
demand, with their labels in memory.

IDX files (idx.py) and image folders (folders.py) both keep their images as rows of
C*H*W uint8 values one after another in a file, and both read them with ImageRows; the
book's in-memory arrays are read as rows by ArrayImages. Both idx.py and folders.py
import this module, and it imports neither.
"""

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import open_regular


def cache_dir() -> Path:
    """Where decompressed IDX files, downloaded MNIST and decoded folders are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lowmem-cnn"


class NoBar:
    """A progress bar that shows nothing: what callers get when there is no terminal
    to show one on, or no bar was asked for."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, text, refresh=True):
        pass

    def close(self):
        pass


class ImageRows:
    """uint8 images stored as rows of C*H*W values from byte `offset` of a file on, read a
    few rows at a time: an IDX file's images (`count` rows, in the file's order), or one
    split of an image folder's cache file (`file_rows`: the file row of each of its rows).

    Several threads may read at once (the trainer reads the next batch on one): pread
    where the OS has it, with no shared file position; elsewhere (Windows) seek and read,
    which a lock keeps together. close(), or the end of a with block, lets go of the file;
    one never closed is closed when the reader is collected.
    """

    pixels = True  # 0..255, divided by 255 on the way in (see Network.to_input)

    def __init__(self, path: Path, shape: tuple[int, int, int], offset: int, *,
                 count: int | None = None, file_rows: np.ndarray | None = None):
        if (count is None) == (file_rows is None):
            raise TypeError("give count or file_rows: one of them")
        self.path = Path(path)
        self.channels, self.rows, self.cols = shape
        self.row_bytes = self.channels * self.rows * self.cols
        self._offset = offset
        self._file_rows = file_rows  # None: row i is the file's row i
        self._count = len(file_rows) if count is None else count
        self._file = open_regular(self.path, "a file of images", buffering=0)
        # the rows asked for are in the file (it was checked, but may have changed since)
        last = self._count if file_rows is None else int(file_rows.max()) + 1 if len(file_rows) else 0
        size = os.fstat(self._file.fileno()).st_size
        if size < offset + last * self.row_bytes:
            self._file.close()
            raise LowmemError(f"{self.path}: {size:,} bytes, too few for the {last:,} images of "
                              f"{self.row_bytes:,} bytes it should hold (did it change?)")
        self._lock = None if hasattr(os, "preadv") else threading.Lock()

    def __len__(self):
        return self._count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._file.close()

    def empty(self, n: int) -> np.ndarray:
        """A buffer for `read` of n images."""
        return np.empty((n, self.row_bytes), np.uint8)

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images at `indices` (any order) as rows of uint8."""
        indices = np.asarray(indices)
        out = self.empty(len(indices)) if out is None else out
        at = indices if self._file_rows is None else self._file_rows[indices]
        for row, r in zip(out, at.tolist(), strict=False):  # out may be longer
            self._read_into(row, self._offset + r * self.row_bytes)
        return out[: len(indices)]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1; each run of consecutive file rows is one read."""
        out = self.empty(stop - start)
        if self._file_rows is None:
            self._read_into(out, self._offset + start * self.row_bytes)
            return out
        rows = self._file_rows[start:stop]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts, lasts = np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()
        for first, last in zip(firsts, lasts, strict=True):
            if first < last:  # an empty range has one empty run
                self._read_into(out[first:last], self._offset + int(rows[first]) * self.row_bytes)
        return out

    def _read_at(self, buffer, offset: int) -> int:
        if self._lock is None:
            return os.preadv(self._file.fileno(), [buffer], offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.readinto(buffer)

    def _read_into(self, out: np.ndarray, offset: int):
        """Fill the contiguous array `out` from byte `offset` of the file on."""
        done = self._read_at(out, offset)
        if done == out.nbytes:
            return
        view = memoryview(out).cast("B")
        while done < len(view):  # a short read: a signal, or over 2 GiB (Linux's most a call)
            got = self._read_at(view[done:], offset + done)
            if not got:
                raise LowmemError(f"{self.path}: file shrank while reading")
            done += got


class ArrayImages:
    """Images the caller holds in memory (N, C, H, W) or (N, C*H*W), e.g. the book's
    x_train, read as rows like an ImageRows'. The values are the network's input as
    they are (`pixels` False: not 0..255 pixels to divide by 255)."""

    pixels = False

    def __init__(self, x: np.ndarray, shape: tuple, name: str = "the images"):
        self.channels, self.rows, self.cols = shape
        self.row_bytes = self.channels * self.rows * self.cols  # values, not bytes
        self._rows = x.reshape(len(x), self.row_bytes)  # a view of a contiguous x: no copy
        self.path = name
        self.count = len(x)

    def __len__(self):
        return self.count

    def empty(self, n: int) -> np.ndarray:
        return np.empty((n, self.row_bytes), self._rows.dtype)

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = self.empty(len(indices)) if out is None else out
        np.take(self._rows, indices, axis=0, out=out[: len(indices)])
        return out[: len(indices)]

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self._rows[start:stop]


class SubsetImages:
    """Some rows of another reader (an ImageRows or ArrayImages), by index, read as a
    reader's are: e.g. the validation images held out of a training split."""

    def __init__(self, images, indices: np.ndarray):
        self._images, self._indices = images, indices
        self.pixels, self.path = images.pixels, images.path
        self.channels, self.rows, self.cols = images.channels, images.rows, images.cols

    def __len__(self):
        return len(self._indices)

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._images.read(self._indices[indices], out)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return self._images.read(self._indices[start:stop])


@dataclass
class Split:
    images: ImageRows | ArrayImages | SubsetImages
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    test: Split
    source: str  # where the files came from, for the user
    is_mnist: bool  # all four files have MNIST's SHA-256

    def describe(self):
        kind = "MNIST, SHA-256 verified" if self.is_mnist else "IDX data set (not MNIST's checksums)"
        return (f"{self.source} ({kind}): {len(self.train):,} train, {len(self.test):,} test "
                f"images of {self.train.images.rows}x{self.train.images.cols}")

    def close(self):
        """Let go of the files the splits read."""
        self.train.images.close()
        self.test.images.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
