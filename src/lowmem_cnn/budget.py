"""The RAM budget: parsing `--max-ram`, the RAM really available, and what the process holds.

Portable: `resource` (Unix), /proc (Linux) and glibc's mallopt are used where they
exist, psutil elsewhere.
"""

import os
import re
import sys
from dataclasses import dataclass
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


# --- RAM and resident memory ------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_room(root: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Bytes the cgroup still allows (limit minus usage), or None without a limit.

    psutil reports the machine's memory, not the container's, so read the cgroup ourselves.
    """
    root = Path(root)
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        limit = _read_int(root / limit_file)
        # cgroup v1 writes a huge number (about 2**63) for "no limit"
        if limit is not None and limit < 2**60:
            usage = _read_int(root / usage_file) or 0
            return max(limit - usage, 0)
    return None


def available_memory() -> int:
    """RAM this process could take now: the OS's figure, capped by the cgroup's room."""
    import psutil

    available = psutil.virtual_memory().available
    room = cgroup_room()
    return available if room is None else min(available, room)


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _proc_status_bytes(field: str) -> int | None:
    """A 'kB' field of /proc/self/status (Linux), in bytes."""
    try:
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size of this process so far, as the OS counts it."""
    if sys.platform.startswith("linux"):
        # VmHWM: the peak of this program's memory. ru_maxrss also holds the peak of the
        # program this process was before exec: measured, `python -c` started with
        # subprocess by a process holding 125 MiB reported 125 MiB, its VmHWM 8.5 MiB.
        peak = _proc_status_bytes("VmHWM")
        if peak is not None:
            return peak
    try:
        import resource
    except ImportError:  # Windows
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # macOS counts ru_maxrss in bytes, Linux and the BSDs in KiB
        return peak if sys.platform == "darwin" else peak * 1024
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset
    return current_rss()  # no peak anywhere: the current RSS, a lower bound


# --- the process's own limits: ulimit -v (RLIMIT_AS) and ulimit -d (RLIMIT_DATA) -----
#
# These limit mappings, not resident memory: RLIMIT_AS the whole address space
# (VmSize), RLIMIT_DATA its private writable part (VmData). What --max-ram promises is
# resident memory, so the "room" under such a limit is counted this way: from now on
# memory can only become resident in what the run maps from now on (its arrays are
# fresh mappings, see map_large_arrays), so the resident set can grow at most by the
# limit minus what is mapped now, less what the run maps and never touches. That last
# part is almost all thread machinery. Measured here (Linux, glibc 2.36, NumPy's
# OpenBLAS), from the budget to the end of a 500-image `train`, the address space grew
# more than the resident memory by 153 MiB with --threads 1, 217 MiB with 2, 413 MiB
# with 4; with less room, the same 2-thread run failed or not from one try to the next
# (a MemoryError in NumPy, or OpenBLAS giving up). The reserve counts, as worst cases:
#  - each thread besides the main one (the --threads - 1 workers and the batch reader):
#    its stack, and a glibc malloc arena, 64 MiB of address space held unreadable, and
#    128 MiB for a moment while glibc aligns it. Not writable: not under RLIMIT_DATA.
#  - each thread that multiplies matrices, and one more: OpenBLAS's 32 MiB buffer.
# The model is Linux's (glibc and its accounting); elsewhere the limits are left alone.
ARENA_ADDRESS_SPACE = 128 * 2**20
BLAS_BUFFER = 32 * 2**20
DEFAULT_THREAD_STACK = 8 * 2**20  # with RLIMIT_STACK unlimited; glibc's own default is smaller


@dataclass(frozen=True)
class ProcessLimit:
    """An address-space limit of this process and the resident memory it leaves room for."""

    name: str  # e.g. "ulimit -v (RLIMIT_AS)"
    limit: int  # bytes
    mapped: int  # bytes under the limit now
    reserve: int  # bytes the run will map without making them resident
    rss: int  # resident bytes now
    reserved_for: str = "stacks, malloc arenas, BLAS buffers"

    @property
    def ceiling(self) -> int:
        """The largest resident set the process can reach under the limit."""
        return self.rss + self.limit - self.mapped - self.reserve

    def explain(self) -> str:
        return (f"{self.name} is {self.limit:,} bytes; the process maps {format_size(self.mapped)} "
                f"already, and its threads will map about {format_size(self.reserve)} more "
                f"({self.reserved_for})")


