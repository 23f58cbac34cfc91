import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def _mnist_dir():
    candidates = [os.environ.get("LOWMEM_CNN_DATA"), SHARED / "data" / "mnist"]
    for candidate in filter(None, candidates):
        if any(Path(candidate).glob("t10k-labels-idx1-ubyte*")):
            return Path(candidate).resolve()  # tests run commands from other directories
    return None


@pytest.fixture(scope="session")
def mnist_dir():
    found = _mnist_dir()
    if found is None:
        pytest.skip("real MNIST not found: set LOWMEM_CNN_DATA to a directory of the four IDX files")
    return found


@pytest.fixture(scope="session")
def book_params():
    path = SHARED / "fixtures" / "book" / "simple_convnet_params.pkl"
    if not path.exists():
        pytest.skip(f"the book's parameter file is not at {path}")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory; the user's is never touched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
