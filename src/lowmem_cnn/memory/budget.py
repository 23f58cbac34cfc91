"""The RAM budget: parsing `--max-ram`, the RAM really available, and what the process holds.

Portable: `resource` (Unix), /proc (Linux) and glibc's mallopt are used where they
exist, psutil elsewhere.
"""

import operator
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lowmem_cnn.common.errors import LowmemError

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


# --- the cgroup's memory limit --------------------------------------------------------
#
# psutil reports the machine's memory, not the cgroup's. The limit that matters sits on
# the process's own cgroup (named in /proc/self/cgroup) or on any of its ancestors, not
# necessarily at the root: JupyterHub, `systemd-run -p MemoryMax=`, CI runners and
# containers without a cgroup namespace all put it lower down. Both hierarchies are read
# where they are mounted (/proc/self/mountinfo), so a hybrid system's v1 memory
# controller is seen beside its v2 tree. Any file that cannot be read or parsed means
# "no limit from that level", never an error.

# Above this a limit means "none": v1 writes 2**63 less a page, v2 "max".
_NO_LIMIT = 2**60


@dataclass(frozen=True)
class CgroupLimit:
    """The memory limit of the cgroup level that leaves the process the least room."""

    limit: int  # bytes
    usage: int  # bytes charged to that level now (its descendants included)
    path: str  # the level's directory
    version: int  # 1 or 2

    @property
    def room(self) -> int:
        return max(self.limit - self.usage, 0)

    def explain(self) -> str:
        return f"{self.limit:,} bytes at {self.path}, {self.usage:,} of them in use"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):  # missing, no permission, a directory, not text
        return None


def _read_int(path: Path) -> int | None:
    text = (_read_text(path) or "").strip()
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(mountinfo: Path):
    """(fstype, super options, root, mount point) of each cgroup mount."""
    for line in (_read_text(mountinfo) or "").splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:  # the optional fields end with a lone "-"
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 4:
            continue
        fstype, options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype in ("cgroup", "cgroup2"):
            yield fstype, options, _unescape(fields[3]), Path(_unescape(fields[4]))


def _levels(mount_root: str, mount_point: Path, cgroup: str) -> list[Path] | None:
    """The directories of `cgroup` and its ancestors visible under a mount, leaf first;
    None if the mount does not show it.

    The mount shows the hierarchy from `mount_root` down (a container's bind-mounted
    subtree shows its own cgroup as the top); a namespace shows a cgroup beyond its
    root with "..".
    """
    parts = [p for p in cgroup.split("/") if p]
    top = [p for p in mount_root.split("/") if p]
    if ".." in parts or parts[:len(top)] != top:
        return None
    below = parts[len(top):]
    return [mount_point.joinpath(*below[:i]) for i in range(len(below), -1, -1)]


def _tightest(levels, limit_file: str, usage_file: str, version: int) -> CgroupLimit | None:
    """The level with the least room. Every level's usage counts its descendants, so the
    room left is the smallest of limit minus usage: an ancestor with a higher limit can
    leave less room than the lowest limit when its other children use much."""
    found = None
    for level in levels:
        limit = _read_int(level / limit_file)
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(level / usage_file) or 0  # unreadable usage: the limit is still real
        candidate = CgroupLimit(limit, usage, str(level), version)
        if found is None or candidate.room < found.room:
            found = candidate
    return found


