"""MNIST-style IDX data: find it, verify it, and read uint8 rows on demand; and
open_data, which opens IDX files or (through folders.py) a folder of pictures.

Images are never loaded whole: each batch is read from the (decompressed) file with
pread (datasets.ImageRows), so the process holds only the rows it uses. Labels (one
byte an image) are held in memory. Gzipped files are decompressed once into the user
cache; the data directory itself is never written.
"""

import gzip
import hashlib
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn.data.datasets import ArrayImages, NoBar  # noqa: F401 (the faces import them from here)
from lowmem_cnn.data.datasets import Dataset, ImageRows, Split, cache_dir
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import open_regular
from lowmem_cnn.common.writing import atomic_write

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
# Sides of an IDX file's images: as config.MAX_WHOLE, the largest input a network takes.
MAX_SIDE = 1 << 16
# Deflate turns one byte into at most 1032 (258 bytes from 2 bits): a gzip file whose
# header declares more than that many times its size lies, and is refused before a
# byte is written.
DEFLATE_MOST_RATIO = 1032
# 16 MiB: MNIST's largest file is 9.9 MB gzipped; a mirror sending more is wrong.
MAX_DOWNLOAD = 16 * 2**20


# --- IDX files --------------------------------------------------------------------


def _kind(magic: int) -> tuple[int, str]:
    """(dimensions, what) of an IDX file with this magic number: images or labels."""
    return (3, "images") if magic == IMAGES_MAGIC else (1, "labels")


def _magic_of(name: str) -> int:
    return IMAGES_MAGIC if "images" in name else LABELS_MAGIC


