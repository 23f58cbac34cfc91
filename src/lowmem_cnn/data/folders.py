"""Folders of your own pictures as a data set: the same shape as the IDX data of data.py
(a datasets.Dataset whose splits' images are datasets.ImageRows).

Layouts (class names are folder names, sorted):
- `ROOT/train/<class>/...` and `ROOT/test/<class>/...`: the split is given. A class in
  test/ must be one of train/'s; train/ may have classes test/ lacks.
- `ROOT/<class>/...`: the split is drawn. Of a class's n pictures, the
  round(n * test_fraction) (at most n - 1) whose draw (the SHA-256 of the seed and
  the file's relative path) is smallest are the test ones: the same every run, and a
  file added or removed moves at most one other file to the other side.
Files may be in subfolders of a class folder. Files outside class folders (a README in
ROOT) are ignored, and so are, without a word, what systems leave in folders: hidden
files and folders (names starting with ".", such as .DS_Store and macOS's ._* files;
on Windows, the hidden attribute too) and SYSTEM_NAMES (Thumbs.db, desktop.ini,
__MACOSX, ...).

Decoding once: the first open decodes every picture (imaging.image_row: gray or RGB,
shorter side scaled to the target, centre-cropped to H x W) and streams the rows into
a cache file in the user cache; later opens read rows from it with pread, as IDX files
are read (datasets.ImageRows). The decoding pass holds one picture at a time, however
many there are; what grows with their number is the listing (the relative paths as one
blob, a label and a status byte: about 50 bytes a file, twice that while it is sorted).
Every other file is tried as a picture, whatever its name (Pillow knows a format by its
content). One that cannot be used is skipped, as one of three kinds: a damaged picture
(a file Pillow recognises but cannot decode, or one named as a picture that it does
not recognise: a 0-byte cat.jpg), a picture too large for the budget, or a file that
is not a picture (readme.txt). One warning line counts them and names the first few;
the full list, with the reasons, is written next to the cache file. strict=True makes
the first damaged or too large picture an error; a file that is not a picture never is.

Cache file (`cache_dir()/folders/<folder>-<key>.rows`), little-endian:
    0   magic b"LMCNNIMG", u32 format version (2), u32 channels, u32 height, u32 width
    24  u64 files in the listing, u64 rows (pictures decoded)
    40  u64 offset and u64 length of the JSON trailer; zeros up to byte 64
    64  rows: C*H*W uint8 values each, channel by channel (all of channel 0's H x W
        values row by row, then channel 1's, ...): what Network.to_input takes
    then one label byte per row, one status byte per listed file (1: decoded, in
        listing order, 0: skipped), and the JSON trailer: the classes, and each skipped
        file, why, for one too large to decode the bytes it needed (a run with a
        larger budget decodes it), and its kind
The listing is the files in order of part (train, test; or the one folder), then of
the SHA-256 of their relative path: a fixed shuffle, so that the first N rows of a
split mix the classes. The key is the SHA-256 of the format version, the input shape
asked for (H, W, channels or "auto") and every file's relative path, size and mtime
(in the order the folder is walked: sorted names, folder by folder): a file added,
removed or touched makes another key, and the folder is decoded again.
One cache file is kept per folder and shape; a rebuild removes the older ones. Beside it,
`<folder>-<key>.skipped.txt` lists the files not used: one line each, kind, relative
path and reason separated by tabs.
"""

import hashlib
import json
import os
import stat
import struct
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowmem_cnn.data.datasets import Dataset, ImageRows, NoBar, Split, cache_dir
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import open_regular, parse_json
from lowmem_cnn.common.writing import atomic_write
from lowmem_cnn.data.imaging import DEFAULT_MAX_DECODE_BYTES, ImageRefused, image_row, is_color

FORMAT_VERSION = 2  # 2: the trailer says the kind of each skipped file
MAGIC = b"LMCNNIMG"
HEADER = struct.Struct("<8sIIIIQQQQ")
HEADER_BYTES = 64
TEST_FRACTION = 0.2
MAX_CLASSES = 256  # labels are one byte
# Skipped files the warning names, of each kind; the rest are counted (all are in the
# list file).
NAMED_SKIPS = 3
# What systems leave in folders of pictures (lower case): ignored without a word, as
# are names starting with "." (.DS_Store, AppleDouble ._* files, .git).
SYSTEM_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini",
                          "icon\r", "__macosx", "$recycle.bin", "system volume information"})
