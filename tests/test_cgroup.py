"""The cgroup memory limit of the process's own cgroup, v1 and v2: fake trees, then a
real cgroup where the machine lets the test make one (issue 22)."""

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from idx_files import write_dataset

import lowmem_cnn
from lowmem_cnn.memory import budget
from lowmem_cnn.memory.budget import CgroupLimit, cgroup_limit, cgroup_room, resolve_budget
from lowmem_cnn.common.errors import LowmemError

MIB, GIB = 2**20, 2**30
V1_NO_LIMIT = "9223372036854771712"  # 2**63 less a 4 KiB page


class FakeSystem:
    """A fake /proc/self/cgroup, /proc/self/mountinfo and cgroup trees under tmp_path."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.proc_cgroup = tmp_path / "proc_cgroup"
        self.mountinfo = tmp_path / "mountinfo"
        self.proc_cgroup.write_text("")
        self.mountinfo.write_text("")

    def member_of(self, *lines):
        self.proc_cgroup.write_text("".join(line + "\n" for line in lines))

    def mount(self, fstype, name, root="/", options=None):
        point = self.tmp / name
        point.mkdir(parents=True, exist_ok=True)
        options = options or ("rw" if fstype == "cgroup2" else "rw,memory")
        mount_id = 30 + len(self.mountinfo.read_text().splitlines())
        escaped = str(point).replace(" ", "\\040")
        with self.mountinfo.open("a") as lines:
            lines.write(f"{mount_id} 23 0:{mount_id} {root} {escaped} rw,nosuid,nodev,noexec,relatime "
                        f"shared:{mount_id} - {fstype} cgroup {options}\n")
        return point

    def files(self, directory, **files):
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name.replace("_", ".", 1)).write_text(text + "\n")
        return directory

    def limit(self):
        return cgroup_limit(self.proc_cgroup, self.mountinfo)


@pytest.fixture
def fake(tmp_path):
    return FakeSystem(tmp_path)


# --- cgroup v2 -------------------------------------------------------------------------


def test_v2_limit_on_the_process_cgroup_not_the_root(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/user.slice/job.scope")
    fake.files(top / "user.slice", memory_max="max", memory_current=str(3 * GIB))
    leaf = fake.files(top / "user.slice" / "job.scope", memory_max=str(GIB),
                      memory_current=str(100 * MIB))
    assert fake.limit() == CgroupLimit(GIB, 100 * MIB, str(leaf), 2)
    assert cgroup_room(fake.proc_cgroup, fake.mountinfo) == GIB - 100 * MIB


def test_v2_ancestor_lower_than_the_leaf_sets_the_limit(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/hub/user/kernel")
    parent = fake.files(top / "hub" / "user", memory_max=str(512 * MIB), memory_current=str(300 * MIB))
    fake.files(top / "hub" / "user" / "kernel", memory_max=str(GIB), memory_current=str(100 * MIB))
    assert fake.limit() == CgroupLimit(512 * MIB, 300 * MIB, str(parent), 2)


def test_v2_room_is_the_least_of_all_levels_not_the_lowest_limit(fake):
    # The parent's limit is higher, but its other children leave less room under it
    # than the leaf's own limit does: allocating charges both levels.
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/ci/job")
    parent = fake.files(top / "ci", memory_max=str(2 * GIB), memory_current=str(2 * GIB - 50 * MIB))
    fake.files(top / "ci" / "job", memory_max=str(GIB), memory_current=str(100 * MIB))
    limit = fake.limit()
    assert (limit.path, limit.room) == (str(parent), 50 * MIB)


def test_v2_over_the_limit_is_no_room(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a")
    fake.files(top / "a", memory_max="1000", memory_current="5000")
    assert fake.limit().room == 0


# --- cgroup v1 -------------------------------------------------------------------------


def test_v1_memory_controller_path(fake):
    fake.mount("cgroup", "cpu", options="rw,cpu,cpuacct")
    top = fake.mount("cgroup", "memory")
    fake.member_of("5:cpu,cpuacct:/", "4:memory:/jupyter/alice", "1:name=systemd:/", "0::/")
    fake.files(top, memory_limit_in_bytes=V1_NO_LIMIT, memory_usage_in_bytes=str(9 * GIB))
    leaf = fake.files(top / "jupyter" / "alice", memory_limit_in_bytes=str(4 * GIB),
                      memory_usage_in_bytes=str(GIB),
                      memory_stat=f"cache 0\nrss 1\nhierarchical_memory_limit {4 * GIB}\n")
    assert fake.limit() == CgroupLimit(4 * GIB, GIB, str(leaf), 1)


def test_v1_ancestor_lower_than_the_leaf(fake):
    top = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/jupyter/alice")
    parent = fake.files(top / "jupyter", memory_limit_in_bytes=str(GIB),
                        memory_usage_in_bytes=str(900 * MIB))
    fake.files(top / "jupyter" / "alice", memory_limit_in_bytes=V1_NO_LIMIT,
               memory_usage_in_bytes=str(200 * MIB), memory_stat=f"hierarchical_memory_limit {GIB}")
    assert fake.limit() == CgroupLimit(GIB, 900 * MIB, str(parent), 1)


def test_v1_hierarchical_limit_sees_ancestors_out_of_sight(fake):
    # A container without a cgroup namespace: its own cgroup is bind-mounted as the top,
    # the host's limit on /docker is above it, seen only through memory.stat.
    top = fake.mount("cgroup", "memory", root="/docker/abc")
    fake.member_of("4:memory:/docker/abc")
    fake.files(top, memory_limit_in_bytes=V1_NO_LIMIT, memory_usage_in_bytes=str(200 * MIB),
               memory_stat=f"rss 1\nhierarchical_memory_limit {GIB}\nhierarchical_memsw_limit 1")
    limit = fake.limit()
    assert (limit.limit, limit.usage, limit.room) == (GIB, 200 * MIB, GIB - 200 * MIB)
    assert limit.path == f"{top} with its ancestors"


def test_v1_without_hierarchy_ancestors_do_not_bind(fake):
    top = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/a/b")
    fake.files(top / "a", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes="0")
    leaf = fake.files(top / "a" / "b", memory_limit_in_bytes=str(4 * GIB),
                      memory_usage_in_bytes=str(MIB), memory_use_hierarchy="0")
    assert fake.limit() == CgroupLimit(4 * GIB, MIB, str(leaf), 1)


def test_hybrid_v1_memory_beside_a_v2_tree_without_it(fake):
    # this machine's layout: systemd's v2 tree without the memory controller, v1 memory
    fake.mount("cgroup2", "unified")
    top = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/process_api/x", "0::/")
    leaf = fake.files(top / "process_api" / "x", memory_limit_in_bytes=str(GIB),
                      memory_usage_in_bytes=str(MIB))
    assert fake.limit() == CgroupLimit(GIB, MIB, str(leaf), 1)


def test_both_hierarchies_limited_the_least_room_wins(fake):
    v2 = fake.mount("cgroup2", "unified")
    v1 = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/a", "0::/b")
    fake.files(v1 / "a", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes="0")
    fake.files(v2 / "b", memory_max=str(2 * GIB), memory_current=str(GIB + MIB))
    assert fake.limit().room == GIB - MIB and fake.limit().version == 2


# --- no limit, or nothing to read: never a crash ------------------------------------


@pytest.mark.parametrize("v2_max, v1_limit", [
    ("max", V1_NO_LIMIT),
    ("max", "9223372036854710272"),  # v1's "no limit" with 64 KiB pages
    (str(2**62), str(2**62)),
])
def test_unlimited_is_no_limit(fake, v2_max, v1_limit):
    v2 = fake.mount("cgroup2", "unified")
    v1 = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/a", "0::/b")
    fake.files(v2 / "b", memory_max=v2_max, memory_current=str(GIB))
    fake.files(v1 / "a", memory_limit_in_bytes=v1_limit, memory_usage_in_bytes=str(GIB),
               memory_stat=f"hierarchical_memory_limit {v1_limit}")
    assert fake.limit() is None
    assert cgroup_room(fake.proc_cgroup, fake.mountinfo) is None


@pytest.mark.parametrize("garbage", ["", "12abc", "-1", "1.5G", "max max", "\xff\xfe"])
def test_garbage_in_a_level_is_no_limit_from_it(fake, garbage):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a/b")
    parent = fake.files(top / "a", memory_max=str(GIB), memory_current="0")
    fake.files(top / "a" / "b", memory_max="1", memory_current="0")
    (top / "a" / "b" / "memory.max").write_text(garbage)
    assert fake.limit() == CgroupLimit(GIB, 0, str(parent), 2)


def test_binary_garbage_is_no_limit(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a")
    (top / "a").mkdir()
    (top / "a" / "memory.max").write_bytes(b"\xff\xfe\x00\x80")
    assert fake.limit() is None


def test_a_directory_where_the_limit_should_be_is_no_limit(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a/b")
    parent = fake.files(top / "a", memory_max=str(GIB), memory_current="0")
    (top / "a" / "b" / "memory.max").mkdir(parents=True)  # reading it fails (also as root)
    assert fake.limit() == CgroupLimit(GIB, 0, str(parent), 2)


def test_a_file_without_permission_is_no_limit(fake, monkeypatch):
    # chmod 000 does not stop root: refuse the read itself
    top = fake.mount("cgroup", "memory")
    fake.member_of("4:memory:/a/b")
    parent = fake.files(top / "a", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes="0")
    leaf = fake.files(top / "a" / "b", memory_limit_in_bytes=str(100 * MIB),
                      memory_usage_in_bytes="0", memory_stat=f"hierarchical_memory_limit {100 * MIB}")
    read_text = Path.read_text

    def no_permission(path, *args, **kwargs):
        if Path(path).parent == leaf and Path(path).name != "memory.usage_in_bytes":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_permission)
    assert fake.limit() == CgroupLimit(GIB, 0, str(parent), 1)


def test_unreadable_usage_leaves_the_limit(fake):
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a")
    fake.files(top / "a", memory_max=str(GIB))
    (top / "a" / "memory.current").mkdir()
    assert fake.limit().room == GIB


def test_missing_memory_controller_is_no_limit(fake):
    # v2 with memory not enabled for the cgroup (no memory.* files), and no v1 memory
    # mount although /proc/self/cgroup names the controller
    top = fake.mount("cgroup2", "cg")
    fake.mount("cgroup", "cpu", options="rw,cpu")
    fake.member_of("4:memory:/a", "3:cpu:/a", "0::/a/b")
    (top / "a" / "b").mkdir(parents=True)
    fake.files(fake.tmp / "cpu" / "a", memory_limit_in_bytes="1")  # not a memory hierarchy
    assert fake.limit() is None


@pytest.mark.parametrize("proc_cgroup, mountinfo", [
    (None, None),  # not Linux: neither file exists
    ("0::/a\n", "garbage\n\n1 2 3\n- - -\n"),
    ("nonsense\n:::\n0::relative\n", None),
    ("\xff\n", "\xff\n"),
])
def test_missing_or_garbled_proc_files_are_no_limit(tmp_path, proc_cgroup, mountinfo):
    paths = []
    for name, text in (("cgroup", proc_cgroup), ("mountinfo", mountinfo)):
        if text is not None:
            (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    assert cgroup_limit(*paths) is None


def test_a_cgroup_the_mountinfo_does_not_mount_is_no_limit(fake):
    fake.member_of("0::/a")
    fake.files(fake.tmp / "cg" / "a", memory_max=str(GIB))  # there, but not mounted
    assert fake.limit() is None


# --- namespaces and bind mounts: where the process's cgroup is seen -----------------


def test_cgroup_namespace_reads_the_top(fake):
    # in its own cgroup namespace the process is at "/" and the mount's top is its cgroup
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/")
    fake.files(top, memory_max=str(GIB), memory_current=str(MIB))
    fake.files(top / "child", memory_max="1")  # a sibling's limit is not the process's
    assert fake.limit() == CgroupLimit(GIB, MIB, str(top), 2)


def test_bind_mounted_subtree_maps_the_path_below_the_mount_root(fake):
    top = fake.mount("cgroup2", "cg", root="/kubepods/pod1/ctr")
    fake.member_of("0::/kubepods/pod1/ctr/job")
    leaf = fake.files(top / "job", memory_max=str(GIB), memory_current="0")
    # a reader that joined the whole path to the mount point would read this one
    fake.files(top / "kubepods" / "pod1" / "ctr" / "job", memory_max="1", memory_current="0")
    assert fake.limit() == CgroupLimit(GIB, 0, str(leaf), 2)


def test_a_cgroup_outside_the_mount_reads_the_mounts_top(fake):
    # a namespace shows a cgroup beyond its root with ".."; the top is the nearest level
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/../../elsewhere")
    fake.files(top, memory_max=str(GIB), memory_current="0")
    fake.files(fake.tmp / "elsewhere", memory_max="1")
    assert fake.limit() == CgroupLimit(GIB, 0, str(top), 2)


def test_the_mount_that_shows_the_cgroup_is_used(fake):
    other = fake.mount("cgroup2", "other", root="/somewhere/else")
    top = fake.mount("cgroup2", "cg")
    fake.member_of("0::/a")
    fake.files(other, memory_max="1")
    leaf = fake.files(top / "a", memory_max=str(GIB), memory_current="0")
    assert fake.limit() == CgroupLimit(GIB, 0, str(leaf), 2)


def test_mount_points_with_spaces(fake):
    top = fake.mount("cgroup2", "my cgroups")
    fake.member_of("0::/a")
    leaf = fake.files(top / "a", memory_max=str(GIB), memory_current="0")
    assert "\\040" in fake.mountinfo.read_text()
    assert fake.limit() == CgroupLimit(GIB, 0, str(leaf), 2)


# --- the budget -----------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """8 GiB of RAM available, 100 MiB resident, no rlimit; the cgroup as a test sets it."""
    import psutil

    fake = SimpleNamespace(cgroup=None)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * GIB))
    monkeypatch.setattr(budget, "cgroup_limit", lambda: fake.cgroup)
    monkeypatch.setattr(budget, "current_rss", lambda: 100 * MIB)
    monkeypatch.setattr(budget, "process_limit", lambda threads=None: None)
    return fake


def test_default_budget_says_the_cgroup_capped_it(machine):
    machine.cgroup = CgroupLimit(GIB, 24 * MIB, "/sys/fs/cgroup/job", 2)
    assert budget.explain_default_budget() == (
        500 * MIB, "half of the available RAM, capped by the cgroup (1.0 GiB limit, 1000.0 MiB free)")
    assert resolve_budget(None) == 500 * MIB
    machine.cgroup = CgroupLimit(64 * GIB, 0, "/sys/fs/cgroup/job", 2)  # more than the RAM
    assert budget.explain_default_budget() == (4 * GIB, "half of the available RAM")


def test_max_ram_above_the_cgroups_room_is_refused(machine):
    # 300 MiB in use, 100 MiB of it this process's: its resident set may reach 824 MiB
    machine.cgroup = CgroupLimit(GIB, 300 * MIB, "/sys/fs/cgroup/memory/job", 1)
    most = 824 * MIB
    assert resolve_budget(str(most)) == most
    with pytest.raises(LowmemError) as refused:
        resolve_budget(str(most + 1))
    message = str(refused.value)
    assert message == (
        f"--max-ram {most + 1:,} bytes cannot be kept under the cgroup's memory limit: "
        f"1,073,741,824 bytes at /sys/fs/cgroup/memory/job, 314,572,800 of them in use, which leaves "
        f"room for at most {most:,} bytes (824.0 MiB) of resident memory")


def test_the_tighter_of_cgroup_and_ulimit_is_named(machine, monkeypatch):
    machine.cgroup = CgroupLimit(GIB, 300 * MIB, "/cg", 1)  # 824 MiB
    ulimit = budget.ProcessLimit("ulimit -v (RLIMIT_AS)", GIB, 100 * MIB, 300 * MIB, 100 * MIB)
    monkeypatch.setattr(budget, "process_limit", lambda threads=None: ulimit)  # 724 MiB
    with pytest.raises(LowmemError, match=f"ulimit -v.*at most {724 * MIB:,} bytes"):
        resolve_budget("2G")
    machine.cgroup = CgroupLimit(GIB, 900 * MIB, "/cg", 1)  # 224 MiB
    with pytest.raises(LowmemError, match=f"cgroup's memory limit.*at most {224 * MIB:,} bytes"):
        resolve_budget("2G")


def test_no_cgroup_limit_leaves_max_ram_alone(machine):
    assert resolve_budget("64G") == 64 * GIB


# --- a real cgroup ----------------------------------------------------------------------


def _own_cgroup(kind):
    """The directory of this process's cgroup in the v2 tree ("v2") or v1 memory
    hierarchy ("memory"), and the mount's top, read here without the code under test."""
    path = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, cgroup = line.split(":", 2)
        if (kind == "v2" and number == "0") or (kind == "memory" and "memory" in controllers.split(",")):
            path = cgroup
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        after = fields[fields.index("-") + 1:]
        wanted = after[0] == "cgroup2" if kind == "v2" else (
            after[0] == "cgroup" and "memory" in after[2].split(","))
        if path is not None and wanted:
            root, point = fields[3], Path(fields[4])
            below = os.path.relpath(path, root)
            if not below.startswith(".."):
                return point / below, point
    return None, None


