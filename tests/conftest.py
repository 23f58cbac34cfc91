import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "tests" / "fixtures" / "book"  # see its README.md: source, license, SHA-256
SIMPLE_PARAMS = BOOK / "simple_convnet_params.pkl"
DEEP_PARAMS = BOOK / "deep_convnet_params.pkl"

MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Taken before private_cache gives each test its own XDG_CACHE_HOME: the user cache is
# where `lowmem-cnn train` downloads MNIST, so the tests look there too.
_USER_XDG_CACHE_HOME = os.environ.get("XDG_CACHE_HOME")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str):
    """Skip a test whose real data (or test extra) is missing; under CI fail it instead:
    CI must not go green by skipping what it is there to run."""
    if in_ci():
        pytest.fail(f"CI is set, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


def user_mnist_cache() -> Path:
    """The directory the CLI downloads MNIST into, for the user who started pytest."""
    from lowmem_cnn.data.idx import cache_dir  # lazily: lowmem_cnn sets BLAS variables on import

    with pytest.MonkeyPatch.context() as patch:
        if _USER_XDG_CACHE_HOME is None:
            patch.delenv("XDG_CACHE_HOME", raising=False)
        else:
            patch.setenv("XDG_CACHE_HOME", _USER_XDG_CACHE_HOME)
        return cache_dir() / "mnist"


def _holds_mnist(directory: Path) -> bool:
    return all((directory / name).is_file() or (directory / f"{name}.gz").is_file()
               for name in MNIST_NAMES)


def find_mnist(cache: Path | None = None, say=None) -> tuple[Path | None, str]:
    """(MNIST's directory, "") or (None, why not and how to get it), found as the CLI
    finds it: $LOWMEM_CNN_DATA if set, else the user cache, downloaded there if empty."""
    how = ("set LOWMEM_CNN_DATA to a directory of the four MNIST files (gzipped or not: "
           f"{', '.join(MNIST_NAMES)})")
    chosen = os.environ.get("LOWMEM_CNN_DATA")
    if chosen:  # the user's choice, as for the CLI: no fallback that would hide a typo
        if _holds_mnist(Path(chosen)):
            return Path(chosen).resolve(), ""  # tests run commands from other directories
        return None, (f"real MNIST not found: LOWMEM_CNN_DATA={chosen} does not hold the four "
                      f"files; {how}, or unset it to download them into the user cache")
    cache = user_mnist_cache() if cache is None else cache
    if _holds_mnist(cache):
        return cache, ""
    from lowmem_cnn.data.idx import download_mnist
    from lowmem_cnn.common.errors import LowmemError

    if say:
        say(f"downloading MNIST (11 MB) into {cache}, once, as `lowmem-cnn train` would")
    try:
        download_mnist(cache)  # each file verified against MNIST's SHA-256
    except (LowmemError, OSError) as err:
        return None, (f"real MNIST not found: LOWMEM_CNN_DATA is not set and {cache} lacks the "
                      f"four files; to get them, run the tests once with network access (they "
                      f"download them there), or put them in {cache}, or {how}. The download "
                      f"said: {err}")
    return cache, ""


def real_mnist_dir(say=None) -> Path:
    found, why = find_mnist(say=say)
    if found is None:
        unavailable(why)
    return found


@pytest.fixture(scope="session")
def mnist_dir(request):
    """Session-scoped: pytest keeps the outcome (a skip too), so a failed download is tried
    once per run, not once per test."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")

    def say(text):  # past the capture: a download should not look like a hang
        if capture is None or reporter is None:
            return
        with capture.global_and_fixture_disabled():
            reporter.write("\n")  # the progress line is mid-way here
            reporter.write_line(text)

    return real_mnist_dir(say)


def _book_file(path: Path) -> Path:
    if not path.exists():
        unavailable(f"the book's parameter file is not at {path}: it comes with the tests "
                    f"(see {BOOK / 'README.md'}); is the checkout complete?")
    return path


@pytest.fixture(scope="session")
def book_params():
    return _book_file(SIMPLE_PARAMS)


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
    """Every test gets its own cache directory; the user's is only ever written by the
    one MNIST download of find_mnist, which `lowmem-cnn train` would make too."""
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


def run_python(*args, cwd=None, timeout=600, env=None) -> Finished:
    """Run `python ARGS` (with `env` added to the environment) and measure its peak RSS
    from the OS (Linux: ru_maxrss in KiB)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "rusage"
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True)
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


def run_lowmem(*args, cwd=None, timeout=600, env=None) -> Finished:
    return run_python("-m", "lowmem_cnn", *args, cwd=cwd, timeout=timeout, env=env)


def refusal_line(stderr: str) -> str:
    """The one error line of a run refused at once: no traceback, and beside the
    error only the lines a run tells before it (its budget, its data)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("Error: "), stderr
    assert all(line.startswith(("budget:", "data:")) for line in lines[:-1]), stderr
    return lines[-1]
