"""IDX files (raw and gzipped) and the folder cache as a hostile user crafts them:
seeded mutations of real files (small IDX files cut from the real MNIST; the cache
that open_folder makes of a few PNGs of its digits). Bit flips, truncations, header
fields replaced by extreme values, bytes appended, decompression bombs. Each read gives
what the format says the mutated bytes hold (equal to the original where the change
did not touch the data), or a one-line LowmemError; nothing else is raised, nothing is
allocated beyond the files' size and a small bound, and no failed decompression is left
in the cache. A few crafted folders go through `lowmem-cnn train` in a child."""

import gzip
import io
import json
import os
import shutil
import struct
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import need_module, refusal_line, run_lowmem
from idx_files import NAMES, images_bytes, labels_bytes
from lowmem_cnn.data import folders
from lowmem_cnn.data.idx import open_directory
from lowmem_cnn.data.datasets import cache_dir
from lowmem_cnn.common.errors import LowmemError

# What tracemalloc may see a read take beyond its files' bytes: a decompression's
# chunks (data._CHUNK, 1 MiB: what a header declares beyond it is never asked for at
# once; gzip's buffer, the chunk and zlib's output can be alive together: MNIST's test
# images took 2.2 MiB, one mutated stream 3.76 MiB in a full run, not on its replay),
# and 256 KiB of paths, headers and arrays (measured: 120 KiB for four small gzip files).
READ_ROOM = 4 * (1 << 20) + (256 << 10)
FUZZ = dict(derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])  # fast_cache: one for all
U32 = [0, 1, 2, 19, 20, 21, 27, 28, 29, 0x801, 0x803, 65536, 65537, 2**31 - 1, 2**31, 2**32 - 1]


def _real_small(mnist_dir: Path, n_train=40, n_test=20) -> dict:
    """The first images and labels of the real MNIST, as four small IDX files' bytes."""
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for kind, offset, row in (("images", 16, 784), ("labels", 8, 1)):
            with gzip.open(mnist_dir / (NAMES[f"{split}_{kind}"] + ".gz")) as f:
                body = f.read(offset + n * row)[offset:]
            files[f"{split}_{kind}"] = (images_bytes(np.frombuffer(body, np.uint8).reshape(n, 28, 28))
                                        if kind == "images" else labels_bytes(np.frombuffer(body, np.uint8)))
    return files


@pytest.fixture(scope="module")
def small(mnist_dir):
    return _real_small(mnist_dir)


@pytest.fixture(scope="module")
def packed(small):
    return {key: gzip.compress(content, mtime=0) for key, content in small.items()}


