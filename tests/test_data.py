import gzip
import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, unavailable
from idx_files import NAMES, images_bytes, labels_bytes, write_dataset

from lowmem_cnn.data import idx as data_module
from lowmem_cnn.data.idx import MNIST_SHA256, download_mnist, open_data, open_directory
from lowmem_cnn.data.datasets import ImageRows
from lowmem_cnn.common.errors import LowmemError


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_reads_raw_and_gzip_alike(tmp_path):
    raw = open_directory(write_dataset(tmp_path / "raw"))
    packed = open_directory(write_dataset(tmp_path / "gz", gz=True))
    assert not raw.is_mnist and not packed.is_mnist
    np.testing.assert_array_equal(raw.train.labels, packed.train.labels)
    idx = np.array([3, 0, 49, 3])
    np.testing.assert_array_equal(raw.train.images.read(idx), packed.train.images.read(idx))
    np.testing.assert_array_equal(raw.test.images.read_range(5, 9), packed.test.images.read_range(5, 9))


def test_gzip_is_decompressed_to_the_cache_not_the_data_dir(tmp_path, monkeypatch):
    directory = write_dataset(tmp_path / "gz", gz=True)
    before = sorted(os.listdir(directory))
    decompressed = []
    real_decompress = data_module._decompress
    monkeypatch.setattr(data_module, "_decompress",
                        lambda source, target: decompressed.append(source.name)
                        or real_decompress(source, target))
    os.chmod(directory, 0o555)
    try:
        dataset = open_directory(directory)
    finally:
        os.chmod(directory, 0o755)
    assert sorted(os.listdir(directory)) == before
    assert sorted(decompressed) == sorted(before)
    cached = dataset.train.images.path
    assert str(cached).startswith(os.environ["XDG_CACHE_HOME"])
    assert cached.read_bytes() == gzip.decompress((directory / (NAMES["train_images"] + ".gz")).read_bytes())
    first = cached.stat()
    # the second time the cached copies are used as they are: nothing decompressed or rewritten
    decompressed.clear()
    again = open_directory(directory)
    assert decompressed == []
    assert again.train.images.path == cached
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    np.testing.assert_array_equal(again.train.labels, dataset.train.labels)


def test_rows_come_back_in_the_order_asked(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28))
    directory = write_dataset(tmp_path / "d", n_train=30, train_images=images_bytes(images))
    dataset = open_directory(directory)
    order = rng.permutation(30)
    np.testing.assert_array_equal(dataset.train.images.read(order), images.reshape(30, -1)[order])


def test_file_rows_are_read_in_the_order_given(tmp_path):
    # A folder split's rows: any file rows, in any order, after a header of any size.
    rows = np.arange(12 * 6, dtype=np.uint8).reshape(12, 6)  # row k holds 6k..6k+5
    path = tmp_path / "rows"
    path.write_bytes(b"header" + rows.tobytes())
    file_rows = np.array([3, 4, 5, 0, 11, 10, 6, 7])
    images = ImageRows(path, (2, 1, 3), 6, file_rows=file_rows)
    assert (len(images), images.row_bytes) == (8, 6)
    np.testing.assert_array_equal(images.read_range(0, 8), rows[file_rows])
    np.testing.assert_array_equal(images.read_range(2, 7), rows[file_rows[2:7]])
    np.testing.assert_array_equal(images.read(np.array([7, 0, 3])), rows[file_rows[[7, 0, 3]]])
    assert images.read_range(4, 4).shape == (0, 6)
    counted = ImageRows(path, (2, 1, 3), 6, count=12)
    np.testing.assert_array_equal(counted.read_range(2, 9), rows[2:9])
    assert counted.read_range(4, 4).shape == (0, 6)


def test_closed_data_sets_let_go_of_their_files(tmp_path):
    directory = write_dataset(tmp_path / "d")
    with open_directory(directory) as dataset:
        first = dataset.test.images.read_range(0, 1)
    for split in (dataset.train, dataset.test):
        with pytest.raises(ValueError, match="closed file"):
            split.images.read_range(0, 1)
        with pytest.raises(ValueError, match="closed file"):
            split.images.read(np.array([0]))
    with ImageRows(dataset.test.images.path, (1, 28, 28), 16, count=20) as images:
        np.testing.assert_array_equal(images.read_range(0, 1), first)
    with pytest.raises(ValueError, match="closed file"):
        images.read_range(0, 1)


