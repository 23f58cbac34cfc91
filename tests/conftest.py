import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DEEP_PARAMS = SHARED / "fixtures" / "book" / "deep_convnet_params.pkl"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip a test whose real data (or test extra) is missing; under CI fail it instead:
    CI must not go green by skipping what it is there to run."""
    if in_ci():
        pytest.fail(f"CI is set, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


def _mnist_dir():
    candidates = [os.environ.get("LOWMEM_CNN_DATA"), SHARED / "data" / "mnist"]
    for candidate in filter(None, candidates):
        if any(Path(candidate).glob("t10k-labels-idx1-ubyte*")):
            return Path(candidate).resolve()  # tests run commands from other directories
    return None


def real_mnist_dir() -> Path:
    found = _mnist_dir()
    if found is None:
        unavailable("real MNIST not found: set LOWMEM_CNN_DATA to a directory of the four IDX files")
    return found


@pytest.fixture(scope="session")
def mnist_dir():
    return real_mnist_dir()


def _book_file(path: Path) -> Path:
    if not path.exists():
        unavailable(f"the book's parameter file is not at {path}")
    return path


@pytest.fixture(scope="session")
def book_params():
    return _book_file(SHARED / "fixtures" / "book" / "simple_convnet_params.pkl")


@pytest.fixture(scope="session")
def deep_params():
    return _book_file(DEEP_PARAMS)


def need_module(name: str):
    """Import a module of the test extra, or skip (fail under CI) without it."""
    try:
        return __import__(name)
    except ImportError:
        unavailable(f"{name} is not installed (pip install '.[test]')")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory; the user's is never touched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# --- running the command, with its peak RSS as the OS counts it ----------------------

# Linux carries a memory map's high-water mark across exec: a child's ru_maxrss (and
# its own getrusage figure) starts at the peak RSS of the process that exec'd it, so a
# command started by pytest would report pytest's peak (measured: `python -c pass`
# started by a process holding 300 MiB reported 325 MiB). This launcher, a bare
# interpreter of a few MiB, forks the command and reports wait4's figures for it.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the command's ru_maxrss from wait4


def run_python(*args, cwd=None, timeout=600) -> Finished:
    """Run `python ARGS` and measure its peak RSS from the OS (Linux: ru_maxrss in KiB)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "rusage"
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env=os.environ.copy(), start_new_session=True)
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and the command under it
            launcher.communicate()
            raise
        if not report.exists():
            raise RuntimeError(f"the launcher failed (status {launcher.returncode}): {stderr}")
        status, kib = map(int, report.read_text().split())
    return Finished(status, stdout, stderr, kib * 1024)


def run_lowmem(*args, cwd=None, timeout=600) -> Finished:
    return run_python("-m", "lowmem_cnn", *args, cwd=cwd, timeout=timeout)