def _dims(where, head: bytes, magic: int) -> tuple[int, ...]:
    """The dimensions an IDX header declares, checked for sense: one image or label at
    least, sides of 1 to MAX_SIDE. `head` is the file's first bytes (the header or less)."""
    ndim, what = _kind(magic)
    if len(head) < 4:
        raise LowmemError(f"{where}: not an IDX file (only {len(head)} bytes)")
    (found,) = struct.unpack(">I", head[:4])
    if found != magic:
        raise LowmemError(f"{where}: not an IDX {what} file (magic number 0x{found:08x}, "
                          f"expected 0x{magic:08x})")
    if len(head) < 4 + 4 * ndim:
        raise LowmemError(f"{where}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    if dims[0] == 0:
        raise LowmemError(f"{where}: holds no {what} (its header declares 0)")
    if ndim == 3 and not (1 <= dims[1] <= MAX_SIDE and 1 <= dims[2] <= MAX_SIDE):
        raise LowmemError(f"{where}: its header declares images of {dims[1]}x{dims[2]}: "
                          f"sides are 1 to {MAX_SIDE:,} pixels")
    return dims


def _idx_bytes(dims) -> int:
    """The size of an IDX file of these dimensions (Python ints: no overflow)."""
    return 4 + 4 * len(dims) + math.prod(dims)


def _header(path: Path, magic: int) -> tuple[int, ...]:
    """The dimensions in an IDX header, checked against the file's size before anything
    the header asks for is allocated."""
    what = _kind(magic)[1]
    try:
        with open_regular(path, f"an IDX {what} file") as f:
            head = f.read(4 + 4 * _kind(magic)[0])
            size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise LowmemError(f"{path}: cannot read ({err.strerror})") from None
    dims = _dims(path, head, magic)
    expected = _idx_bytes(dims)
    if size < expected:
        raise LowmemError(f"{path}: truncated: the header declares {' x '.join(map(str, dims))} "
                          f"bytes of {what} ({expected:,} bytes in all) but the file has {size:,}")
    if size > expected:
        raise LowmemError(f"{path}: {size - expected:,} bytes of trailing data after "
                          f"{' x '.join(map(str, dims))} {what}")
    return dims


def open_images(path: Path) -> ImageRows:
    """The uint8 images of an IDX file, read a few rows at a time."""
    count, rows, cols = _header(path, IMAGES_MAGIC)
    return ImageRows(path, (1, rows, cols), IMAGES_OFFSET, count=count)


def read_labels(path: Path) -> np.ndarray:
    (count,) = _header(path, LABELS_MAGIC)
    labels = np.empty(count, np.uint8)  # no more than the file holds: _header saw its size
    try:
        with open_regular(path, "an IDX labels file") as f:
            f.seek(8)
            got = f.readinto(labels)
    except OSError as err:
        raise LowmemError(f"{path}: cannot read ({err.strerror})") from None
    if got != count:
        raise LowmemError(f"{path}: file shrank while reading")
    if labels.max() >= CLASSES:
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


def _decompress(source: Path, target: Path, expected_sha: str | None = None) -> str:
    """Decompress a gzip IDX file atomically into `target` (its name says images or
    labels); return the SHA-256 of its content. The header is checked first and the
    stream against it as it comes: no byte past what the header declares is written,
    and nothing is left at `target` (or beside it) unless the whole file is right and,
    given `expected_sha`, has that SHA-256."""
    magic = _magic_of(target.name)
    ndim, what = _kind(magic)
    digest = hashlib.sha256()
    packed = open_regular(source, "a gzip file")
    with packed, gzip.GzipFile(fileobj=packed) as src, atomic_write(target, "decompressed data") as dst:
        try:
            head = src.read(4 + 4 * ndim)
            dims = _dims(source, head, magic)
            expected = _idx_bytes(dims)
            packed_size = os.fstat(packed.fileno()).st_size
            if expected > DEFLATE_MOST_RATIO * packed_size:
                raise LowmemError(f"{source}: its header declares {expected:,} bytes of {what}, more "
                                  f"than a gzip file of {packed_size:,} bytes can hold")
            got = len(head)
            digest.update(head)
            dst.write(head)
            # one byte more than the header leaves, to see whether the stream goes on
            while chunk := src.read(min(_CHUNK, expected - got + 1)):
                got += len(chunk)
                if got > expected:
                    raise LowmemError(f"{source}: trailing data after {' x '.join(map(str, dims))} "
                                      f"{what} (more than the {expected:,} bytes its header declares)")
                digest.update(chunk)
                dst.write(chunk)
            if got < expected:
                raise LowmemError(f"{source}: truncated: the header declares "
                                  f"{' x '.join(map(str, dims))} {what} ({expected:,} bytes in all) "
                                  f"but it holds {got:,}")
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:
            raise LowmemError(f"{source}: damaged gzip file ({err or 'it ends early'})") from None
        if expected_sha is not None and digest.hexdigest() != expected_sha:
            raise LowmemError(f"SHA-256 {digest.hexdigest()[:12]}... is not MNIST's {expected_sha[:12]}...")
    return digest.hexdigest()


def _cached(target: Path, checksum: Path) -> str | None:
    """The SHA-256 recorded for a decompressed file in the cache, if the file is there
    and still fits its header; else None, and what there was is removed (a file that
    fails the checks is decompressed again, not kept)."""
    try:
        with open_regular(checksum, "a checksum") as f:
            recorded = f.read(65).decode("ascii")
        if len(recorded.strip()) != 64:
            raise LowmemError("not a SHA-256")
        _header(target, _magic_of(target.name))
        return recorded.strip()
    except (OSError, UnicodeDecodeError, LowmemError):
        for path in (target, checksum):
            path.unlink(missing_ok=True)
        return None


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
    if target.exists() or checksum.exists():
        recorded = _cached(target, checksum)
        if recorded is not None:
            return target, recorded == MNIST_SHA256[name]
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
    deleted and the next mirror tried. Nothing partial is left behind, and two
    processes may fill one `target_dir` at once: each downloads and decompresses into
    temporary files of its own, and a file appears under its name (os.replace) only
    whole and verified.
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
            packed = None
            try:
                fd, packed = tempfile.mkstemp(prefix=f".{name}.", suffix=".gz.download", dir=target_dir)
                with os.fdopen(fd, "wb") as out:
                    _fetch(url, out, progress)
                _decompress(Path(packed), target_dir / name, expected_sha=sha)
                break
            except (OSError, LowmemError) as err:
                failures.append(f"{url}: {getattr(err, 'reason', None) or err}")
            finally:
                if packed is not None:
                    Path(packed).unlink(missing_ok=True)
        else:
            raise LowmemError(
                f"could not download {name} ({'; '.join(failures)}). Put the four MNIST files "
                "(gzipped or not) in a directory and pass --data-dir DIR"
            )


def _fetch(url: str, out, progress):
    """Write what `url` serves into the binary file `out`, at most MAX_DOWNLOAD bytes."""
    import urllib.request  # only when downloading: it brings in ssl and email, megabytes of RSS

    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0)
        if total > MAX_DOWNLOAD:
            raise OSError(f"{total:,} bytes: MNIST's files are at most {MAX_DOWNLOAD:,}")
        bar = progress(total, url.rsplit("/", 1)[-1]) if progress else None
        try:
            got = 0
            while chunk := response.read(_CHUNK):
                got += len(chunk)
                if got > MAX_DOWNLOAD:
                    raise OSError(f"more than {MAX_DOWNLOAD:,} bytes: MNIST's files are smaller")
                out.write(chunk)
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
    split_seed: int = 0  # with test_fraction, chooses a drawn split's test pictures


