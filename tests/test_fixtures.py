"""The data the tests use: the book's files that travel with them, and MNIST found the
way the CLI finds it ($LOWMEM_CNN_DATA, else the user cache, downloaded there once)."""

import gzip
import hashlib
import http.server
import os
import re
import threading
from functools import partial
from pathlib import Path

import conftest
import pytest
from conftest import BOOK, MNIST_NAMES, find_mnist
from idx_files import write_dataset

from lowmem_cnn.data import idx as data_module
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_book_fixtures_are_the_files_their_readme_lists():
    rows = re.findall(r"^\|\s*(\S+\.pkl)\s*\|\s*([0-9a-f]{64})\s*\|\s*(\d+)\s*\|",
                      (BOOK / "README.md").read_text(), re.MULTILINE)
    assert sorted(name for name, _, _ in rows) == sorted(p.name for p in BOOK.glob("*.pkl"))
    assert {conftest.SIMPLE_PARAMS.name, conftest.DEEP_PARAMS.name} <= {name for name, _, _ in rows}
    for name, sha, size in rows:
        content = (BOOK / name).read_bytes()
        assert (len(content), _sha256(content)) == (int(size), sha), \
            f"{BOOK / name} is damaged: not the book's file (see {BOOK / 'README.md'})"


class _Mirror:
    """A local HTTP mirror of a directory that counts the requests it serves."""

    def __init__(self, root: Path):
        self.requests = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def served_mnist(tmp_path, monkeypatch):
    """Small IDX files on a local mirror, standing in for MNIST (their checksums replace
    MNIST's, so the download's verification passes for them and only them)."""
    directory = write_dataset(tmp_path / "served", gz=True)
    monkeypatch.setattr(data_module, "MNIST_SHA256", {
        name: _sha256(gzip.decompress((directory / f"{name}.gz").read_bytes())) for name in MNIST_NAMES})
    mirror = _Mirror(directory)
    monkeypatch.setenv("LOWMEM_CNN_MIRRORS", mirror.url)
    monkeypatch.delenv("LOWMEM_CNN_DATA", raising=False)
    yield mirror
    mirror.close()


def test_mnist_is_downloaded_into_the_cache_once_then_read_from_it(served_mnist, tmp_path):
    cache = tmp_path / "user-cache" / "lowmem-cnn" / "mnist"
    said = []
    found, why = find_mnist(cache, say=said.append)
    assert (found, why) == (cache, "")
    assert sorted(os.listdir(cache)) == sorted(MNIST_NAMES)
    assert len(served_mnist.requests) == 4 and len(said) == 1 and str(cache) in said[0]
    for name, sha in data_module.MNIST_SHA256.items():
        assert _sha256((cache / name).read_bytes()) == sha
    # the next run finds the cache filled: nothing is fetched
    served_mnist.requests.clear()
    assert find_mnist(cache) == (cache, "")
    assert served_mnist.requests == []


def test_lowmem_cnn_data_comes_first_and_is_not_second_guessed(served_mnist, tmp_path, monkeypatch):
    chosen = write_dataset(tmp_path / "chosen")
    monkeypatch.setenv("LOWMEM_CNN_DATA", str(chosen))
    assert find_mnist(tmp_path / "cache") == (chosen.resolve(), "")
    # set to a directory without the files: not found, and no download behind the user's back
    monkeypatch.setenv("LOWMEM_CNN_DATA", str(tmp_path / "typo"))
    found, why = find_mnist(tmp_path / "cache")
    assert found is None and "LOWMEM_CNN_DATA=" in why and str(tmp_path / "typo") in why
    assert served_mnist.requests == [] and not (tmp_path / "cache").exists()


def test_a_failed_download_says_how_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWMEM_CNN_DATA", raising=False)
    monkeypatch.setenv("LOWMEM_CNN_MIRRORS", "http://127.0.0.1:9/")  # the discard port: refused
    cache = tmp_path / "cache"
    found, why = find_mnist(cache)
    assert found is None and why.startswith("real MNIST not found")
    assert "network access" in why and f"put them in {cache}" in why and "LOWMEM_CNN_DATA" in why
    assert all(name in why for name in MNIST_NAMES)
    assert os.listdir(cache) == []  # nothing partial left to be taken for data next time


def test_the_user_cache_is_the_one_pytest_started_with_not_a_tests_own():
    # private_cache has pointed XDG_CACHE_HOME at this test's directory by now
    assert not conftest.user_mnist_cache().is_relative_to(os.environ["XDG_CACHE_HOME"])
    assert conftest.user_mnist_cache().parts[-2:] == ("lowmem-cnn", "mnist")
