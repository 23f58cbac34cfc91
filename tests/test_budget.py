import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_cnn.memory import budget
from lowmem_cnn.memory.budget import (
    ARENA_ADDRESS_SPACE,
    BLAS_BUFFER,
    DEFAULT_SHARE_OF_AVAILABLE,
    CgroupLimit,
    available_memory,
    cgroup_room,
    parse_size,
    process_limit,
    resolve_budget,
)
from lowmem_cnn.common.errors import LowmemError

MIB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's rlimit model")


@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("2GB", 2 * 10**9),
    ("800MB", 800 * 10**6), ("1048576", 1048576), ("64m", 64 * 2**20), ("1t", 2**40),
    ("3KiB", 3072), ("3kb", 3000), (" 2 G ", 2 * 2**30), ("100B", 100),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["banana", "0", "-1G", "", "1.2.3G", "5X", "G", "0.0001", "nan"])
def test_bad_sizes(text):
    with pytest.raises(ValueError):
        parse_size(text)


@settings(deadline=None)  # a busy machine must not fail a test of arithmetic
@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["K", "M", "G", "KiB", "MiB"]))
def test_binary_units_are_powers_of_1024(n, unit):
    power = {"K": 1, "M": 2, "G": 3}[unit[0]]
    assert parse_size(f"{n}{unit}") == n * 1024**power
    assert parse_size(f"{n}{unit[0]}B") == n * 1000**power


def test_resolve_budget_reports_garbage():
    with pytest.raises(LowmemError, match="banana"):
        resolve_budget("banana")


# --- available RAM: psutil's figure, capped by the cgroup -----------------------------


@pytest.fixture
def machine(monkeypatch):
    """A machine with 8 GiB available, no cgroup limit and no rlimit; change what a test needs."""
    import psutil

    fake = SimpleNamespace(available=8 * 2**30, cgroup=None, limit=None)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=fake.available))
    monkeypatch.setattr(budget, "cgroup_limit", lambda: fake.cgroup and CgroupLimit(fake.cgroup, 0, "/x", 2))
    monkeypatch.setattr(budget, "process_limit", lambda threads=None: fake.limit)
    return fake


def test_default_budget_is_the_share_of_available_ram(machine):
    machine.available = 3 * 2**30 + 7
    assert resolve_budget(None) == int((3 * 2**30 + 7) * DEFAULT_SHARE_OF_AVAILABLE)
    assert budget.explain_default_budget()[1] == "half of the available RAM"


def test_default_budget_is_the_share_of_the_cgroups_room_when_lower(machine):
    machine.cgroup = 1 * 2**30
    assert available_memory() == 2**30
    assert resolve_budget(None) == int(2**30 * DEFAULT_SHARE_OF_AVAILABLE)
    machine.cgroup = 16 * 2**30  # a cgroup limit above the machine's RAM changes nothing
    assert available_memory() == 8 * 2**30


def _cgroup(root, files):
    """The files of a root cgroup mounted at `root` (v2) and `root`/memory (v1), and the
    /proc/self/cgroup and mountinfo that show them: the arguments of cgroup_room."""
    (root / "memory").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text + "\n")
    (root / "cgroup").write_text("4:memory:/\n0::/\n")
    (root / "mountinfo").write_text(
        f"41 31 0:38 / {root} rw - cgroup2 cgroup2 rw\n"
        f"35 31 0:32 / {root / 'memory'} rw - cgroup cgroup rw,memory\n")
    return root / "cgroup", root / "mountinfo"


@pytest.mark.parametrize("files, room", [
    ({"memory.max": "1073741824", "memory.current": "104857600"}, 2**30 - 100 * MIB),  # v2
    ({"memory.max": "max", "memory.current": "104857600"}, None),  # v2 without a limit
    ({"memory.max": "1000", "memory.current": "5000"}, 0),  # over the limit: no room
    ({"memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
      "memory/memory.usage_in_bytes": "104857600"}, None),
    ({"memory/memory.limit_in_bytes": "536870912",
      "memory/memory.usage_in_bytes": "104857600"}, 512 * MIB - 100 * MIB),  # v1
    ({"memory.max": "max", "memory/memory.limit_in_bytes": "536870912"}, 512 * MIB),  # hybrid
    ({}, None),  # no cgroup files at all (not Linux, or not mounted)
])
def test_cgroup_room(tmp_path, files, room):
    assert cgroup_room(*_cgroup(tmp_path, files)) == room


