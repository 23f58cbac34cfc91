"""Folders of your own pictures as a data set: the same shape as the IDX data of data.py
(a datasets.Dataset whose splits' images are datasets.ImageRows).

Layouts (class names are folder names, sorted):
- `ROOT/train/<class>/...` and `ROOT/test/<class>/...`: the split is given. A class in
  test/ must be one of train/'s; train/ may have classes test/ lacks.
- `ROOT/<class>/...`: the split is drawn. Of a class's n pictures, the
  round(n * test_fraction) (at most n - 1) whose draw (the SHA-256 of the seed and
  the file's relative path) is smallest are the test ones: the same every run, and a
  file added or removed moves at most one other file to the other side.
Files may be in subfolders of a class folder. Hidden files and folders (names starting
with ".") are ignored, and so are files outside class folders (a README in ROOT).

Decoding once: the first open decodes every picture (imaging.image_row: gray or RGB,
shorter side scaled to the target, centre-cropped to H x W) and streams the rows into
a cache file in the user cache; later opens read rows from it with pread, as IDX files
are read (datasets.ImageRows). The decoding pass holds one picture at a time, however
many there are; what grows with their number is the listing (the relative paths as one
blob, a label and a status byte: about 50 bytes a file, twice that while it is sorted).
A file that is not a usable picture is skipped with a warning that names it (an error
with strict=True).

Cache file (`cache_dir()/folders/<folder>-<key>.rows`), little-endian:
    0   magic b"LMCNNIMG", u32 format version (1), u32 channels, u32 height, u32 width
    24  u64 files in the listing, u64 rows (pictures decoded)
    40  u64 offset and u64 length of the JSON trailer; zeros up to byte 64
    64  rows: C*H*W uint8 values each, channel by channel (all of channel 0's H x W
        values row by row, then channel 1's, ...): what Network.to_input takes
    then one label byte per row, one status byte per listed file (1: decoded, in
        listing order, 0: skipped), and the JSON trailer: the classes, and each skipped
        file, why, and for one too large to decode the bytes it needed (a run with a
        larger budget decodes it)
The listing is the files in order of part (train, test; or the one folder), then of
the SHA-256 of their relative path: a fixed shuffle, so that the first N rows of a
split mix the classes. The key is the SHA-256 of the format version, the input shape
asked for (H, W, channels or "auto") and every file's relative path, size and mtime
(in the order the folder is walked: sorted names, folder by folder): a file added,
removed or touched makes another key, and the folder is decoded again.
One cache file is kept per folder and shape; a rebuild removes the older ones.
"""

import hashlib
import json
import os
import struct
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowmem_cnn.datasets import Dataset, ImageRows, NoBar, Split, cache_dir
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.files import atomic_write
from lowmem_cnn.imaging import DEFAULT_MAX_DECODE_BYTES, ImageRefused, image_row, is_color

FORMAT_VERSION = 1
MAGIC = b"LMCNNIMG"
HEADER = struct.Struct("<8sIIIIQQQQ")
HEADER_BYTES = 64
TEST_FRACTION = 0.2
MAX_CLASSES = 256  # labels are one byte
# Skipped files named in a warning; the rest are counted.
NAMED_SKIPS = 10


class SkippedFilesWarning(UserWarning):
    """Files in an image folder that are not usable pictures were left out."""


# --- the listing ---------------------------------------------------------------------