def _v1_hierarchical(leaf: Path) -> CgroupLimit | None:
    """v1's lowest limit of the cgroup and its ancestors, memory.stat's
    hierarchical_memory_limit, which also sees ancestors above a bind-mounted subtree.
    Their usage is out of sight; the cgroup's own is a lower bound of it."""
    for line in (_read_text(leaf / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "hierarchical_memory_limit" and value.strip().isdigit():
            limit = int(value)
            if limit >= _NO_LIMIT:
                return None
            usage = _read_int(leaf / "memory.usage_in_bytes") or 0
            return CgroupLimit(limit, usage, f"{leaf} with its ancestors", 1)
    return None


def cgroup_limit(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                 mountinfo: str | os.PathLike = "/proc/self/mountinfo") -> CgroupLimit | None:
    """The memory limit of the process's cgroup or an ancestor, cgroup v2 or v1, that
    leaves the least room; None where no level sets one (or not on Linux)."""
    paths = {}  # "v2" or "memory": the process's cgroup in that hierarchy
    for line in (_read_text(Path(proc_cgroup)) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3 or not fields[2].startswith("/"):
            continue
        if fields[0] == "0" and fields[1] == "":
            paths.setdefault("v2", fields[2])
        elif "memory" in fields[1].split(","):
            paths.setdefault("memory", fields[2])
    chosen, shown = {}, set()  # kind: the levels to read; kinds whose cgroup a mount shows
    for fstype, options, root, point in _cgroup_mounts(Path(mountinfo)):
        kind = "v2" if fstype == "cgroup2" else "memory" if "memory" in options else None
        if kind not in paths or kind in shown:
            continue
        # A hierarchy may be mounted more than once: the first mount that shows the
        # cgroup counts. If none does, the top of the first is the nearest level in
        # sight (in a container, the container's own cgroup).
        levels = _levels(root, point, paths[kind])
        if levels is not None and levels[0].is_dir():
            chosen[kind] = levels
            shown.add(kind)
        else:
            chosen.setdefault(kind, [point])
    found = []
    for kind, levels in chosen.items():
        if kind == "v2":
            found.append(_tightest(levels, "memory.max", "memory.current", 2))
        else:
            # ancestors' limits bind only in a hierarchical v1 tree (always, since Linux 5.11)
            if _read_int(levels[0] / "memory.use_hierarchy") == 0:
                levels = levels[:1]
            found += [_tightest(levels, "memory.limit_in_bytes", "memory.usage_in_bytes", 1),
                      _v1_hierarchical(levels[0])]
    found = [limit for limit in found if limit is not None]
    return min(found, key=lambda limit: limit.room, default=None)


def cgroup_room(proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
                mountinfo: str | os.PathLike = "/proc/self/mountinfo") -> int | None:
    """Bytes the process's cgroup still allows (limit minus usage), or None without a limit."""
    limit = cgroup_limit(proc_cgroup, mountinfo)
    return None if limit is None else limit.room


# --- RAM and resident memory ------------------------------------------------------


def _available_and_cgroup() -> tuple[int, CgroupLimit | None]:
    """The RAM available now, and the cgroup limit when its room is less."""
    import psutil

    available = psutil.virtual_memory().available
    group = cgroup_limit()
    if group is not None and group.room < available:
        return group.room, group
    return available, None


def available_memory() -> int:
    """RAM this process could take now: the OS's figure, capped by the cgroup's room."""
    return _available_and_cgroup()[0]


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


# --- threads ------------------------------------------------------------------------


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads, name: str = "--threads", advice: str = "give at most {cores}") -> int:
    """`threads` when it is a count of threads the machine's cores can run, else a
    one-line LowmemError naming the cores. Called before the network is made: each
    thread gets a workspace and a set of gradients, so a count beyond the cores gains
    nothing and costs memory before any plan can refuse it (measured: `--threads 1000`
    reached 1.7 GB under `--max-ram 256M`, `--threads 10**12` 24 GB)."""
    try:
        count = None if isinstance(threads, bool) else operator.index(threads)
    except TypeError:
        count = None
    named = name if name.endswith("=") else name + " "  # threads=3, --threads 3
    if count is None or count < 1:
        raise LowmemError(f"{named}{threads!r}: give a whole number of threads, 1 or more")
    threads = count
    cores = usable_cores()
    if threads > cores:
        raise LowmemError(f"{named}{threads:,}: more threads than the {cores} CPU core"
                          f"{'s' if cores > 1 else ''} this process may use; "
                          + advice.format(cores=cores))
    return threads


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
    """The budget without --max-ram and what set it, e.g. 'half of the available RAM' or
    'half of the available RAM, capped by the cgroup (1.0 GiB limit, 980.2 MiB free)'.

    The share applies to the RAM, which other processes need too; the room under the
    process's own limits is the process's alone, so all of it may be used.
    """
    share = ("half" if DEFAULT_SHARE_OF_AVAILABLE == 0.5
             else f"{DEFAULT_SHARE_OF_AVAILABLE:.0%}")
    available, group = _available_and_cgroup()
    budget, source = int(available * DEFAULT_SHARE_OF_AVAILABLE), f"{share} of the available RAM"
    if group is not None:  # the cgroup's room is shared with its other processes: the share too
        source += (f", capped by the cgroup ({format_size(group.limit)} limit, "
                   f"{format_size(group.room)} free)")
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
    limits (ulimit -v, -d) would break with a MemoryError half-way, or that its cgroup's
    memory limit would break with the OOM killer, is refused."""
    if max_ram is None:
        return default_budget(threads)
    try:
        budget = parse_size(max_ram)
    except ValueError as err:
        raise LowmemError(str(err)) from None
    ceilings = []  # (the largest resident set allowed, what allows it)
    limit = process_limit(threads)
    if limit is not None:
        ceilings.append((limit.ceiling, f"the process's limits: {limit.explain()}"))
    group = cgroup_limit()
    if group is not None:
        # what the process holds is in the cgroup's usage already, so its resident set
        # may grow to that plus the room (never past the limit, should it be charged elsewhere)
        ceiling = min(current_rss() + group.room, group.limit)
        ceilings.append((ceiling, f"the cgroup's memory limit: {group.explain()}"))
    # the tightest first, so that the most named is a --max-ram that is accepted
    for ceiling, what in sorted(ceilings, key=lambda found: found[0]):
        if budget > ceiling:
            most = max(ceiling, 0)
            raise LowmemError(f"--max-ram {budget:,} bytes cannot be kept under {what}, which "
                              f"leaves room for at most {most:,} bytes ({format_size(most)}) "
                              "of resident memory")
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