def test_available_memory_is_the_lower_of_ram_and_cgroup_room(tmp_path, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=4 * 2**30))
    files = _cgroup(tmp_path, {"memory.max": str(2**30), "memory.current": str(256 * MIB)})
    monkeypatch.setattr(budget, "cgroup_limit", partial(budget.cgroup_limit, *files))
    assert available_memory() == 2**30 - 256 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory() == 4 * 2**30


def test_rss_and_available_ram_are_psutils():
    import psutil

    assert abs(budget.current_rss() - psutil.Process().memory_info().rss) < 2 * MIB
    assert 0 < available_memory() <= psutil.virtual_memory().total


# --- the process's own limits (ulimit -v, ulimit -d) ----------------------------------


@pytest.fixture
def rlimits(monkeypatch):
    """Fake RLIMIT_AS / RLIMIT_DATA (None: unlimited) and a process that maps 100 MiB
    (40 MiB of it private and writable), 30 MiB resident, with 8 MiB thread stacks."""
    import psutil
    import resource

    fake = SimpleNamespace(AS=None, DATA=None)
    kinds = {resource.RLIMIT_AS: "AS", resource.RLIMIT_DATA: "DATA", resource.RLIMIT_STACK: "STACK"}

    def getrlimit(kind):
        value = {"AS": fake.AS, "DATA": fake.DATA, "STACK": 8 * MIB}[kinds[kind]]
        value = resource.RLIM_INFINITY if value is None else value
        return value, value

    memory = SimpleNamespace(vms=100 * MIB, data=40 * MIB, rss=30 * MIB)
    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: memory))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * 2**30))
    monkeypatch.setattr(budget, "cgroup_limit", lambda: None)
    return fake


@linux_only
def test_no_rlimit_leaves_the_default_alone(rlimits):
    assert process_limit(2) is None
    assert resolve_budget(None, threads=2) == 4 * 2**30


@linux_only
def test_address_space_limit_caps_the_default_budget(rlimits):
    rlimits.AS = 2**30
    # 2 threads: two more stacks and malloc arenas (the worker and the batch reader),
    # three BLAS buffers
    reserve = 2 * (8 * MIB + ARENA_ADDRESS_SPACE) + 3 * BLAS_BUFFER
    ceiling = 30 * MIB + 2**30 - 100 * MIB - reserve
    limit = process_limit(2)
    assert (limit.limit, limit.mapped, limit.reserve, limit.ceiling) == (2**30, 100 * MIB, reserve, ceiling)
    assert budget.explain_default_budget(2) == (ceiling, "the room under ulimit -v (RLIMIT_AS)")
    assert resolve_budget(None, threads=2) == ceiling
    # more threads, more reserve
    assert process_limit(4).ceiling == ceiling - 2 * (8 * MIB + ARENA_ADDRESS_SPACE + BLAS_BUFFER)


@linux_only
def test_data_limit_counts_writable_memory_and_no_arenas(rlimits):
    rlimits.DATA = 512 * MIB
    reserve = 2 * 8 * MIB + 3 * BLAS_BUFFER
    limit = process_limit(2)
    assert limit.name == "ulimit -d (RLIMIT_DATA)"
    assert limit.ceiling == 30 * MIB + 512 * MIB - 40 * MIB - reserve
    rlimits.AS = 2**30  # looser than the data limit here: the tighter one counts
    assert process_limit(2).name == "ulimit -d (RLIMIT_DATA)"


@linux_only
def test_a_limit_above_half_the_ram_changes_nothing(rlimits):
    rlimits.AS = 64 * 2**30
    assert resolve_budget(None, threads=2) == 4 * 2**30


@linux_only
def test_no_room_under_the_limit_is_one_clear_error(rlimits):
    rlimits.AS = 300 * MIB  # 100 MiB mapped + 368 MiB of threads' reserve: over the limit
    with pytest.raises(LowmemError, match=r"no room .*ulimit -v \(RLIMIT_AS\) is 314,572,800 bytes"):
        resolve_budget(None, threads=2)


@linux_only
def test_max_ram_the_limit_cannot_hold_is_refused(rlimits):
    rlimits.AS = 2**30
    ceiling = process_limit(2).ceiling
    assert resolve_budget(str(ceiling), threads=2) == ceiling
    with pytest.raises(LowmemError, match=f"--max-ram 2,147,483,648 bytes cannot be kept.*"
                                          f"at most {ceiling:,} bytes"):
        resolve_budget("2G", threads=2)