def _thread_stack_bytes(resource) -> int:
    import threading

    if threading.stack_size():
        return threading.stack_size()
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)  # glibc's default thread stack
    return soft if 0 < soft != resource.RLIM_INFINITY else DEFAULT_THREAD_STACK


def process_limit(threads: int | None = None) -> ProcessLimit | None:
    """The tighter of RLIMIT_AS and RLIMIT_DATA for a run of `threads` threads (default:
    one per core), or None where neither is set (or not on Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import resource
    except ImportError:
        return None
    limits = []
    for name, flag, address_space in (("RLIMIT_AS", "-v", True), ("RLIMIT_DATA", "-d", False)):
        kind = getattr(resource, name, None)
        soft = resource.getrlimit(kind)[0] if kind is not None else resource.RLIM_INFINITY
        if soft != resource.RLIM_INFINITY and soft >= 0:
            limits.append((name, flag, address_space, soft))
    if not limits:
        return None
    import psutil

    from lowmem_cnn import default_threads

    threads = threads or default_threads()
    memory = psutil.Process().memory_info()
    stack = _thread_stack_bytes(resource)
    tightest = None
    for name, flag, address_space, soft in limits:
        reserve = threads * stack + (threads + 1) * BLAS_BUFFER
        if address_space:
            reserve += threads * ARENA_ADDRESS_SPACE
        # psutil's data is VmData plus the main stack: a little more than RLIMIT_DATA counts
        limit = ProcessLimit(f"ulimit {flag} ({name})", soft,
                             memory.vms if address_space else memory.data, reserve, memory.rss,
                             "stacks, malloc arenas, BLAS buffers" if address_space
                             else "stacks, BLAS buffers")
        if tightest is None or limit.ceiling < tightest.ceiling:
            tightest = limit
    return tightest


# --- the budget ---------------------------------------------------------------------


def explain_default_budget(threads: int | None = None) -> tuple[int, str]:
    """The budget without --max-ram and what set it, e.g. 'half of the available RAM'.

    The share applies to the RAM, which other processes need too; the room under the
    process's own limits is the process's alone, so all of it may be used.
    """
    share = ("half" if DEFAULT_SHARE_OF_AVAILABLE == 0.5
             else f"{DEFAULT_SHARE_OF_AVAILABLE:.0%}")
    budget, source = int(available_memory() * DEFAULT_SHARE_OF_AVAILABLE), f"{share} of the available RAM"
    limit = process_limit(threads)
    if limit is not None and limit.ceiling < budget:
        if limit.ceiling <= limit.rss:
            raise LowmemError(f"no room for this run under the process's limits: {limit.explain()}; "
                              "raise the limit or use fewer --threads")
        budget, source = limit.ceiling, f"the room under {limit.name}"
    return budget, source


def default_budget(threads: int | None = None) -> int:
    return explain_default_budget(threads)[0]


def resolve_budget(max_ram: str | None, threads: int | None = None) -> int:
    """The budget in bytes: --max-ram, or the default. A --max-ram that the process's
    limits (ulimit -v, -d) would break with a MemoryError half-way is refused."""
    if max_ram is None:
        return default_budget(threads)
    try:
        budget = parse_size(max_ram)
    except ValueError as err:
        raise LowmemError(str(err)) from None
    limit = process_limit(threads)
    if limit is not None and budget > limit.ceiling:
        most = max(limit.ceiling, 0)
        raise LowmemError(f"--max-ram {budget:,} bytes cannot be kept under the process's limits: "
                          f"{limit.explain()}, which leaves room for at most {most:,} bytes "
                          f"({format_size(most)}) of resident memory")
    return budget


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
    try:  # glibc answers this; musl, macOS and Windows do not
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):
        return False
    import ctypes

    try:  # Python is linked against the C library: mallopt is among the loaded symbols
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 256 << 10))
