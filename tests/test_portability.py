"""The command where the Unix-only pieces are missing, as on Windows: no `resource`
module, no os.preadv, no glibc mallopt. Run on Linux with those taken away in the
child before lowmem_cnn is imported."""

import gc
import json
import os

import pytest

from conftest import run_python

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the launcher forks")

# Takes the pieces away, then runs the command line with the arguments given.
WITHOUT_UNIX = """
import os, sys
import psutil  # psutil itself needs `resource` on Linux (not on Windows): import it first
sys.modules["resource"] = None  # `import resource` fails from here on
del os.preadv
import ctypes
def no_library(*args, **kwargs):
    raise OSError("no such library")
ctypes.CDLL = no_library  # no C library to find mallopt in
from lowmem_cnn import cli
from lowmem_cnn.memory import budget
assert budget.map_large_arrays() is False
sys.argv = ["lowmem-cnn", *sys.argv[1:]]
cli.main()
"""

def run_without_unix(*args, cwd):
    """(exit status, the JSON line the command printed last, wait4's peak RSS in bytes, stderr)"""
    done = run_python("-c", WITHOUT_UNIX, *args, "--json", cwd=cwd)  # peak RSS from wait4
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.peak_rss


def assert_same_peak(printed, measured):
    # the peak the command prints (from /proc here) against the OS's figure for the whole
    # process, taken after it exited
    assert abs(printed - measured) <= 0.03 * measured, (printed, measured)


def test_train_without_unix_pieces(mnist_dir, tmp_path):
    result, peak = run_without_unix("train", "--limit", "300", "--epochs", "1", "--data-dir",
                                    mnist_dir, "--out", tmp_path / "p.pkl", cwd=tmp_path)
    assert (tmp_path / "p.pkl").exists()
    assert result["train_images"] == 300
    assert 0 < result["test_accuracy"] <= 1
    assert_same_peak(result["peak_rss_bytes"], peak)
    assert peak < result["max_ram_bytes"]


def test_eval_without_unix_pieces(mnist_dir, book_params, tmp_path):
    # all 10,000 test images in one read: seek and read instead of pread
    result, peak = run_without_unix("eval", book_params, "--batch-size", "10000", "--max-ram",
                                    "128M", "--data-dir", mnist_dir, cwd=tmp_path)
    assert (result["correct"], result["n"]) == (9600, 10_000)  # as the book's code gets
    assert_same_peak(result["peak_rss_bytes"], peak)
    assert peak < 128 * 2**20


def file_positions(path):
    """{descriptor: file position} of the files this process has open on `path` (the
    descriptors listed in /dev/fd): reading with pread leaves a position where it was,
    seek and read moves it."""
    target, positions = os.stat(path), {}
    for fd in map(int, os.listdir("/dev/fd")):
        try:
            if os.path.samestat(os.fstat(fd), target):
                positions[fd] = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:  # closed since it was listed (the listing's own descriptor)
            continue
    return positions


def opened(make, path):
    """make()'s result and the descriptors on `path` it opened."""
    before = set(file_positions(path))
    made = make()
    return made, sorted(set(file_positions(path)) - before)


def test_images_read_with_seek_match_pread(mnist_dir, monkeypatch):
    # Both ways of reading in one process, and two threads reading the same file at
    # once (the trainer reads the next batch on a thread while the main one may evaluate).
    # Without the lock, 1 to 3 of these 20,000 rows came out wrong (3 runs).
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from lowmem_cnn.data.idx import open_directory, open_images

    gc.collect()  # readers earlier tests let go of close their files now, not mid-test
    pread = open_directory(mnist_dir).train.images
    order = np.random.default_rng(0).permutation(len(pread))[:20_000]
    expected, expected_range = pread.read(order), pread.read_range(7, 5007)
    # the two ways really are two, as the OS sees them: these reads (pread) moved no
    # file position, the next reader's (seek and read) leave its file where they ended
    assert set(file_positions(pread.path).values()) == {0}
    monkeypatch.delattr(os, "preadv")
    seek, files = opened(lambda: open_images(pread.path), pread.path)
    np.testing.assert_array_equal(seek.read(order), expected)
    np.testing.assert_array_equal(seek.read_range(7, 5007), expected_range)
    end = 16 + 5007 * pread.row_bytes  # the IDX header, then rows up to 5007
    assert [file_positions(pread.path).get(fd) for fd in files] == [end]

    def reads(start):
        return [seek.read(order[i : i + 100]) for i in range(start, len(order), 200)]

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(reads, [0, 100]))
    for start, batches in zip([0, 100], both, strict=True):
        for batch, i in zip(batches, range(start, len(order), 200), strict=True):
            np.testing.assert_array_equal(batch, expected[i : i + 100])


@pytest.mark.parametrize("has_preadv", [True, False])
def test_a_file_that_shrank_is_an_error(tmp_path, monkeypatch, has_preadv):
    import numpy as np
    from idx_files import images_bytes

    from lowmem_cnn.data.idx import open_images
    from lowmem_cnn.common.errors import LowmemError

    if not has_preadv:
        monkeypatch.delattr(os, "preadv")
    path = tmp_path / "images"
    path.write_bytes(images_bytes(np.zeros((10, 28, 28), np.uint8)))
    images = open_images(path)
    os.truncate(path, 16 + 5 * 784)
    assert images.read_range(0, 5).shape == (5, 784)
    with pytest.raises(LowmemError, match="shrank"):
        images.read_range(0, 10)
    with pytest.raises(LowmemError, match="shrank"):
        images.read(np.array([2, 7]))