BAD_FILES = {
    "truncated images": ("train_images", lambda b: b[:-10], "truncated"),
    "trailing bytes": ("train_images", lambda b: b + b"xx", "trailing"),
    "wrong image magic": ("train_images", lambda b: b"\0\0\x08\x01" + b[4:], "magic number"),
    "labels file given as images": ("test_images", lambda b: labels_bytes(np.zeros(20)), "magic"),
    "truncated header": ("test_labels", lambda b: b[:6], "truncated IDX header"),
    "empty file": ("test_labels", lambda b: b"", "not an IDX file"),
    "label out of range": ("train_labels", lambda b: b[:-1] + b"\x0c", "outside 0..9"),
    "count mismatch": ("test_labels", lambda b: labels_bytes(np.zeros(19)), "20 images but"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("gz", [False, True])
def test_bad_idx_files_name_the_file(tmp_path, case, gz):
    key, damage, message = BAD_FILES[case]
    good = tmp_path / "good"
    write_dataset(good)
    original = (good / NAMES[key]).read_bytes()
    directory = write_dataset(tmp_path / "bad", gz=gz, **{key: damage(original)})
    with pytest.raises(LowmemError, match=message) as err:
        open_directory(directory)
    assert NAMES[key] in str(err.value)


def test_missing_file(tmp_path):
    directory = write_dataset(tmp_path / "d", test_labels=None)
    with pytest.raises(LowmemError, match="missing t10k-labels-idx1-ubyte"):
        open_directory(directory)


def test_damaged_gzip(tmp_path):
    directory = write_dataset(tmp_path / "d", gz=True)
    path = directory / (NAMES["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LowmemError, match="damaged gzip"):
        open_directory(directory)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(LowmemError, match="damaged gzip"):
        open_directory(directory)


def test_real_mnist_facts(mnist_dir):
    dataset = open_directory(mnist_dir)
    assert dataset.is_mnist
    assert (len(dataset.train), len(dataset.test)) == (60000, 10000)
    assert np.bincount(dataset.train.labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(dataset.test.labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert dataset.train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert dataset.test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    total = total_sq = 0.0
    for start in range(0, 60000, 10000):
        x = dataset.train.images.read_range(start, start + 10000).astype(np.float64) / 255
        total += x.sum()
        total_sq += (x * x).sum()
    mean = total / (60000 * 784)
    assert mean == pytest.approx(0.13066, abs=1e-5)
    assert np.sqrt(total_sq / (60000 * 784) - mean**2) == pytest.approx(0.30811, abs=1e-5)


# --- downloads from a real HTTP server on 127.0.0.1 ---------------------------------


class _Server:
    def __init__(self, root: Path, drop_after: int | None = None):
        drop = drop_after

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def copyfile(self, source, outputfile):
                if drop is None:
                    return super().copyfile(source, outputfile)
                outputfile.write(source.read(drop))  # then hang up half-way

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Small files served as 'MNIST': the known checksums are replaced by theirs."""
    directory = write_dataset(tmp_path / "served", gz=True)
    sums = {name: _sha256(gzip.decompress((directory / f"{name}.gz").read_bytes()))
            for name in NAMES.values()}
    monkeypatch.setattr(data_module, "MNIST_SHA256", sums)
    return directory


def test_download_verifies_and_caches(fake_mnist, tmp_path, monkeypatch):
    server = _Server(fake_mnist)
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.n = 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    try:
        monkeypatch.setenv("LOWMEM_CNN_MIRRORS", server.url)
        monkeypatch.delenv("LOWMEM_CNN_DATA", raising=False)
        dataset = open_data(progress=Bar)
    finally:
        server.close()
    assert len(dataset.train) == 50
    assert len(bars) == 4 and all(bar.n > 0 for bar in bars)
    cached = Path(os.environ["XDG_CACHE_HOME"]) / "lowmem-cnn" / "mnist"
    assert sorted(os.listdir(cached)) == sorted(NAMES.values())
    # what the data set reads is what was served, decompressed; and is_mnist (set by
    # the download's verification, not recomputed) is true of those very files
    for split in (dataset.train, dataset.test):
        served = gzip.decompress((fake_mnist / (split.images.path.name + ".gz")).read_bytes())
        assert split.images.path.parent == cached
        assert split.images.path.read_bytes() == served
        np.testing.assert_array_equal(split.images.read_range(0, len(split)).reshape(-1),
                                      np.frombuffer(served, np.uint8, offset=16))
    assert dataset.is_mnist
    for name in NAMES.values():
        assert _sha256((cached / name).read_bytes()) == data_module.MNIST_SHA256[name]
    # no server now: the cache serves
    assert len(open_data().test) == 20


def test_file_failing_verification_is_refused_and_next_mirror_tried(fake_mnist, tmp_path,
                                                                      monkeypatch):
    wrong = write_dataset(tmp_path / "wrong", gz=True, seed=99)
    bad, good = _Server(wrong), _Server(fake_mnist)
    try:
        monkeypatch.setenv("LOWMEM_CNN_MIRRORS", f"{bad.url} {good.url}")
        download_mnist(tmp_path / "cache-dir")
    finally:
        bad.close()
        good.close()
    for name, sha in data_module.MNIST_SHA256.items():
        assert _sha256((tmp_path / "cache-dir" / name).read_bytes()) == sha
    assert sorted(os.listdir(tmp_path / "cache-dir")) == sorted(NAMES.values())


def test_dropped_connection_leaves_nothing_and_all_mirrors_down_says_what_to_do(
        fake_mnist, tmp_path, monkeypatch):
    dropping = _Server(fake_mnist, drop_after=100)
    try:
        monkeypatch.setenv("LOWMEM_CNN_MIRRORS", f"{dropping.url} http://127.0.0.1:9/")
        with pytest.raises(LowmemError, match="--data-dir") as err:
            download_mnist(tmp_path / "cache-dir")
    finally:
        dropping.close()
    assert "could not download" in str(err.value)
    assert os.listdir(tmp_path / "cache-dir") == []


def published_checksums():
    """The table of tests/fixtures/mnist/README.md: file name -> decompressed SHA-256."""
    readme = ROOT / "tests" / "fixtures" / "mnist" / "README.md"
    if not readme.exists():
        unavailable(f"the data README with the published checksums is not at {readme}")
    rows = re.findall(r"^\|\s*([a-z0-9-]+-idx[13]-ubyte)\s*\|\s*([0-9a-f]{64})\s*\|$",
                      readme.read_text(), re.MULTILINE)
    return dict(rows)


def test_known_checksums_are_the_published_ones():
    published = published_checksums()
    assert sorted(published) == sorted(NAMES.values())
    assert MNIST_SHA256 == published


def test_known_checksums_are_those_of_the_real_files(mnist_dir):
    for name, sha in MNIST_SHA256.items():
        raw, packed = mnist_dir / name, mnist_dir / f"{name}.gz"
        content = raw.read_bytes() if raw.exists() else gzip.decompress(packed.read_bytes())
        assert _sha256(content) == sha, name


def test_unreadable_file(tmp_path, monkeypatch):
    import builtins

    directory = write_dataset(tmp_path / "d")
    locked = directory / NAMES["test_images"]
    real_open = builtins.open

    def open_unless_locked(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_unless_locked)
    with pytest.raises(LowmemError, match="t10k-images-idx3-ubyte: cannot read \\(Permission denied\\)"):
        open_directory(directory)


@pytest.mark.parametrize("ci, outcome", [(None, pytest.skip.Exception), ("", pytest.skip.Exception),
                                         ("false", pytest.skip.Exception),
                                         ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)])
def test_missing_real_data_skips_but_fails_under_ci(monkeypatch, ci, outcome):
    import conftest

    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("LOWMEM_CNN_DATA", "/nonexistent/mnist")  # set: no cache, no download
    with pytest.raises(outcome, match="real MNIST not found"):
        conftest.real_mnist_dir()
    with pytest.raises(outcome, match="parameter file is not at /nonexistent"):
        conftest._book_file(Path("/nonexistent/params.pkl"))