@dataclass
class DataOptions:
    """Where the data is, and how to read it if it is a folder of pictures; with the
    callbacks a face passes: progress(total, description) -> a bar with update(n) and
    close() (downloads, in bytes), image_progress (the decoding pass, in pictures),
    warn(message) (skipped files) and report(text) (what data was opened)."""

    data_dir: Path | None = None
    image_size: tuple | None = None  # (H, W); None: the network's (or the trained one's)
    # a drawn split's share of test pictures; None: not given (folders.TEST_FRACTION, or
    # for eval the share the network was trained with: session.Session)
    test_fraction: float | None = None
    strict: bool = False
    split_seed: int = 0  # the seed of a drawn split
    progress: object = None
    image_progress: object = None
    warn: object = None
    report: object = None

    def is_folder(self) -> bool:
        return is_image_folder(self.data_dir)

    def open(self, decode_room, size=None, channels: int | None = None):
        """The data set: a folder's pictures made (C, H, W) = (channels or theirs, size),
        each decoded within decode_room() bytes, what the budget leaves (asked only for a
        folder, once its modules are imported: planner.decode_room); or the IDX files."""
        folder = None
        if self.is_folder():
            from lowmem_cnn.data.folders import TEST_FRACTION  # (imported by is_folder already)

            folder = FolderOptions(tuple(self.image_size or size), channels,
                                   self.test_fraction or TEST_FRACTION, self.strict,
                                   decode_room(), self.warn, self.image_progress,
                                   self.split_seed)
        data = open_data(self.data_dir, self.progress, folder)
        if self.report:
            self.report(f"data: {data.describe()}")
        return data


def data_directory(data_dir: Path | None) -> tuple[Path | None, str | None]:
    """(--data-dir, else $LOWMEM_CNN_DATA, else None; how to name it)."""
    if data_dir is not None:
        return Path(data_dir), None
    if os.environ.get("LOWMEM_CNN_DATA"):
        return Path(os.environ["LOWMEM_CNN_DATA"]), "$LOWMEM_CNN_DATA=" + os.environ["LOWMEM_CNN_DATA"]
    return None, None


def is_image_folder(data_dir: Path | None) -> bool:
    """Whether the data directory holds a folder of pictures rather than IDX files."""
    directory, _ = data_directory(data_dir)
    if directory is None or not directory.is_dir() or any(directory.glob("*-idx[13]-ubyte*")):
        return False
    # Imported only for a directory that may be one: folders.py and what it brings (json,
    # imaging) add 0.4 MiB of RSS that MNIST does not need.
    from lowmem_cnn.data import folders
    return folders.has_class_folders(directory)


def open_data(data_dir: Path | None = None, progress=None, folder: FolderOptions | None = None):
    """The data set from --data-dir, else $LOWMEM_CNN_DATA, else the cache (downloading
    MNIST): four IDX files, or with `folder` a folder of pictures."""
    directory, source = data_directory(data_dir)
    if directory is not None and folder is not None and is_image_folder(directory):
        from lowmem_cnn.data.folders import open_folder  # see is_image_folder

        return open_folder(directory, folder.image_size, folder.channels, folder.test_fraction,
                           folder.split_seed, strict=folder.strict, max_decode_bytes=folder.max_decode_bytes,
                           progress=folder.progress, warn=folder.warn, source=source)
    if directory is not None:
        return open_directory(directory, source=source)
    target = cache_dir() / "mnist"
    download_mnist(target, progress)
    return open_directory(target, verified=True)