@pytest.fixture
def memory_cgroup():
    """A fresh cgroup limited to 1 GiB (its cgroup.procs file), or a skip saying why not.
    Made below this process's own cgroup where it can be, so the test stays inside it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cgroups are Linux's")
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    name = f"lowmem-cnn-test-{uuid.uuid4().hex[:12]}"
    made = None
    leaf, _ = _own_cgroup("memory")
    if leaf is not None and (leaf / "memory.limit_in_bytes").exists():  # v1: any cgroup can have children
        made, limit_file = leaf / name, "memory.limit_in_bytes"
    else:
        leaf, top = _own_cgroup("v2")
        for parent in filter(None, (leaf, top)):
            # v2 gives a child the memory controller only where the parent enables it
            control = parent / "cgroup.subtree_control"
            if control.exists() and "memory" in control.read_text().split():
                made, limit_file = parent / name, "memory.max"
                break
    if made is None:
        pytest.skip("no memory cgroup controller this process may give a child cgroup "
                    "(neither v1 memory nor v2 with memory in cgroup.subtree_control)")
    try:
        made.mkdir()
    except OSError as err:
        pytest.skip(f"cannot make a cgroup at {made}: {err}")
    try:
        (made / limit_file).write_text(str(GIB))
    except OSError as err:
        made.rmdir()
        pytest.skip(f"cannot limit the cgroup at {made}: {err}")
    try:
        yield made / "cgroup.procs"
    finally:
        made.rmdir()  # the children have exited: the cgroup is empty


# The child joins the cgroup before it runs anything, then becomes the command: what it
# plans, it plans inside the cgroup.
_JOIN = """
import os, sys
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _run_in(procs, *args, cwd):
    return subprocess.run([sys.executable, "-c", _JOIN, str(procs), "-m", "lowmem_cnn", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def _one_error_line(result):
    assert result.returncode == 1, (result.returncode, result.stderr)  # not -9: not killed
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_a_run_in_a_1gib_cgroup_keeps_to_it(memory_cgroup, tmp_path):
    write_dataset(tmp_path / "data", n_train=200, n_test=50)
    common = ["--limit", "200", "--epochs", "1", "--data-dir", str(tmp_path / "data"), "--json"]

    result = _run_in(memory_cgroup, "train", *common, "--out", str(tmp_path / "p.pkl"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("budget: "))
    printed = int(re.match(r"budget: ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert printed <= GIB // 2, line  # half of at most 1 GiB of room
    assert "capped by the cgroup (1.0 GiB limit, " in line, line

    # A network of 2.6 GiB: refused in one line, not killed by the OOM killer. Half of a
    # machine's RAM would take it (here, reading only the root cgroup planned it into
    # an 11 GiB budget and the run died of SIGKILL, status 137).
    config = tmp_path / "big.toml"
    config.write_text(re.sub(r"units = 100\b", "units = 40000", (
        Path(lowmem_cnn.__file__).parent / "configs" / "simple_convnet.toml").read_text()))
    assert "units = 40000" in config.read_text()
    result = _run_in(memory_cgroup, "train", *common, "--config", str(config),
                     "--out", str(tmp_path / "q.pkl"), cwd=tmp_path)
    _one_error_line(result)

    # --max-ram above what the cgroup allows: refused, naming the most that fits
    result = _run_in(memory_cgroup, "train", *common, "--max-ram", "2G", "--out", str(tmp_path / "r.pkl"),
                     cwd=tmp_path)
    error = _one_error_line(result)
    assert "cgroup's memory limit: 1,073,741,824 bytes" in error, error
    most = int(re.search(r"at most ([\d,]+) bytes", error).group(1).replace(",", ""))
    assert 0 < most <= GIB
