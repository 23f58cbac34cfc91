"""MNIST-style IDX data: find it, verify it, and read uint8 rows on demand; and
open_data, which opens IDX files or (through folders.py) a folder of pictures.

Images are never loaded whole: each batch is read from the (decompressed) file with
pread (datasets.ImageRows), so the process holds only the rows it uses. Labels (one
byte an image) are held in memory. Gzipped files are decompressed once into the user
cache; the data directory itself is never written.
"""

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn.datasets import ArrayImages, NoBar  # noqa: F401 (the faces import them from here)
from lowmem_cnn.datasets import Dataset, ImageRows, Split, cache_dir
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.files import atomic_write

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
IMAGES_OFFSET = 16  # bytes of an images file's header: magic and three dimensions
CLASSES = 10

FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed MNIST files (LeCun, Cortes, Burges; CC BY-SA 3.0).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The public mirrors that torchvision and the book's loader use; override with
# LOWMEM_CNN_MIRRORS (URLs separated by spaces).
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")

_CHUNK = 1 << 20


# --- IDX files --------------------------------------------------------------------


def _header(path: Path, magic: int) -> tuple[int, ...]:
    """The dimensions in an IDX header, checked against the file's size."""
    ndim = 3 if magic == IMAGES_MAGIC else 1
    what = "images" if magic == IMAGES_MAGIC else "labels"
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise LowmemError(f"{path}: cannot read ({err.strerror})") from None
    if len(head) < 4:
        raise LowmemError(f"{path}: not an IDX file (only {size} bytes)")
    (found,) = struct.unpack(">I", head[:4])
    if found != magic:
        raise LowmemError(f"{path}: not an IDX {what} file (magic number 0x{found:08x}, "
                          f"expected 0x{magic:08x})")
    if len(head) < 4 + 4 * ndim:
        raise LowmemError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if size < expected:
        raise LowmemError(f"{path}: truncated: the header declares {' x '.join(map(str, dims))} "
                          f"bytes of {what} ({expected} bytes in all) but the file has {size}")
    if size > expected:
        raise LowmemError(f"{path}: {size - expected} bytes of trailing data after "
                          f"{' x '.join(map(str, dims))} {what}")
    return dims


def open_images(path: Path) -> ImageRows:
    """The uint8 images of an IDX file, read a few rows at a time."""
    count, rows, cols = _header(path, IMAGES_MAGIC)
    return ImageRows(path, (1, rows, cols), IMAGES_OFFSET, count=count)


def read_labels(path: Path) -> np.ndarray:
    (count,) = _header(path, LABELS_MAGIC)
    labels = np.fromfile(path, np.uint8, offset=8)
    if count and labels.max() >= CLASSES:
        bad = int(np.argmax(labels >= CLASSES))
        raise LowmemError(f"{path}: label {labels[bad]} at index {bad} is outside 0..{CLASSES - 1}")
    return labels


# --- finding, decompressing and downloading ---------------------------------------


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _decompress(source: Path, target: Path):
    """Decompress a gzip file atomically into `target`; return the SHA-256 of its content."""
    digest = hashlib.sha256()
    try:
        src = gzip.open(source, "rb")
    except OSError as err:
        raise LowmemError(f"{source}: cannot read ({err.strerror})") from None
    with src, atomic_write(target, "decompressed data") as dst:
        try:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise LowmemError(f"{source}: damaged gzip file ({err or 'it ends early'})") from None
    return digest.hexdigest()