@pytest.fixture(scope="module", autouse=True)
def no_fsync():
    """Files written without waiting for the disk: a decompression or a folder's cache
    is fsynced (files.atomic_write), 4 to 8 times an example; what is checked here does
    not depend on it, and the disk of a busy machine took 50 ms an example."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def expected(files: dict):
    """What the IDX format says four files' bytes hold, checked as a reader must:
    {split: (rows, labels)}, or None: to be refused."""
    out, shapes = {}, set()
    for split in ("train", "test"):
        images, labels = files[f"{split}_images"], files[f"{split}_labels"]
        if images is None or labels is None or len(images) < 16 or len(labels) < 8:
            return None
        magic, n, rows, cols = struct.unpack(">IIII", images[:16])
        label_magic, n_labels = struct.unpack(">II", labels[:8])
        if (magic, label_magic) != (0x803, 0x801) or not n or not 1 <= rows <= 65536 \
                or not 1 <= cols <= 65536 or len(images) != 16 + n * rows * cols \
                or len(labels) != 8 + n_labels or n != n_labels:
            return None
        label_values = np.frombuffer(labels, np.uint8, offset=8)
        if label_values.max() >= 10:
            return None
        out[split] = (np.frombuffer(images, np.uint8, offset=16).reshape(n, rows * cols), label_values)
        shapes.add((rows, cols))
    return out if len(shapes) == 1 else None


@st.composite
def mutated_idx(draw, base: dict):
    """(key of the file changed, its new bytes, how)."""
    key = draw(st.sampled_from(sorted(NAMES)))
    data = base[key]
    header = 16 if key.endswith("images") else 8
    how = draw(st.sampled_from(["flip", "flip header", "truncate", "append", "field", "swap kind",
                                "empty"]))
    if how in ("flip", "flip header"):
        at = draw(st.integers(0, (header if how == "flip header" else len(data)) - 1))
        data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data = data + bytes(draw(st.sampled_from([1, 2, 784, 4096])))
    elif how == "field":
        field = draw(st.integers(0, header // 4 - 1))
        value = draw(st.sampled_from(U32))
        data = data[: 4 * field] + struct.pack(">I", value) + data[4 * field + 4 :]
    elif how == "swap kind":
        other = {"images": "labels", "labels": "images"}
        split, kind = key.split("_")
        data = base[f"{split}_{other[kind]}"]
    else:
        data = b""
    return key, data, how


def _fresh(root: Path, counter=[0]) -> Path:  # noqa: B006 (a counter across examples)
    counter[0] += 1
    directory = root / f"case{counter[0]}"
    shutil.rmtree(root / f"case{counter[0] - 1}", ignore_errors=True)
    shutil.rmtree(cache_dir(), ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _read_checked(directory: Path, bound: int):
    """open_directory's data set as arrays, or the LowmemError's text; under tracemalloc."""
    tracemalloc.start()
    try:
        data = open_directory(directory)
    except LowmemError as err:
        return None, str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= bound, (peak, bound)
    with data:
        return {name: (split.images.read_range(0, len(split)), split.labels)
                for name, split in (("train", data.train), ("test", data.test))}, None


def _compare(got, refused, files):
    want = expected(files)
    if want is None:
        assert got is None and "\n" not in refused, (refused, got)
        return
    assert refused is None, refused
    for split in ("train", "test"):
        np.testing.assert_array_equal(got[split][0], want[split][0])
        np.testing.assert_array_equal(got[split][1], want[split][1])


def _cache_is_clean():
    """No temporary file left, and every decompressed file whole (header fits size)."""
    for path in cache_dir().rglob("*"):
        if path.is_file():
            assert not path.name.startswith("."), path
            if path.suffix != ".sha256":
                data = path.read_bytes()
                header = 16 if "images" in path.name else 8
                dims = struct.unpack(f">{header // 4 - 1}I", data[4:header])
                assert len(data) == header + int(np.prod(dims, dtype=object)), path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for the examples' files and their cache: in memory (/dev/shm) where
    there is one, as thousands of small files are made and removed (on this machine's
    busy disk, removing them took 17 ms an example)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        directory = Path(tempfile.mkdtemp(prefix="lowmem-fuzz-", dir=shm))
        yield directory
        shutil.rmtree(directory, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture
def fast_cache(scratch):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(scratch / "cache"))
        yield


@settings(max_examples=500, **FUZZ)
@given(data=st.data())
def test_mutated_raw_idx_files(small, scratch, fast_cache, data):
    key, mutated, how = data.draw(mutated_idx(small))
    files = dict(small, **{key: mutated})
    directory = _fresh(scratch)
    for name, content in files.items():
        (directory / NAMES[name]).write_bytes(content)
    got, refused = _read_checked(directory, sum(map(len, files.values())) + READ_ROOM)
    _compare(got, refused, files)


@st.composite
def mutated_gzip(draw, base: dict):
    """(key, gzip bytes, raw bytes they hold or None if they are not whole gzip, how)."""
    if draw(st.booleans()):  # the content changed, then compressed
        key, raw, how = draw(mutated_idx(base))
        return key, gzip.compress(raw, mtime=0), raw, how
    key = draw(st.sampled_from(sorted(NAMES)))
    raw = base[key]
    packed = gzip.compress(raw, mtime=0)
    how = draw(st.sampled_from(["flip gzip", "truncate gzip", "garbage after", "bomb", "lying count"]))
    if how == "flip gzip":
        at = draw(st.integers(0, len(packed) - 1))
        packed = packed[:at] + bytes([packed[at] ^ (1 << draw(st.integers(0, 7)))]) + packed[at + 1 :]
    elif how == "truncate gzip":
        packed = packed[: draw(st.integers(0, len(packed) - 1))]
    elif how == "garbage after":
        packed += draw(st.sampled_from([b"\0", b"x", b"\x1f\x8b", bytes(100)]))
    elif how == "bomb":  # the header says what it held; 1 or 8 MiB of zeros follow
        megabytes = draw(st.sampled_from([1, 8]))
        if (key, megabytes) not in _BOMBS:
            _BOMBS[key, megabytes] = gzip.compress(raw + bytes(megabytes << 20), 9, mtime=0)
        return key, _BOMBS[key, megabytes], raw + b"\0", how  # (any longer raw is refused)
    else:  # a header that declares 2**32 - 1 items of a file a few KiB long
        raw = raw[:4] + struct.pack(">I", 2**32 - 1) + raw[8:]
        return key, gzip.compress(raw, mtime=0), raw, how
    try:
        held = gzip.GzipFile(fileobj=io.BytesIO(packed)).read()
    except (OSError, EOFError, zlib.error):
        held = None
    return key, packed, held, how


_BOMBS = {}  # (file, MiB of zeros) -> gzip bytes: made once


@settings(max_examples=500, **FUZZ)
@given(data=st.data())
def test_mutated_gzip_idx_files(small, packed, scratch, fast_cache, data):
    key, mutated, held, how = data.draw(mutated_gzip(small))
    directory = _fresh(scratch)
    for name, content in packed.items():
        (directory / (NAMES[name] + ".gz")).write_bytes(mutated if name == key else content)
    bound = sum(map(len, small.values())) + len(mutated) + READ_ROOM
    got, refused = _read_checked(directory, bound)
    _compare(got, refused, dict(small, **{key: held}))
    _cache_is_clean()


# --- the folder cache ------------------------------------------------------------------


@pytest.fixture(scope="module")
def picture_folder(small, scratch):
    """6 PNGs of real digits in 2 class folders, a text file and an empty .jpg (both
    skipped, so the cache's trailer lists them). Few: most examples decode them again."""
    need_module("PIL")
    from PIL import Image

    root = scratch / "pictures"
    root.mkdir()
    pictures = np.frombuffer(small["train_images"], np.uint8, offset=16).reshape(-1, 28, 28)
    for k in range(6):
        path = root / f"class{k % 2}" / f"{k:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pictures[k]).save(path)
    (root / "class0" / "notes.txt").write_text("not a picture")
    (root / "class1" / "empty.jpg").write_bytes(b"")
    return root


def _open_folder(root):
    said = []
    return folders.open_folder(root, channels=1, warn=said.append), said


def _arrays(data):
    return {name: (split.images.read_range(0, len(split)), split.labels, list(split.files))
            for name, split in (("train", data.train), ("test", data.test))}


def _header_fields(cache: bytes) -> list:
    return list(folders.HEADER.unpack(cache[: folders.HEADER.size]))


def _with_trailer(cache: bytes, trailer: bytes) -> bytes:
    """The cache with another JSON trailer, its header saying so (it reaches the parser)."""
    fields = _header_fields(cache)
    fields[8] = len(trailer)
    head = folders.HEADER.pack(*fields)
    return head + cache[len(head) : fields[7]] + trailer


TRAILERS = [b"[" * 100000, b"{\"classes\": 5}", b"[]", b"null", b"{\"classes\": [\"class0\"]}",
            b"\xff\xfe", b"{\"classes\": [\"class0\", \"class1\"], \"skipped\": NaN}",
            b"{\"classes\": [\"class0\", \"class1\"], \"classes\": []}"]
# A skipped file's entry [path, reason, bytes needed or None, kind], changed: each
# keeps the real paths in their order, so that only the change makes it wrong.
SKIP_CHANGES = [lambda e: [1, 2, 3, 4], lambda e: e[:3], lambda e: [*e, "x"], lambda e: "entry",
                lambda e: [e[0], 5, e[2], e[3]], lambda e: [e[0], e[1], -1, e[3]],
                lambda e: [e[0], e[1], "9", e[3]], lambda e: [e[0], e[1], True, e[3]],
                lambda e: [e[0], e[1], 1.5, e[3]], lambda e: [e[0], e[1], 10**30, e[3]],
                lambda e: [e[0], e[1], e[2], [e[3]]], lambda e: [e[0], e[1], e[2], "x"],
                lambda e: ["other.png", *e[1:]], lambda e: [e[0], e[1], 2**20, "too large"]]


@st.composite
def mutated_cache(draw, cache: bytes):
    fields = _header_fields(cache)
    how = draw(st.sampled_from(["flip", "flip header", "truncate", "append", "field", "trailer",
                                "skipped", "label", "status"]))
    if how in ("flip", "flip header"):
        at = draw(st.integers(0, (folders.HEADER_BYTES if how == "flip header" else len(cache)) - 1))
        cache = cache[:at] + bytes([cache[at] ^ (1 << draw(st.integers(0, 7)))]) + cache[at + 1 :]
    elif how == "truncate":
        cache = cache[: draw(st.integers(0, len(cache) - 1))]
    elif how == "append":
        cache += bytes(draw(st.sampled_from([1, 784, 4096])))
    elif how == "field":  # magic, version, channels, height, width, files, rows, offset, length
        field = draw(st.integers(1, 8))
        if field <= 4:
            fields[field] = draw(st.sampled_from(U32))
        else:
            fields[field] = draw(st.sampled_from([0, 1, fields[field] - 1, fields[field] + 1,
                                                  len(cache), 2**62, 2**63, 2**64 - 1]))
        cache = folders.HEADER.pack(*fields) + cache[folders.HEADER.size :]
    elif how == "trailer":
        cache = _with_trailer(cache, draw(st.sampled_from(TRAILERS)))
    elif how == "skipped":
        trailer = json.loads(cache[fields[7] :])
        entries = trailer["skipped"]
        if draw(st.booleans()):
            which = draw(st.integers(0, len(entries) - 1))
            entries[which] = draw(st.sampled_from(SKIP_CHANGES))(entries[which])
        else:
            entries.reverse()
        cache = _with_trailer(cache, json.dumps(trailer).encode())
    else:  # a label byte, or a file's status byte, set to a value it never has
        rows, entries = fields[6], fields[5]
        labels_at = fields[7] - entries - rows
        at = labels_at + draw(st.integers(0, rows - 1)) if how == "label" else \
            fields[7] - entries + draw(st.integers(0, entries - 1))
        cache = cache[:at] + bytes([draw(st.sampled_from([1, 2, 3, 255]))]) + cache[at + 1 :]
    return cache, how


@pytest.fixture(scope="module")
def folder_reference(picture_folder):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(picture_folder.parent / "folder-cache"))
        data, said = _open_folder(picture_folder)
        reference = (_arrays(data), data.cache_path.read_bytes(), data.cache_path,
                     [(rel, kind) for rel, _, kind in data.skipped])
        data.close()
    assert len(said) == 1 and len(reference[3]) == 2
    return reference