@linux_only
def test_the_real_address_space_limit_is_seen():
    # A child under `ulimit -v 1 GiB`: the limit it reports is the one set, and what it
    # maps is its own VmSize.
    code = ("from lowmem_cnn.memory.budget import process_limit; import psutil; "
            "limit = process_limit(1); print(limit.name, limit.limit, limit.mapped, "
            "psutil.Process().memory_info().vms)")
    out = subprocess.run(["bash", "-c", 'ulimit -v 1048576 && exec "$0" -c "$1"', sys.executable, code],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["ulimit", "-v", "(RLIMIT_AS)", str(2**30)]
    assert abs(int(out[4]) - int(out[5])) < 4 * MIB


@linux_only
def test_train_under_ulimit_v_trains_or_refuses_in_one_line(mnist_dir, tmp_path):
    # Python with NumPy maps far more than it holds; under 1 GiB of address space the
    # run must not die of a MemoryError half-way. On 2 cores it trains; with many cores
    # (a thread costs address space) it may refuse, in one line.
    result = subprocess.run(
        ["bash", "-c", 'ulimit -v 1048576 && exec "$0" -m lowmem_cnn "$@"', sys.executable,
         "train", "--limit", "300", "--epochs", "1", "--data-dir", str(mnist_dir),
         "--out", str(tmp_path / "p.pkl")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert result.returncode == 1 and len(errors) == 1, result.stderr
    else:
        assert (tmp_path / "p.pkl").exists()


@linux_only
def test_too_small_an_address_space_is_refused_in_one_line(tmp_path):
    # 244 MiB: less than Python and NumPy map (about 100 MiB) plus one thread's reserve
    result = subprocess.run(
        ["bash", "-c", 'ulimit -v 250000 && exec "$0" -m lowmem_cnn "$@"', sys.executable,
         "eval", "nothing.pkl"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: no room for this run") and result.stderr.count("\n") == 1, (
        result.stderr)


def test_peak_rss_is_at_least_the_current_rss():
    assert budget.peak_rss() >= budget.current_rss() * 0.98


@pytest.fixture
def no_proc(monkeypatch):
    monkeypatch.setattr(budget, "_proc_status_bytes", lambda field: None)


def _fake_resource(maxrss):
    return SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: SimpleNamespace(ru_maxrss=maxrss))


def test_peak_rss_units(monkeypatch, no_proc):
    monkeypatch.setitem(sys.modules, "resource", _fake_resource(70_000))
    monkeypatch.setattr(sys, "platform", "darwin")  # bytes
    assert budget.peak_rss() == 70_000
    monkeypatch.setattr(sys, "platform", "freebsd14")  # KiB
    assert budget.peak_rss() == 70_000 * 1024
    monkeypatch.setattr(sys, "platform", "linux")  # KiB, when /proc is missing
    assert budget.peak_rss() == 70_000 * 1024


def test_peak_rss_on_windows_is_the_peak_working_set(monkeypatch):
    import psutil

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` fails
    monkeypatch.setattr(sys, "platform", "win32")
    info = SimpleNamespace(peak_wset=71_303_168, rss=50_000_000)
    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: info))
    assert budget.peak_rss() == 71_303_168


@linux_only
def test_peak_rss_on_linux_is_vmhwm_with_or_without_resource(monkeypatch):
    import resource

    peak = budget.peak_rss()
    assert abs(budget._proc_status_bytes("VmHWM") - peak) < 2 * MIB
    # ru_maxrss also holds the peak of what exec'd pytest, so it is VmHWM or more, but
    # the kernel counts it approximately: seen 200 KiB below VmHWM here
    assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + 4 * MIB
    monkeypatch.setitem(sys.modules, "resource", None)
    assert abs(budget.peak_rss() - peak) < 2 * MIB


def test_map_large_arrays_is_false_without_glibc(monkeypatch):
    monkeypatch.delattr(os, "confstr", raising=False)  # Windows
    assert budget.map_large_arrays() is False


def test_map_large_arrays_is_false_without_mallopt(monkeypatch):
    import ctypes

    if not hasattr(os, "confstr"):
        pytest.skip("no os.confstr here")

    def no_library(name):
        raise OSError(f"{name}: no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert budget.map_large_arrays() is False


def test_map_large_arrays_is_false_on_another_c_library(monkeypatch):
    """musl answers no glibc version: mallopt is then not called (the C library is
    real here, so a missing check would call it and answer True)."""
    monkeypatch.setattr(os, "confstr", lambda name: None)
    assert budget.map_large_arrays() is False
