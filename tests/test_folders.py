"""Image folders as data sets (folders.py), built from the real MNIST files."""

import hashlib
import importlib.util
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, need_module, run_lowmem
from lowmem_cnn.data import folders
from lowmem_cnn.data.idx import open_directory
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.data.folders import SkippedFilesWarning, open_folder
from lowmem_cnn.data.idx import is_image_folder
from lowmem_cnn.data.imaging import ImageRefused, mnist_style
from lowmem_cnn.memory.planner import chosen_plan

need_module("PIL")
from PIL import Image  # noqa: E402

_spec = importlib.util.spec_from_file_location("make_image_folder", ROOT / "scripts" / "make_image_folder.py")
make_image_folder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_image_folder)


def make_folder(mnist_dir, path, **options):
    return make_image_folder.write_folder(mnist_dir, path, **options)


def quiet(root, **options):
    """open_folder with no progress bar and warnings collected in a list."""
    said = []
    data = open_folder(root, warn=said.append, **options)
    return data, said


class CountingDecodes:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = folders.image_row

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(folders, "image_row", counted)


def sha_order(paths):
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode()).digest())


def one_line_error(call, *names):
    with pytest.raises(LowmemError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, message
    return message


def blank_png(path: Path, width: int, height: int, value=255):
    """A valid PNG of one gray value, compressed row by row (about 1000:1), so that a
    huge picture is small on disk without ever being held whole."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = (b"\0" + bytes([value]) * width) * 64
    parts = [packer.compress(rows) for _ in range(height // 64)]
    parts.append(packer.compress((b"\0" + bytes([value]) * width) * (height % 64)))
    parts.append(packer.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


# --- rows, shapes and order -------------------------------------------------------------


def test_png_folder_rows_are_the_idx_rows(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "png", limit=300)
    data, said = quiet(root)
    idx = open_directory(mnist_dir)
    assert said == [] and data.decoded_now and data.classes == [str(k) for k in range(10)]
    assert data.input_shape == (1, 28, 28) and data.train.images.channels == 1
    for name, split, reference in (("train", data.train, idx.train), ("test", data.test, idx.test)):
        files = list(split.files)
        # documented order: the SHA-256 of the relative path
        assert files == sha_order(files) and len(files) == 300
        positions = np.array([int(Path(f).stem) for f in files])
        assert all(f.startswith(f"{name}/{label}/") for f, label in zip(files, split.labels, strict=True))
        np.testing.assert_array_equal(split.images.read_range(0, 300),
                                      reference.images.read(positions))
        np.testing.assert_array_equal(split.labels, reference.labels[positions])
        assert split.labels.dtype == np.uint8
    # the datasets.ImageRows interface: read in any order, into a longer buffer
    out = data.train.images.empty(10)
    got = data.train.images.read(np.array([5, 0, 299]), out)
    assert got.shape == (3, 784) and np.shares_memory(got, out)
    np.testing.assert_array_equal(got, data.train.images.read_range(0, 300)[[5, 0, 299]])
    assert (data.train.images.rows, data.train.images.cols, data.train.images.row_bytes) == (28, 28, 784)
    assert len(data.train) == len(data.train.images) == 300
    assert "300 train, 300 test images of 1x28x28" in data.describe()


def test_jpeg_folder_drawn_split(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "jpeg", fmt="jpeg", layout="one", limit=100)
    data, _ = quiet(root, test_fraction=0.25)
    assert data.layout == "one folder" and data.input_shape == (1, 28, 28)
    assert len(data.train) + len(data.test) == 200
    assert 40 <= len(data.test) <= 60
    idx = open_directory(mnist_dir)
    rows = data.train.images.read_range(0, len(data.train)).astype(int)
    positions = [int(name.rsplit("-", 1)[1][:5]) for name in data.train.files]
    parts = [idx.train if "train-" in name else idx.test for name in data.train.files]
    reference = np.stack([part.images.read(np.array([p]))[0] for part, p in
                          zip(parts, positions, strict=True)]).astype(int)
    assert np.abs(rows - reference).mean() < 4  # JPEG at quality 90 is close, not equal


def test_tinted_rgb_folder_rows_are_channel_major(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "rgb", tint=True, size=64, limit=40)
    data, _ = quiet(root, image_size=32)
    assert data.input_shape == (3, 32, 32) and data.train.images.channels == 3
    assert data.train.images.row_bytes == 3 * 32 * 32
    first = root / data.train.files[0]
    expected = np.asarray(Image.open(first).resize((32, 32), Image.Resampling.LANCZOS,
                                                   reducing_gap=3.0))
    row = data.train.images.read_range(0, 1)[0]
    np.testing.assert_array_equal(row.reshape(3, 32, 32).transpose(1, 2, 0), expected)
    # the same folder as gray when asked
    gray, _ = quiet(root, image_size=(20, 24), channels=1)
    assert gray.input_shape == (1, 20, 24) and gray.train.images.read_range(0, 2).shape == (2, 480)


def test_shorter_side_scaled_then_centre_crop(tmp_path):
    for part in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / part / label).mkdir(parents=True)
            wide = np.zeros((20, 40), np.uint8)
            wide[:, 20:] = 200  # dark left half, bright right half
            Image.fromarray(wide).save(tmp_path / part / label / "wide.png")
    data, _ = quiet(tmp_path, image_size=10)
    picture = data.train.images.read_range(0, 1).reshape(10, 10)
    # scaled to 20x10, the centre 10 columns are the original's 10..29
    assert (picture[:, :2] < 10).all() and (picture[:, 8:] > 190).all()


def test_exif_orientation_16_bit_and_palettes(tmp_path):
    upright = np.zeros((30, 20), np.uint8)  # tall: 20 wide, 30 high
    upright[:10] = 255  # the top third bright
    stored = np.rot90(upright, 1)  # stored sideways, to be turned by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    for part in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / part / label).mkdir(parents=True)
    Image.fromarray(stored).save(tmp_path / "train" / "a" / "turned.png", exif=exif)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "train" / "b" / "deep.png")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "test" / "a" / "p.gif")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "test" / "b" / "g.bmp")
    data, _ = quiet(tmp_path, image_size=(30, 20))
    assert data.channels == 1  # all gray, the GIF's palette included
    rows = {name: row for name, row in zip(data.train.files, data.train.images.read_range(0, 2),
                                           strict=True)}
    turned = rows["train/a/turned.png"].reshape(30, 20)
    assert (turned[:8] > 200).all() and (turned[12:] < 50).all()
    assert (rows["train/b/deep.png"] == 40000 >> 8).all()  # scaled, not clipped at 255


# --- the cache --------------------------------------------------------------------------


def test_cache_reused_and_rebuilt_when_the_folder_changes(tmp_path, mnist_dir, monkeypatch):
    root = make_folder(mnist_dir, tmp_path / "png", limit=50)
    counter = CountingDecodes(monkeypatch)
    first, _ = quiet(root)
    assert counter.calls == 100 and first.decoded_now
    cache = first.cache_path
    before = cache.stat()
    second, _ = quiet(root)
    assert counter.calls == 100 and not second.decoded_now
    assert second.cache_path == cache
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    np.testing.assert_array_equal(second.train.images.read_range(0, 50),
                                  first.train.images.read_range(0, 50))

    touched = root / second.train.files[0]
    os.utime(touched, ns=(before.st_mtime_ns, before.st_mtime_ns + 10**9))
    third, _ = quiet(root)
    assert counter.calls == 200 and third.decoded_now and third.cache_path != cache
    assert sorted(p.name for p in cache.parent.iterdir()) == [third.cache_path.name]  # old one gone

    (root / "train" / "3" / "00000-copy.png").write_bytes(touched.read_bytes())
    added, _ = quiet(root)
    assert counter.calls == 301 and len(added.train) == 51
    (root / "test" / "7" / sorted(os.listdir(root / "test" / "7"))[0]).unlink()
    removed, _ = quiet(root)
    assert counter.calls == 401 and len(removed.test) == 49

    # another shape is another cache; the first stays
    quiet(root, image_size=14)
    assert len(list(cache.parent.glob("*.rows"))) == 2


def test_damaged_cache_is_decoded_again(tmp_path, mnist_dir, monkeypatch):
    root = make_folder(mnist_dir, tmp_path / "png", limit=20)
    first, _ = quiet(root)
    with open(first.cache_path, "r+b") as f:
        f.truncate(1000)
    counter = CountingDecodes(monkeypatch)
    again, _ = quiet(root)
    assert counter.calls == 40 and again.decoded_now
    np.testing.assert_array_equal(again.train.images.read_range(0, 20),
                                  open_directory(mnist_dir).train.images.read(
                                      np.array([int(Path(f).stem) for f in again.train.files])))


def test_seeded_split_same_twice_different_for_another_seed(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "one", layout="one", limit=150)
    a, _ = quiet(root, seed=1)
    b, _ = quiet(root, seed=1)
    c, _ = quiet(root, seed=2)
    assert list(a.test.files) == list(b.test.files)
    assert set(a.test.files) != set(c.test.files)
    assert set(a.train.files) | set(a.test.files) == set(c.train.files) | set(c.test.files)
    assert not set(a.train.files) & set(a.test.files)
    assert len(a.train) + len(a.test) == 300
    for k in range(10):  # every class gives about a fifth to the test split
        n = (a.train.labels == k).sum() + (a.test.labels == k).sum()
        assert (a.test.labels == k).sum() == min(round(n * 0.2), n - 1)
    assert "seed 1" in a.describe()


# --- bad data ----------------------------------------------------------------------------


def tiny_png(path: Path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)


def test_bad_folders_are_one_line_errors(tmp_path):
    one_line_error(lambda: open_folder(tmp_path / "missing"), tmp_path / "missing", "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: open_folder(tmp_path / "empty"), tmp_path / "empty", "no class folders")

    root = tmp_path / "noclass"
    tiny_png(root / "a" / "x.png")
    (root / "b").mkdir()
    one_line_error(lambda: open_folder(root), root / "b", "empty class folder")

    root = tmp_path / "extra"
    for part in ("train", "test"):
        tiny_png(root / part / "cat" / "x.png")
        tiny_png(root / part / "dog" / "x.png")
    tiny_png(root / "test" / "bird" / "x.png")
    one_line_error(lambda: open_folder(root), root / "test" / "bird", "not in")

    root = tmp_path / "halves"
    tiny_png(root / "train" / "cat" / "x.png")
    tiny_png(root / "train" / "dog" / "x.png")
    one_line_error(lambda: open_folder(root), root, "no test/")

    root = tmp_path / "text"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        (root / label / "notes.png").write_text("not a picture")
    one_line_error(lambda: quiet(root), root, "none of its 2 files")

    root = tmp_path / "one class dead"
    tiny_png(root / "a" / "x.png")
    tiny_png(root / "a" / "y.png")
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("no pictures in this class")
    one_line_error(lambda: quiet(root), root / "b", "none of its 1 files")

    root = tmp_path / "single"
    tiny_png(root / "only" / "x.png")
    one_line_error(lambda: open_folder(root), root, "only one class")

    root = tmp_path / "few"
    tiny_png(root / "a" / "x.png")
    tiny_png(root / "b" / "x.png")
    one_line_error(lambda: open_folder(root), root, "no test pictures")


def test_system_files_ignored_junk_and_damage_in_one_line(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "png", limit=30)
    four = root / "train" / "4"
    # what systems leave: never listed, never counted, never named
    for name in ("Thumbs.db", "desktop.ini", "DESKTOP.INI", ".DS_Store", "._00009.png", "Icon\r"):
        (four / name).write_bytes(b"\0\0\1 not a picture")
    tiny_png(four / ".thumbnails" / "small.png")
    tiny_png(root / "train" / "__MACOSX" / "x.png")  # not a class
    tiny_png(root / "test" / ".trash" / "x.png")
    # junk to report: not a picture, and three damaged pictures
    (four / "readme.txt").write_text("where these came from")
    (four / "notes.png").write_text("not a picture, named as one")
    (root / "test" / "1" / "666.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (root / "test" / "2" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # its header whole

    with pytest.warns(SkippedFilesWarning) as caught:
        data = open_folder(root)
    assert len(caught) == 1
    line = str(caught[0].message)
    assert data.classes == [str(k) for k in range(10)] and len(data.train) == len(data.test) == 30
    assert data.listed == 64
    reasons = {rel: reason for rel, reason, _ in data.skipped}
    assert {rel: kind for rel, _, kind in data.skipped} == {
        "test/1/666.jpg": "damaged", "test/2/cut.jpg": "damaged", "train/4/notes.png": "damaged",
        "train/4/readme.txt": "not a picture"}
    assert reasons["test/1/666.jpg"] == "an empty file"
    assert reasons["test/2/cut.jpg"].startswith("damaged or truncated image")
    assert reasons["train/4/readme.txt"] == reasons["train/4/notes.png"] == "not an image Pillow can read"
    assert "\n" not in line and line.startswith(f"{root}: 4 of its 64 files not used: "
                                                 "3 damaged or unreadable pictures (")
    assert "; 1 file that is not a picture (train/4/readme.txt); the full list, with reasons: " in line
    for system in ("Thumbs", "desktop", "DESKTOP", "DS_Store", "._", "Icon", "thumbnails", "MACOSX",
                   "trash"):
        assert system not in line
    assert line.endswith(str(data.skipped_list)) and data.skipped_list.parent == data.cache_path.parent
    listed = data.skipped_list.read_text().splitlines()
    assert sorted(tuple(row.split("\t")) for row in listed[1:]) == sorted(
        (kind, rel, reason) for rel, reason, kind in data.skipped)
    assert "60 of 64 files used (not used: 3 damaged or unreadable pictures, 1 file that is not a " \
           "picture)" in data.describe()

    # read from the cache: said again, the same way; the list is written again if gone
    data.skipped_list.unlink()
    again, said = quiet(root)
    assert not again.decoded_now and said == [line] and again.skipped_list.is_file()
    # strict refuses on a damaged picture, from the cache or decoding (another size), never on
    # a file that is not a picture or a system file
    damaged = ("666.jpg", "cut.jpg", "notes.png")
    for size in (28, 20):
        message = one_line_error(lambda size=size: open_folder(root, image_size=size, strict=True),
                                 "strict")
        assert any(name in message for name in damaged), message
    for name in ("test/1/666.jpg", "test/2/cut.jpg", "train/4/notes.png"):
        (root / name).unlink()
    strict, said = quiet(root, strict=True)
    assert strict.skipped == [("train/4/readme.txt", "not an image Pillow can read", "not a picture")]
    assert len(said) == 1 and "1 of its 61 files not used: 1 file that is not a picture" in said[0]
    (four / "readme.txt").unlink()
    clean, said = quiet(root, strict=True)
    assert clean.skipped == [] and said == [] and clean.skipped_list is None
    assert "60 of 60 files used; decoded now" in clean.describe()
    # a rebuild removes the older cache files and lists of the folder
    names = sorted(p.name for p in clean.cache_path.parent.iterdir())
    assert clean.cache_path.name in names and not any(n.endswith(".skipped.txt") for n in names)


def test_hidden_attribute_on_windows(monkeypatch):
    """Windows hides files by an attribute (its Thumbs.db and desktop.ini carry it)."""
    import stat
    from types import SimpleNamespace

    class Entry:
        def __init__(self, name, attributes):
            self.name, self._attributes = name, attributes

        def stat(self, follow_symlinks=True):
            return SimpleNamespace(st_file_attributes=self._attributes)

    monkeypatch.setattr(folders, "_WINDOWS", True)
    assert folders._ignored(Entry("IMG_0001.JPG", stat.FILE_ATTRIBUTE_HIDDEN | stat.FILE_ATTRIBUTE_ARCHIVE))
    assert not folders._ignored(Entry("IMG_0001.JPG", stat.FILE_ATTRIBUTE_ARCHIVE))
    monkeypatch.setattr(folders, "_WINDOWS", False)
    assert not folders._ignored(Entry("IMG_0001.JPG", stat.FILE_ATTRIBUTE_HIDDEN))


# --- hostile and huge pictures ----------------------------------------------------------------


def test_decompression_bomb_and_too_large_pictures(tmp_path, mnist_dir, book_params):
    bomb = blank_png(tmp_path / "bomb.png", 15000, 15000)
    assert bomb.stat().st_size < 300_000
    big = blank_png(tmp_path / "big.png", 3000, 3000)

    with pytest.raises(ImageRefused, match="decompression bomb") as caught:
        mnist_style(bomb)
    assert str(bomb) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ImageRefused, match="more than the 1.0 MiB allowed") as caught:
        mnist_style(big, max_decode_bytes=2**20)
    assert str(big) in str(caught.value) and "3000x3000 pixels" in str(caught.value)

    result = subprocess.run([sys.executable, "-m", "lowmem_cnn", "predict", str(book_params), str(bomb)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "bomb.png" in result.stderr

    root = make_folder(mnist_dir, tmp_path / "png", limit=20)
    os.replace(bomb, root / "train" / "2" / "bomb.png")
    os.replace(big, root / "test" / "5" / "big.png")
    said = []
    data = open_folder(root, warn=said.append, max_decode_bytes=4 * 2**20)
    assert len(data.train) == 20 and len(data.test) == 20
    assert len(said) == 1 and "2 pictures too large for the memory budget (" in said[0]
    reasons = dict((rel, reason) for rel, reason, _ in data.skipped)
    assert "refused as a possible decompression bomb" in reasons["train/2/bomb.png"]
    assert "3000x3000 pixels" in reasons["test/5/big.png"]
    assert "train/2/bomb.png" in said[0] and "test/5/big.png" in said[0]
    one_line_error(lambda: open_folder(root, strict=True, max_decode_bytes=4 * 2**20),
                   "bomb.png", "strict")
    # a larger budget decodes the picture skipped as too large (the bomb stays out)
    more, said = quiet(root, max_decode_bytes=64 * 2**20)
    assert more.decoded_now and len(more.test) == 21 and [s[0] for s in more.skipped] == [
        "train/2/bomb.png"]


def test_predict_peak_on_a_huge_blank_picture(tmp_path, book_params):
    """A blank 9000x9000 PNG (99 KB) made predict peak at 1.38 GB (float64 copies of the
    whole picture); now the digit is looked for in a copy of at most 1024x1024."""
    from lowmem_cnn.data.imaging import WORK_SIDE, decode_bytes

    huge = blank_png(tmp_path / "huge.png", 9000, 9000)
    done = run_lowmem("predict", book_params, huge)
    assert done.returncode == 1 and "no digit found" in done.stderr and "Traceback" not in done.stderr
    # No bound from one machine: the same command on a blank picture of the copy's size
    # (the same analysis, the same process), plus what decoding the huge one is planned
    # to take. One float64 copy of the whole picture would be 648 MB more.
    work_sized = run_lowmem("predict", book_params, blank_png(tmp_path / "work.png", WORK_SIDE, WORK_SIDE))
    assert work_sized.returncode == 1 and "no digit found" in work_sized.stderr
    with Image.open(huge) as picture:
        decoding = decode_bytes(picture, "L", (WORK_SIDE, WORK_SIDE))
    assert done.peak_rss < work_sized.peak_rss + decoding, (done.peak_rss, work_sized.peak_rss, decoding)


def test_big_jpeg_is_drawn_at_a_reduced_scale(tmp_path):
    from lowmem_cnn.data.imaging import image_row

    y, x = np.mgrid[0:2000, 0:3000]
    photo = np.stack([(x % 256), (y % 256), ((x + y) % 256)], axis=2).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=80)
    # decoded whole, the picture would take 3000 x 2000 x 4 bytes = 23 MiB; at 1/8 scale
    # 0.4 MiB
    row = image_row(tmp_path / "photo.jpg", (28, 28), 3, max_decode_bytes=8 * 2**20)
    assert row.shape == (3 * 28 * 28,)
    Image.fromarray(photo[:1000]).save(tmp_path / "photo.png")  # PNG: no reduced decode
    with pytest.raises(ImageRefused, match="3000x1000 pixels"):
        image_row(tmp_path / "photo.png", (28, 28), 3, max_decode_bytes=8 * 2**20)


def test_book_network_reads_a_png_folder_as_it_reads_mnist(tmp_path, mnist_dir, book_params):
    from lowmem_cnn.files.config import load_config
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.files.params import load_params
    from lowmem_cnn.training.evaluation import check_image_shape
    from lowmem_cnn.training.run import data_identity

    network = Network(load_config().network)
    load_params(book_params, network)
    data, _ = quiet(make_folder(mnist_dir, tmp_path / "png", limit=200))
    check_image_shape(network, data.train, data.test)
    positions = np.array([int(Path(f).stem) for f in data.test.files])
    idx = open_directory(mnist_dir).test
    plan = chosen_plan(network, 50)
    np.testing.assert_array_equal(network.predict(data.test.images.read_range(0, 200), plan),
                                  network.predict(idx.images.read(positions), plan))
    assert len(data_identity(data.train)) == 16


# --- memory of the decoding pass ---------------------------------------------------------------


def test_decoding_pass_memory_does_not_grow_with_the_images(tmp_path, mnist_dir):
    quiet(make_folder(mnist_dir, tmp_path / "warm", limit=30))  # imports and caches first
    peaks = {}
    for n in (100, 400):  # 200 and 800 pictures: train and test
        root = make_folder(mnist_dir, tmp_path / f"rgb{n}", tint=True, size=32, limit=n)
        tracemalloc.start()
        try:
            data, _ = quiet(root)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(data.train) + len(data.test) == 2 * n and data.decoded_now
    # The pass holds one picture at a time: what grows with the pictures is the listing
    # (each file's relative path, a label and a status byte, and sorting's copies: about
    # 100 bytes a file), never their rows. So the 600 pictures more add less than one
    # row each (here RGB at 28 x 28: 2,352 bytes, 1.3 MiB for all 600), whatever the
    # Python or NumPy build's own sizes: holding the rows, or any per-picture copy of
    # them, would add at least a row a picture.
    row_bytes = data.train.images.row_bytes
    assert row_bytes == 3 * 28 * 28
    assert peaks[400] - peaks[100] < (2 * 400 - 2 * 100) * row_bytes, peaks


def test_is_image_folder(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "png", limit=5)
    assert is_image_folder(root) and not is_image_folder(mnist_dir)
    assert not is_image_folder(tmp_path / "missing")