@settings(max_examples=500, **FUZZ)
@given(data=st.data())
def test_mutated_folder_cache(picture_folder, folder_reference, data):
    arrays, original, path, skipped = folder_reference
    cache, how = data.draw(mutated_cache(original))
    path.write_bytes(cache)
    fields = _header_fields(original)
    pixels = range(folders.HEADER_BYTES, fields[7] - fields[5] - fields[6])
    changed = (np.flatnonzero(np.frombuffer(cache, np.uint8) != np.frombuffer(original, np.uint8))
               if len(cache) == len(original) else None)
    pixels_only = changed is not None and all(i in pixels for i in changed)
    tracemalloc.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XDG_CACHE_HOME", str(picture_folder.parent / "folder-cache"))
            opened, _ = _open_folder(picture_folder)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= len(cache) + READ_ROOM, (how, peak)
    with opened:
        got = _arrays(opened)
        assert [(rel, kind) for rel, _, kind in opened.skipped] == skipped
        # a change of the pixels alone is read (nothing says a pixel is wrong); any
        # other is seen and the cache made again, unless it changed no more than a
        # skipped file's reason (read as it is: it is text for the user)
        assert not (pixels_only and opened.decoded_now), how
    for split, (rows, labels, files) in arrays.items():
        np.testing.assert_array_equal(got[split][1], labels)
        assert got[split][2] == files
        if pixels_only:
            mutated_rows = np.frombuffer(cache, np.uint8)[pixels.start : pixels.stop].reshape(-1, 784)
            cache_rows = (opened.train if split == "train" else opened.test).images._file_rows
            np.testing.assert_array_equal(got[split][0], mutated_rows[cache_rows])
        else:
            np.testing.assert_array_equal(got[split][0], rows)
    assert path.read_bytes() == (original if opened.decoded_now else cache)