# Picture formats' extensions (lower case), Pillow's and the ones it may lack (HEIC,
# camera raw). A file Pillow does not recognise is a damaged picture with one of these
# (a 0-byte 666.jpg), else a file that is not a picture (readme.txt).
PICTURE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".tga .ico .pcx .psd .jp2 .j2k .jpx .heic .heif .avif .jxl .dng .cr2 .cr3 .nef .arw "
    ".orf .rw2 .raf".split())
# The kinds of skipped files, in the order the warning names them, with their words
# (one, many); strict refuses the first two.
KINDS = {"damaged": ("damaged or unreadable picture", "damaged or unreadable pictures"),
         "too large": ("picture too large for the memory budget",
                       "pictures too large for the memory budget"),
         "not a picture": ("file that is not a picture", "files that are not pictures")}
_WINDOWS = os.name == "nt"


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


def _ignored(entry) -> bool:
    """Whether a directory entry is one that systems leave: hidden, or a SYSTEM_NAME."""
    if entry.name.startswith(".") or entry.name.lower() in SYSTEM_NAMES:
        return True
    if _WINDOWS:  # hidden there is an attribute, which scandir has read already
        try:
            return bool(entry.stat(follow_symlinks=False).st_file_attributes
                        & stat.FILE_ATTRIBUTE_HIDDEN)
        except (OSError, AttributeError):
            return False
    return False


def _visible(entries):
    return sorted((e for e in entries if not _ignored(e)), key=lambda e: e.name)


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
    skipped: list  # [relative path, reason, bytes needed or None, kind (see KINDS)]


def _is_skip(entry) -> bool:
    """A skipped file as the trailer lists it: [relative path, reason, bytes needed or
    None, kind]."""
    return (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
            and isinstance(entry[1], str) and isinstance(entry[3], str) and entry[3] in KINDS
            and (entry[2] is None or type(entry[2]) is int and entry[2] >= 0))


def _read_cache(path: Path, listing: _Listing, size, max_decode_bytes) -> _Cache | None:
    """The cache at `path` if it is whole and fits `listing`; None to decode again. The
    file is read as untrusted (a crafted or damaged cache is rebuilt): its counts are
    checked against its size before anything they ask for is read."""
    try:
        with open_regular(path, "an image cache") as f:
            head = f.read(HEADER_BYTES)
            file_size = os.fstat(f.fileno()).st_size
            if len(head) < HEADER_BYTES:
                return None
            magic, version, channels, height, width, entries, rows, t_off, t_len = HEADER.unpack(
                head[: HEADER.size])
            labels_at = HEADER_BYTES + rows * channels * height * width  # Python ints: no overflow
            if (magic != MAGIC or version != FORMAT_VERSION or (height, width) != tuple(size)
                    or channels not in (1, 3) or entries != len(listing) or not 1 <= rows <= entries
                    or t_off != labels_at + rows + entries or file_size != t_off + t_len):
                return None
            f.seek(labels_at)  # what follows is no larger than the file: its size was checked
            labels = np.frombuffer(f.read(rows), np.uint8)
            decoded = np.frombuffer(f.read(entries), np.uint8)
            trailer = parse_json(path, f.read(t_len), "an image cache's trailer", 3)
    except (OSError, LowmemError):
        return None
    if (len(labels) != rows or len(decoded) != entries or not np.all(decoded <= 1)
            or not isinstance(trailer, dict)):
        return None
    decoded = decoded.astype(bool)
    skipped = trailer.get("skipped")
    if (decoded.sum() != rows or not np.array_equal(labels, listing.labels[decoded])
            or trailer.get("classes") != listing.classes or not isinstance(skipped, list)
            or len(skipped) != entries - rows or not all(map(_is_skip, skipped))
            or [s[0] for s in skipped] != [listing.path(i) for i in _ints(np.flatnonzero(~decoded))]):
        return None
    try:  # as a decoding pass checks what it decoded
        _check_decoded(listing, decoded, skipped)
    except LowmemError:
        return None
    # A picture skipped as too large for a smaller budget is decoded this time.
    if any(need is not None and (max_decode_bytes is None or need <= max_decode_bytes)
           for _, _, need, _ in skipped):
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


STRICT = "strict: every picture must be usable"