def _raw_file(directory: Path, name: str) -> tuple[Path, bool | None]:
    """The uncompressed file for `name` in `directory`, decompressing `name.gz` to the cache.

    Returns the path and whether its content has MNIST's SHA-256 (None: not yet known).
    """
    raw, packed = directory / name, directory / f"{name}.gz"
    if raw.is_file():
        return raw, None
    if not packed.is_file():
        raise LowmemError(f"{directory}: missing {name} (or {name}.gz)")
    try:
        stat = packed.stat()
    except OSError as err:
        raise LowmemError(f"{packed}: cannot read ({err.strerror})") from None
    key = hashlib.sha256(f"{packed.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    target_dir = cache_dir() / "decompressed" / key.hexdigest()[:16]
    target, checksum = target_dir / name, target_dir / f"{name}.sha256"
    if target.is_file() and checksum.is_file():
        return target, checksum.read_text().strip() == MNIST_SHA256[name]
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LowmemError(f"cannot create the cache directory {target_dir}: {err.strerror}") from None
    sha = _decompress(packed, target)
    with atomic_write(checksum, "checksum") as f:
        f.write(sha.encode())
    return target, sha == MNIST_SHA256[name]


def open_directory(directory: Path, source: str | None = None, verified: bool = False) -> Dataset:
    """The four IDX files of `directory`, checked for structure and recognised by checksum
    (`verified`: the caller has checked MNIST's checksums already)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LowmemError(f"{directory}: no such data directory")
    paths, known = {}, []
    for key, name in FILES.items():
        paths[key], is_mnist = _raw_file(directory, name)
        known.append(is_mnist)
    splits = {}
    for split in ("train", "test"):
        labels = read_labels(paths[split, "labels"])
        images = open_images(paths[split, "images"])
        if len(images) != len(labels):
            raise LowmemError(f"{paths[split, 'images']}: {len(images)} images but "
                              f"{paths[split, 'labels'].name} has {len(labels)} labels")
        splits[split] = Split(images, labels)
    if (splits["train"].images.rows, splits["train"].images.cols) != (
            splits["test"].images.rows, splits["test"].images.cols):
        raise LowmemError(f"{directory}: train and test images differ in size")
    # Checksums are only worth computing for files of MNIST's exact size.
    mnist_sized = len(splits["train"]) == 60000 and len(splits["test"]) == 10000
    is_mnist = verified or mnist_sized and all(
        known[i] if known[i] is not None else _sha256_of(paths[key]) == MNIST_SHA256[FILES[key]]
        for i, key in enumerate(FILES))
    return Dataset(splits["train"], splits["test"], source or str(directory), is_mnist)


def _mirrors():
    env = os.environ.get("LOWMEM_CNN_MIRRORS")
    return tuple(env.split()) if env else MIRRORS


def download_mnist(target_dir: Path, progress=None):
    """Fetch the four MNIST files into `target_dir` (decompressed and verified).

    Each file is tried at every mirror in turn; a file that fails verification is
    deleted and the next mirror tried. Nothing partial is left behind.
    """
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LowmemError(f"cannot create the cache directory {target_dir}: {err.strerror}") from None
    for name, sha in MNIST_SHA256.items():
        if (target_dir / name).is_file():
            continue
        failures = []
        for mirror in _mirrors():
            url = mirror.rstrip("/") + f"/{name}.gz"
            packed = target_dir / f".{name}.gz.download"
            try:
                _fetch(url, packed, progress)
                got = _decompress(packed, target_dir / f".{name}.check")
                if got != sha:
                    raise LowmemError(f"SHA-256 {got[:12]}... is not MNIST's {sha[:12]}...")
                os.replace(target_dir / f".{name}.check", target_dir / name)
                break
            except (OSError, LowmemError) as err:
                failures.append(f"{url}: {getattr(err, 'reason', None) or err}")
            finally:
                for leftover in (packed, target_dir / f".{name}.check"):
                    leftover.unlink(missing_ok=True)
        else:
            raise LowmemError(
                f"could not download {name} ({'; '.join(failures)}). Put the four MNIST files "
                "(gzipped or not) in a directory and pass --data-dir DIR"
            )


def _fetch(url: str, target: Path, progress):
    import urllib.request  # only when downloading: it brings in ssl and email, megabytes of RSS

    with urllib.request.urlopen(url, timeout=30) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        bar = progress(total, url.rsplit("/", 1)[-1]) if progress else None
        try:
            got = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                got += len(chunk)
                if bar:
                    bar.update(len(chunk))
            if total and got != total:
                raise OSError(f"connection closed after {got} of {total} bytes")
        finally:
            if bar:
                bar.close()


@dataclass
class FolderOptions:
    """How to read a folder of pictures (see folders.open_folder)."""

    image_size: tuple  # (H, W)
    channels: int | None = None  # None: from the pictures
    test_fraction: float = 0.2
    strict: bool = False
    max_decode_bytes: int | None = None
    warn: object = None  # warn(message) for skipped files
    progress: object = None  # progress(total, description) -> a bar for the decoding pass


# A budget that leaves less than this to decode a picture is refused at once (every
# decode is estimated at 3 MiB at least, see imaging.decode_bytes).
MIN_DECODE_BYTES = 4 * 2**20


@dataclass
class DataOptions:
    """Where the data is, and how to read it if it is a folder of pictures; with the
    callbacks a face passes: progress(total, description) -> a bar with update(n) and
    close() (downloads, in bytes), image_progress (the decoding pass, in pictures),
    warn(message) (skipped files) and report(text) (what data was opened)."""

    data_dir: Path | None = None
    image_size: tuple | None = None  # (H, W); None: the network's (or the trained one's)
    test_fraction: float = 0.2
    strict: bool = False
    progress: object = None
    image_progress: object = None
    warn: object = None
    report: object = None

    def is_folder(self) -> bool:
        return is_image_folder(self.data_dir)

    def open(self, budget: int, size=None, channels: int | None = None):
        """The data set: a folder's pictures made (C, H, W) = (channels or theirs, size),
        each decoded within the room the budget leaves; or the IDX files."""
        folder = None
        if self.is_folder():
            folder = FolderOptions(tuple(self.image_size or size), channels, self.test_fraction,
                                   self.strict, decode_room(budget), self.warn, self.image_progress)
        data = open_data(self.data_dir, self.progress, folder)
        if self.report:
            self.report(f"data: {data.describe()}")
        return data


def decode_room(budget: int) -> int:
    """Bytes one picture may take to decode: what the budget leaves (the decoding pass
    holds one picture at a time)."""
    from lowmem_cnn.budget import current_rss, format_size
    from lowmem_cnn.planner import MARGIN_BYTES

    held = current_rss()
    room = budget - held - MARGIN_BYTES
    if room < MIN_DECODE_BYTES:
        raise LowmemError(f"the budget of {budget:,} bytes leaves no room to decode pictures: the "
                          f"process already holds {format_size(held)}")
    return room


def data_directory(data_dir: Path | None) -> tuple[Path | None, str | None]:
    """(--data-dir, else $LOWMEM_CNN_DATA, else None; how to name it)."""
    if data_dir is not None:
        return Path(data_dir), None
    if os.environ.get("LOWMEM_CNN_DATA"):
        return Path(os.environ["LOWMEM_CNN_DATA"]), "$LOWMEM_CNN_DATA=" + os.environ["LOWMEM_CNN_DATA"]
    return None, None


def is_image_folder(data_dir: Path | None) -> bool:
    directory, _ = data_directory(data_dir)
    if directory is None:
        return False
    # Imported only for a directory to look at: folders.py and what it brings (json,
    # imaging) add 0.4 MiB of RSS that MNIST from the cache does not need.
    from lowmem_cnn import folders

    return folders.is_image_folder(directory)


def open_data(data_dir: Path | None = None, progress=None, folder: FolderOptions | None = None):
    """The data set from --data-dir, else $LOWMEM_CNN_DATA, else the cache (downloading
    MNIST): four IDX files, or with `folder` a folder of pictures."""
    directory, source = data_directory(data_dir)
    if directory is not None and folder is not None and is_image_folder(directory):
        from lowmem_cnn.folders import open_folder  # see is_image_folder

        return open_folder(directory, folder.image_size, folder.channels, folder.test_fraction,
                           strict=folder.strict, max_decode_bytes=folder.max_decode_bytes,
                           progress=folder.progress, warn=folder.warn, source=source)
    if directory is not None:
        return open_directory(directory, source=source)
    target = cache_dir() / "mnist"
    download_mnist(target, progress)
    return open_directory(target, verified=True)