# --- through the command line ----------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("bomb", "trailing data"), ("no images", "holds no labels"), ("lying count", "truncated"),
])
def test_train_refuses_a_crafted_idx_folder_in_one_line_within_its_budget(small, tmp_path, case,
                                                                          message):
    directory = tmp_path / "data"
    directory.mkdir()
    files = dict(small)
    if case == "no images":
        files["train_images"] = images_bytes(np.zeros((0, 28, 28)))
        files["train_labels"] = labels_bytes(np.zeros(0))
    elif case == "lying count":
        images = files["train_images"]
        files["train_images"] = images[:4] + struct.pack(">I", 2**32 - 1) + images[8:]
    for name, content in files.items():
        if case == "bomb" and name == "train_images":  # 40 images declared, 256 MiB follow
            packer = gzip.GzipFile(directory / (NAMES[name] + ".gz"), "wb", 9, mtime=0)
            with packer:
                packer.write(content)
                zeros = bytes(2**20)
                for _ in range(256):
                    packer.write(zeros)
        else:
            (directory / NAMES[name]).write_bytes(content)
    run = run_lowmem("train", "--max-ram", "256M", "--epochs", "1", "--data-dir", directory,
                     "--out", tmp_path / "p.pkl", cwd=tmp_path)
    assert run.returncode == 1
    assert message in refusal_line(run.stderr)
    assert run.peak_rss < 256 * 2**20
    cached = [p for p in Path(os.environ["XDG_CACHE_HOME"]).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in cached) < 2**20, cached