def _kind(rel: str, err: ImageRefused) -> str:
    """Which of KINDS a file refused by imaging is (see the module notes)."""
    if err.kind == "unidentified":
        return "damaged" if os.path.splitext(rel)[1].lower() in PICTURE_EXTENSIONS else "not a picture"
    return err.kind


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
                    kind = _kind(rel, err)
                    if strict and kind != "not a picture":
                        raise LowmemError(f"{err} ({STRICT})") from None
                    skipped.append([rel, err.reason, err.needed, kind])
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
    for old in [*directory.glob(f"{folder}-*.rows"), *directory.glob(f"{folder}-*.skipped.txt")]:
        if old not in (keep, _list_path(keep)):
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
    listed: int  # files in the class folders (system files left out)
    skipped: list  # [(relative path, reason, kind)] of the files not used (see KINDS)
    decoded_now: bool  # this open decoded the pictures (else it read the cache)
    cache_path: Path
    skipped_list: Path | None = None  # where the skipped files are listed, if any
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
        used = len(self.train) + len(self.test)
        unused = f" (not used: {_counted_kinds(self.skipped)})" if self.skipped else ""
        cached = "decoded now into the cache" if self.decoded_now else "read from the cache"
        return (f"{self.source} (image folder, {split}): {len(self.train):,} train, "
                f"{len(self.test):,} test images of {c}x{h}x{w} ({'RGB' if c == 3 else 'gray'}), "
                f"{len(self.classes)} classes ({names}); {used:,} of {self.listed:,} files used"
                f"{unused}; {cached}")


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


def _counted(n: int, kind: str) -> str:
    return f"{n:,} {KINDS[kind][n != 1]}"


def _counted_kinds(skipped) -> str:
    """'2 damaged or unreadable pictures, 1 file that is not a picture'"""
    counts = [(kind, sum(s[-1] == kind for s in skipped)) for kind in KINDS]
    return ", ".join(_counted(n, kind) for kind, n in counts if n)


def _shown(rel: str) -> str:
    # a file name may hold a line break; the warning stays one line
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in rel)


def _skip_message(root: Path, skipped: list, listed: int, where: str) -> str:
    """One line: how many files were not used, of which kinds, the first few names."""
    parts = []
    for kind in KINDS:
        names = [rel for rel, _, _, k in skipped if k == kind]
        if names:
            more = f", and {len(names) - NAMED_SKIPS:,} more" if len(names) > NAMED_SKIPS else ""
            parts.append(f"{_counted(len(names), kind)} "
                         f"({', '.join(map(_shown, names[:NAMED_SKIPS]))}{more})")
    return f"{root}: {len(skipped):,} of its {listed:,} files not used: {'; '.join(parts)}; {where}"


def _list_path(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.stem + ".skipped.txt")


def _write_list(path: Path, root: Path, size, skipped: list) -> str:
    """Write the skipped files' list at `path`; say where it is (or why it is not)."""
    lines = [f"# files of {root} not used for pictures of {size[0]}x{size[1]}: "
             "kind, file, reason (tab-separated)\n"]
    lines += [f"{kind}\t{_shown(rel)}\t{_shown(reason)}\n" for rel, reason, _, kind in skipped]
    try:
        with atomic_write(path, "list of skipped files") as f:
            f.write("".join(lines).encode("utf-8", "surrogateescape"))
    except LowmemError as err:
        return f"the full list could not be written ({err})"
    return f"the full list, with reasons: {path}"


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
    elif strict:
        refused = next((s for s in cache.skipped if s[3] != "not a picture"), None)
        if refused:
            raise LowmemError(f"{root / refused[0]}: {refused[1]} ({STRICT})")
    skipped_list = None
    if cache.skipped:
        skipped_list = _list_path(path)
        if decoded_now or not skipped_list.is_file():
            where = _write_list(skipped_list, root, size, cache.skipped)
        else:
            where = f"the full list, with reasons: {skipped_list}"
        (warn or _warn)(_skip_message(root, cache.skipped, len(listing), where))
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
        channels=cache.channels, image_size=size, layout=listing.layout, listed=len(listing),
        skipped=[(rel, reason, kind) for rel, reason, _, kind in cache.skipped],
        decoded_now=decoded_now, cache_path=path, skipped_list=skipped_list,
        test_fraction=test_fraction if drawn else None, seed=seed if drawn else None)


def has_class_folders(directory: Path) -> bool:
    """Whether `directory` has folders in it (besides those systems leave): a folder of
    pictures, when it holds no IDX file (idx.is_image_folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    with os.scandir(directory) as entries:
        return any(entry.is_dir() and not _ignored(entry) for entry in entries)
