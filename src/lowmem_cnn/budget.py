"""The RAM budget: parsing `--max-ram`, the RAM really available, and what the process holds."""

import ctypes
import os
import re
import resource
from pathlib import Path

from lowmem_cnn.errors import LowmemError

# Without --max-ram the run may use this share of the RAM that is available now.
DEFAULT_SHARE_OF_AVAILABLE = 0.5

_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "ib"] = 1024**_power
    _UNITS[_letter + "b"] = 1000**_power

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from '512M', '1.5GiB', '2GB', '800MB' or '1048576'.

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000.
    """
    match = _SIZE.match(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: use bytes or a number with K, M, G, T (powers of 1024), "
            "KiB..TiB (the same) or KB..TB (powers of 1000), e.g. 512M, 2G, 1.5GiB"
        )
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def format_size(n: float) -> str:
    """'127.5 MiB': powers of 1024, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_room() -> int | None:
    """Bytes the cgroup still allows (limit minus usage), or None without a limit.

    psutil reports the machine's memory, not the container's, so read the cgroup ourselves.
    """
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(Path(limit_file))
        # cgroup v1 writes a huge number (about 2**63) for "no limit"
        if limit is not None and limit < 2**60:
            usage = _read_int(Path(usage_file)) or 0
            return max(limit - usage, 0)
    return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# On Linux the figures come from /proc; psutil, which would cost 1.75 MiB of resident
# memory to import (measured), is the fallback elsewhere.

def available_memory() -> int:
    """RAM this process could take now: the OS's figure, capped by the cgroup's room."""
    available = _meminfo_available()
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    room = cgroup_room()
    return available if room is None else min(available, room)


def default_budget() -> int:
    return int(available_memory() * DEFAULT_SHARE_OF_AVAILABLE)


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, as the OS counts it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_budget(max_ram: str | None) -> int:
    if max_ram is None:
        return default_budget()
    try:
        return parse_size(max_ram)
    except ValueError as err:
        raise LowmemError(str(err)) from None


def map_large_arrays() -> bool:
    """Make glibc give every block of 256 KiB or more its own mapping, returned to the
    OS when freed, so that the resident memory is what the live arrays hold: what the
    planner counts. Call it before anything is allocated.

    By default glibc raises that threshold as large blocks are freed and then serves
    them from heaps that keep freed memory; measured against plans, peaks then came
    within 0.15 MiB of a 64M budget (and 6.5 MiB over plan when the freed memory was
    kept on purpose). The price is speed: every large array is faulted in afresh
    (one training epoch 7.5 s with kept memory, 10.5 s with this).
    Returns False where the C library is not glibc (nothing changes there).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 256 << 10))