# --- two downloads into one cache -------------------------------------------------------


def test_two_downloads_fill_one_cache_at_once(tmp_path, monkeypatch):
    """A second download runs whole while the first has fetched its first file and not
    yet decompressed it: with temporary files of their own, both end with the four
    verified files (with one fixed temporary name, the second removed the first's)."""
    from idx_files import write_dataset
    from lowmem_cnn.data import idx as data_module
    from test_data import _Server

    served = write_dataset(tmp_path / "served", gz=True)  # small files served as MNIST
    monkeypatch.setattr(data_module, "MNIST_SHA256", {
        name: _sha256_hex(gzip.decompress((served / f"{name}.gz").read_bytes())) for name in NAMES.values()})
    target = tmp_path / "cache-dir"
    real_fetch, calls = data_module._fetch, []

    def fetch_then_let_another_run(url, out, progress):
        real_fetch(url, out, progress)
        calls.append(url)
        if len(calls) == 1:
            data_module.download_mnist(target)

    server = _Server(served)
    try:
        monkeypatch.setenv("LOWMEM_CNN_MIRRORS", server.url)
        monkeypatch.setattr(data_module, "_fetch", fetch_then_let_another_run)
        data_module.download_mnist(target)
    finally:
        server.close()
    assert len(calls) == 5  # the first's first file, the second's four; then none left
    assert sorted(os.listdir(target)) == sorted(NAMES.values())
    for name in NAMES.values():
        assert _sha256_hex((target / name).read_bytes()) == data_module.MNIST_SHA256[name]


def _sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