class FileNames:
    """Relative paths (POSIX) of a split's rows, kept as one bytes blob: a few bytes a
    file instead of a Python string each."""

    def __init__(self, blob: bytes, starts: np.ndarray, entries: np.ndarray):
        self._blob, self._starts, self._entries = blob, starts, entries

    def __len__(self):
        return len(self._entries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        e = int(self._entries[i])
        return os.fsdecode(self._blob[self._starts[e] : self._starts[e + 1]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class _Listing:
    root: Path
    layout: str  # "train/test" or "one folder"
    classes: list[str]
    blob: bytes  # relative paths, in listing order, end to end
    starts: np.ndarray  # int64, len + 1: path i is blob[starts[i]:starts[i + 1]]
    labels: np.ndarray  # uint8 class of each file
    test: np.ndarray  # bool: the file is in test/ (train/test layout)
    digest: bytes  # SHA-256 of every file's relative path, size and mtime (walk order)

    def __len__(self):
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.fsdecode(self.blob[self.starts[i] : self.starts[i + 1]])

    def file(self, i: int) -> str:
        # a string, not root / path: Python 3.11's pathlib interns every part of a
        # Path, so each file name would add to the table of interned strings, which
        # never shrinks (seen as a 0.9 MiB step in a traced 800-file decoding pass)
        return os.path.join(self.root, self.path(i))

    def key(self, size, channels) -> str:
        """The cache key: the format, the input shape asked for and the listing."""
        return hashlib.sha256(f"lowmem-cnn image folder {FORMAT_VERSION}\0{size[0]}x{size[1]}\0"
                              f"{channels or 'auto'}\0".encode() + self.digest).hexdigest()


def _ints(values: np.ndarray, chunk: int = 4096):
    """The values as Python ints, a chunk at a time (a list of them all would take 36
    bytes a value)."""
    for start in range(0, len(values), chunk):
        yield from values[start : start + chunk].tolist()


def _visible(entries):
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _scan(directory: Path):
    try:
        with os.scandir(directory) as it:
            return _visible(it)
    except OSError as err:
        raise LowmemError(f"{directory}: cannot list ({err.strerror})") from None


def _class_dirs(part: Path) -> list[str]:
    names = [e.name for e in _scan(part) if e.is_dir()]
    if not names:
        raise LowmemError(f"{part}: no class folders (expected {part}/<class>/<picture files>)")
    return names


def _files_under(directory: Path, prefix: str):
    """(relative path, size, mtime_ns) of each file under `directory`, subfolders
    included (symbolic links to folders are not followed), sorted by name."""
    for entry in _scan(directory):
        rel = f"{prefix}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(Path(entry.path), rel)
            continue
        try:
            st = entry.stat()
        except OSError:  # a dangling link: listed, and skipped when decoded
            yield rel, -1, 0
            continue
        if entry.is_file():
            yield rel, st.st_size, st.st_mtime_ns


def _list_folder(root: Path) -> _Listing:
    if not root.is_dir():
        raise LowmemError(f"{root}: no such folder")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        there, missing = ("train", "test") if has_train else ("test", "train")
        raise LowmemError(f"{root}: has {there}/ but no {missing}/ (use train/<class>/ and "
                          f"test/<class>/, or put the class folders straight in {root})")
    parts = ["train", "test"] if has_train else [""]
    classes = _class_dirs(root / parts[0])
    if len(classes) > MAX_CLASSES:
        raise LowmemError(f"{root / parts[0]}: {len(classes)} class folders; at most {MAX_CLASSES}")
    if len(classes) < 2:
        raise LowmemError(f"{root / parts[0]}: only one class folder ({classes[0]}); a classifier "
                          "needs at least two")
    index = {name: k for k, name in enumerate(classes)}
    # Compact columns, not a Python object per file: a listing of 70,000 files is then
    # a few MiB, not tens.
    blob, ends, digest = bytearray(), array("q", [0]), hashlib.sha256()
    labels, test, shuffle = array("B"), array("B"), array("Q")
    for part in parts:
        part_dir = root / part if part else root
        for name in _class_dirs(part_dir) if part == "test" else classes:
            if name not in index:
                raise LowmemError(f"{part_dir / name}: class {name!r} is not in {root / 'train'}")
            before = len(labels)
            for rel, size, mtime in _files_under(part_dir / name, f"{part}/{name}" if part else name):
                encoded = os.fsencode(rel)
                blob += encoded
                ends.append(len(blob))
                digest.update(b"%s\0%d\0%d\n" % (encoded, size, mtime))
                labels.append(index[name])
                test.append(part == "test")
                shuffle.append(int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big"))
            if len(labels) == before:
                raise LowmemError(f"{part_dir / name}: empty class folder (no files)")
    # Listing order: part, then the SHA-256 of the relative path (see the module notes).
    old_starts = np.frombuffer(ends, np.int64)
    order = np.lexsort((np.frombuffer(shuffle, np.uint64), np.frombuffer(test, np.uint8)))
    del shuffle
    starts = np.zeros(len(order) + 1, np.int64)
    np.cumsum(np.diff(old_starts)[order], out=starts[1:])
    ordered = bytearray(len(blob))
    for new, old in enumerate(_ints(order)):
        ordered[starts[new] : starts[new + 1]] = blob[old_starts[old] : old_starts[old + 1]]
    del blob
    return _Listing(
        root=root, layout="train/test" if has_train else "one folder", classes=classes,
        blob=bytes(ordered), starts=starts, labels=np.frombuffer(labels, np.uint8)[order],
        test=np.frombuffer(test, np.uint8)[order].astype(bool), digest=digest.digest())


# --- the cache file -------------------------------------------------------------------


@dataclass
class _Cache:
    channels: int
    decoded: np.ndarray  # bool per listed file
    skipped: list  # [relative path, reason, bytes needed or None]


def _read_cache(path: Path, listing: _Listing, size, max_decode_bytes) -> _Cache | None:
    """The cache at `path` if it is whole and fits `listing`; None to decode again."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            file_size = os.fstat(f.fileno()).st_size
            if len(head) < HEADER_BYTES:
                return None
            magic, version, channels, height, width, entries, rows, t_off, t_len = HEADER.unpack(
                head[: HEADER.size])
            row_bytes = channels * height * width
            labels_at = HEADER_BYTES + rows * row_bytes
            if (magic != MAGIC or version != FORMAT_VERSION or (height, width) != tuple(size)
                    or channels not in (1, 3) or entries != len(listing)
                    or t_off != labels_at + rows + entries or file_size != t_off + t_len):
                return None
            f.seek(labels_at)
            labels = np.frombuffer(f.read(rows), np.uint8)
            decoded = np.frombuffer(f.read(entries), np.uint8).astype(bool)
            trailer = json.loads(f.read(t_len))
    except (OSError, ValueError, struct.error):
        return None
    if (decoded.sum() != rows or not np.array_equal(labels, listing.labels[decoded])
            or trailer.get("classes") != listing.classes):
        return None
    skipped = trailer.get("skipped", [])
    # A picture skipped as too large for a smaller budget is decoded this time.
    if any(need is not None and (max_decode_bytes is None or need <= max_decode_bytes)
           for _, _, need in skipped):
        return None
    return _Cache(channels, decoded, skipped)


def _choose_channels(listing: _Listing, progress) -> int:
    """3 if any picture is in colour (from the headers alone), else 1."""
    bar = progress(len(listing), "checking colour")
    try:
        for i in range(len(listing)):
            bar.update(1)
            if is_color(listing.file(i)):
                return 3
        return 1
    finally:
        bar.close()


def _decode_all(listing, path, size, channels, strict, max_decode_bytes, progress) -> _Cache:
    """Decode every listed file into the cache file at `path`, one picture at a time."""
    if channels is None:
        channels = _choose_channels(listing, progress)
    height, width = size
    decoded = np.zeros(len(listing), bool)
    labels, skipped = bytearray(), []
    bar = progress(len(listing), "decoding images")
    try:
        with atomic_write(path, "image cache") as f:
            f.write(bytes(HEADER_BYTES))
            for i in range(len(listing)):
                rel = listing.path(i)
                try:
                    row = image_row(listing.file(i), (height, width), channels, max_decode_bytes)
                except ImageRefused as err:
                    if strict:
                        raise LowmemError(f"{err} (strict: every file must be a usable picture)"
                                          ) from None
                    skipped.append([rel, err.reason, err.needed])
                else:
                    f.write(row.data)
                    labels.append(int(listing.labels[i]))
                    decoded[i] = True
                bar.update(1)
            _check_decoded(listing, decoded, skipped)
            f.write(labels)
            f.write(decoded.astype(np.uint8).data)
            trailer = json.dumps({"classes": listing.classes, "skipped": skipped}).encode()
            t_off = f.tell()
            f.write(trailer)
            f.seek(0)
            f.write(HEADER.pack(MAGIC, FORMAT_VERSION, channels, height, width, len(listing),
                                len(labels), t_off, len(trailer)))
    finally:
        bar.close()
    return _Cache(channels, decoded, skipped)


def _check_decoded(listing: _Listing, decoded: np.ndarray, skipped: list):
    root = listing.root
    if not decoded.any():
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise LowmemError(f"{root}: none of its {len(listing):,} files is a picture that could be "
                          f"decoded{first}")
    for test in ((False, True) if listing.layout == "train/test" else (False,)):
        part = listing.test == test
        used = np.bincount(listing.labels[part & decoded], minlength=len(listing.classes))
        listed = np.bincount(listing.labels[part], minlength=len(listing.classes))
        for k in np.flatnonzero((listed > 0) & (used == 0)):
            folder = root / ("test" if test else "train" if listing.layout == "train/test" else "")
            raise LowmemError(f"{folder / listing.classes[k]}: none of its {listed[k]:,} files is a "
                              "picture that could be decoded")


def _cache_path(listing: _Listing, size, channels) -> tuple[Path, str]:
    folder = hashlib.sha256(os.fsencode(f"{listing.root.resolve()}\0{size[0]}x{size[1]}\0"
                                        f"{channels or 'auto'}")).hexdigest()[:16]
    key = listing.key(size, channels)[:32]
    return cache_dir() / "folders" / f"{folder}-{key}.rows", folder


def _remove_older(directory: Path, folder: str, keep: Path):
    for old in directory.glob(f"{folder}-*.rows"):
        if old != keep:
            try:
                old.unlink()
            except OSError:
                pass


# --- the data set ---------------------------------------------------------------------


@dataclass
class FolderSplit(Split):
    """A datasets.Split (images, labels) that also names the file of each row."""

    files: FileNames | None = field(default=None, kw_only=True)


@dataclass(kw_only=True)
class FolderDataset(Dataset):
    """A datasets.Dataset (train, test, source, is_mnist, describe()) from a folder of
    pictures, with its class names and what was skipped."""

    classes: list[str]
    channels: int
    image_size: tuple[int, int]  # (H, W)
    layout: str  # "train/test" or "one folder"
    skipped: list  # [(relative path, reason)] of files that are not usable pictures
    decoded_now: bool  # this open decoded the pictures (else it read the cache)
    cache_path: Path
    test_fraction: float | None = None  # for a drawn split
    seed: int | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W): the network's input."""
        return (self.channels, *self.image_size)

    def describe(self):
        c, h, w = self.input_shape
        names = ", ".join(self.classes[:10]) + (f", ... ({len(self.classes) - 10} more)"
                                                 if len(self.classes) > 10 else "")
        split = ("train/ and test/" if self.layout == "train/test" else
                 f"test {self.test_fraction:g} drawn with seed {self.seed}")
        skipped = (f"; {len(self.skipped):,} file{'s' if len(self.skipped) != 1 else ''} skipped "
                   "(not usable pictures)" if self.skipped else "")
        cached = "decoded now into the cache" if self.decoded_now else "read from the cache"
        return (f"{self.source} (image folder, {split}): {len(self.train):,} train, "
                f"{len(self.test):,} test images of {c}x{h}x{w} ({'RGB' if c == 3 else 'gray'}), "
                f"{len(self.classes)} classes ({names}){skipped}; {cached}")


def _warn(message):
    warnings.warn(message, SkippedFilesWarning, stacklevel=3)


def _size_pair(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(n, int | np.integer) and n >= 1 for n in size):
        raise LowmemError(f"image size {image_size!r}: give a positive number of pixels, or (H, W)")
    return int(size[0]), int(size[1])


def _draw(seed: int, blob: bytes, starts: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """A uint64 per file from the seed and its relative path: the split's draw."""
    prefix = f"{seed}\0".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + blob[starts[e] : starts[e + 1]]).digest()[:8], "big")
         for e in _ints(entries)), np.uint64, len(entries))


def _split_entries(listing: _Listing, decoded: np.ndarray, test_fraction: float, seed: int):
    """Listing indices of the train and test files (decoded ones only), in listing order."""
    if listing.layout == "train/test":
        return np.flatnonzero(decoded & ~listing.test), np.flatnonzero(decoded & listing.test)
    in_test = np.zeros(len(listing), bool)
    for k in range(len(listing.classes)):
        members = np.flatnonzero(decoded & (listing.labels == k))
        n_test = min(round(len(members) * test_fraction), len(members) - 1)
        if n_test > 0:
            draws = _draw(seed, listing.blob, listing.starts, members)
            in_test[members[np.argsort(draws, kind="stable")[:n_test]]] = True
    if not in_test.any():
        raise LowmemError(f"{listing.root}: a test fraction of {test_fraction:g} leaves no test "
                          "pictures: every class needs a few pictures at least")
    return np.flatnonzero(decoded & ~in_test), np.flatnonzero(in_test)


def _skip_message(root: Path, skipped: list) -> str:
    named = "; ".join(f"{rel} ({reason})" for rel, reason, _ in skipped[:NAMED_SKIPS])
    more = f"; and {len(skipped) - NAMED_SKIPS:,} more" if len(skipped) > NAMED_SKIPS else ""
    return (f"{root}: skipped {len(skipped):,} file{'s' if len(skipped) != 1 else ''} that "
            f"{'are' if len(skipped) != 1 else 'is'} not usable pictures: {named}{more}")


def open_folder(root: Path, image_size=28, channels: int | None = None,
                test_fraction: float = TEST_FRACTION, seed: int = 0, strict: bool = False,
                max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES, progress=None,
                warn=None, source: str | None = None) -> FolderDataset:
    """The pictures under `root` as a data set of uint8 rows (see the module notes).

    image_size: H (square) or (H, W) in pixels. channels: 1 (gray), 3 (RGB) or None
    (RGB if any picture is in colour, from the files' headers). test_fraction and seed:
    the drawn split of a one-folder layout. strict: a file that is not a usable picture
    is an error instead of being skipped. max_decode_bytes: the most one picture may
    take to decode (see imaging.decode_bytes); a larger one is skipped.
    progress(total, description) -> a bar with update(n) and close() (default: none;
    the command line passes a tqdm bar when stderr is a terminal). warn(message)
    reports skipped files (default: warnings.warn with SkippedFilesWarning). Raises
    LowmemError, naming the path, for a missing folder, no class folders, an empty class
    folder, a class of test/ not in train/, and pictures that all fail to decode (in
    the folder or in one class).
    """
    root = Path(root)
    size = _size_pair(image_size)
    if channels not in (None, 1, 3):
        raise LowmemError(f"channels {channels!r}: 1 (gray), 3 (RGB) or None (from the pictures)")
    if not 0 < test_fraction < 1:
        raise LowmemError(f"test fraction {test_fraction}: give a number between 0 and 1")
    progress = progress or (lambda total, description: NoBar())
    listing = _list_folder(root)
    path, folder = _cache_path(listing, size, channels)
    cache = _read_cache(path, listing, size, max_decode_bytes)
    decoded_now = cache is None
    if decoded_now:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LowmemError(f"cannot create the cache directory {path.parent}: {err.strerror}"
                              ) from None
        cache = _decode_all(listing, path, size, channels, strict, max_decode_bytes, progress)
        _remove_older(path.parent, folder, path)
    elif strict and cache.skipped:
        rel, reason, _ = cache.skipped[0]
        raise LowmemError(f"{root / rel}: {reason} (strict: every file must be a usable picture)")
    if cache.skipped:
        (warn or _warn)(_skip_message(root, cache.skipped))
    cache_row = np.cumsum(cache.decoded) - 1  # the cache row of each decoded file
    splits = {}
    for name, entries in zip(("train", "test"),
                             _split_entries(listing, cache.decoded, test_fraction, seed), strict=True):
        images = ImageRows(path, (cache.channels, *size), HEADER_BYTES, file_rows=cache_row[entries])
        splits[name] = FolderSplit(images, listing.labels[entries],
                                   files=FileNames(listing.blob, listing.starts, entries))
    drawn = listing.layout == "one folder"
    return FolderDataset(
        splits["train"], splits["test"], source or str(root), False, classes=listing.classes,
        channels=cache.channels, image_size=size, layout=listing.layout,
        skipped=[(rel, reason) for rel, reason, _ in cache.skipped], decoded_now=decoded_now,
        cache_path=path, test_fraction=test_fraction if drawn else None,
        seed=seed if drawn else None)


def is_image_folder(directory: Path) -> bool:
    """Whether `directory` looks like a folder of pictures rather than of IDX files: it
    has folders in it and no MNIST-style IDX file."""
    directory = Path(directory)
    if not directory.is_dir() or any(directory.glob("*-idx[13]-ubyte*")):
        return False
    return any(entry.is_dir() and not entry.name.startswith(".") for entry in directory.iterdir())
