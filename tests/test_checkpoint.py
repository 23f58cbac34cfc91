"""Crash-safe training: checkpoints, resume after SIGKILL/SIGINT/SIGTERM, damaged files."""

import errno
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from idx_files import write_dataset

from lowmem_cnn.files.checkpoint import read_checkpoint, write_checkpoint
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.locks import lock_path

# 1,000 real images, batches of 50: 20 updates an epoch, a checkpoint every 3.
ARGS = ["train", "--limit", "1000", "--epochs", "2", "--batch-size", "50", "--checkpoint-every", "3",
        "--max-ram", "256M", "--json"]
CRASH_CHILD = Path(__file__).with_name("crash_child.py")


def start(*args, cwd, crash=()):
    """`lowmem-cnn ARGS` in a child; with `crash`, through crash_child.py, which crashes
    it at the point those options name (counted in updates, epochs or checkpoints)."""
    prefix = [str(CRASH_CHILD), *map(str, crash), "--"] if crash else ["-m", "lowmem_cnn"]
    return subprocess.Popen([sys.executable, *prefix, *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def killed(*args, cwd, crash):
    code, _, err = finish(start(*args, cwd=cwd, crash=crash))
    assert code == -signal.SIGKILL, f"exit {code}, not killed: {err}"


def history_without_seconds(stdout):
    summary = json.loads(stdout.strip().splitlines()[-1])
    return [{k: v for k, v in h.items() if k != "seconds"} for h in summary["history"]]


@pytest.fixture
def reference(mnist_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    code, out, err = finish(start(*ARGS, "--data-dir", mnist_dir, cwd=directory))
    assert code == 0, err
    return (directory / "params.pkl").read_bytes(), history_without_seconds(out)


def test_sigkill_at_three_points_then_resume_gives_the_same_run(mnist_dir, tmp_path, reference):
    checkpoint = tmp_path / "params.pkl.ckpt"
    resume = ["train", "--resume", "--json", "--data-dir", mnist_dir]
    # inside epoch 1, after update 8: the checkpoint of update 6 is the last one
    killed(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path, crash=["--at-update", "8"])
    meta, _ = read_checkpoint(checkpoint)
    assert (meta["epochs_done"], meta["position"]) == (0, 6)
    # between epochs: right after epoch 1's evaluation and checkpoint
    killed(*resume, cwd=tmp_path, crash=["--at-epoch-end", "1"])
    meta, _ = read_checkpoint(checkpoint)
    assert (meta["epochs_done"], meta["position"], len(meta["history"])) == (1, 0, 1)
    # half-way through writing a checkpoint (update 3 of epoch 2): the old one stays whole
    before = checkpoint.read_bytes()
    killed(*resume, cwd=tmp_path, crash=["--in-checkpoint", "1"])
    assert checkpoint.read_bytes() == before
    assert list(tmp_path.glob(".params.pkl.ckpt.*.tmp"))  # the write had begun
    code, out, err = finish(start(*resume, cwd=tmp_path))
    assert code == 0, err
    params, history = reference
    assert (tmp_path / "params.pkl").read_bytes() == params  # bitwise
    assert history_without_seconds(out) == history


@pytest.mark.parametrize("signum, status, crash", [
    (signal.SIGINT, 130, ["--at-update", "5"]),  # inside epoch 1
    (signal.SIGTERM, 143, ["--at-epoch-end", "1"]),  # between epochs
])
def test_interrupt_checkpoints_and_resume_finishes_the_same(mnist_dir, tmp_path, reference, signum,
                                                            status, crash):
    checkpoint = tmp_path / "params.pkl.ckpt"
    code, _, err = finish(start(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path,
                                crash=[*crash, "--action", signal.Signals(signum).name]))
    assert code == status, err
    assert "train --resume --checkpoint" in err and "Traceback" not in err
    assert not lock_files(tmp_path)  # a stopped run lets go of its locks, and their files
    meta, _ = read_checkpoint(checkpoint)
    assert not meta["finished"]
    # the update under way when the signal came finished, and was checkpointed
    assert (meta["epochs_done"], meta["position"]) == ((0, 5) if crash[0] == "--at-update" else (1, 0))
    code, out, err = finish(start("train", "--resume", "--json", "--data-dir", mnist_dir, cwd=tmp_path))
    assert code == 0, err
    assert (tmp_path / "params.pkl").read_bytes() == reference[0]
    assert history_without_seconds(out) == reference[1]
    # a finished run says so, and changes nothing
    before = (tmp_path / "params.pkl").read_bytes()
    code, out, _ = finish(start("train", "--resume", "--data-dir", mnist_dir, cwd=tmp_path))
    assert code == 0 and "finished all 2 epochs" in out
    assert (tmp_path / "params.pkl").read_bytes() == before
    assert not lock_files(tmp_path)


def lock_files(directory):
    return sorted(path.name for path in Path(directory).glob(".*.lock"))


def stopped_itself(process):
    """Wait until the child, which stops itself with SIGSTOP, is stopped (or has exited)."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the child ended instead (status {status})"


def settled(process):
    """Wait, blocking (no polling), until the child stops or ends; its wait status. An end
    is reaped here, so the Popen is given the exit status."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        process.returncode = os.waitstatus_to_exitcode(status)
    return status


def test_two_runs_started_together_on_one_checkpoint(mnist_dir, tmp_path, reference):
    # Both stop themselves after their first update, so whichever holds the checkpoint
    # is still there (stopped) when the other tries: that one must refuse at once. Each
    # child gets to where it stops or ends by its own work, so the test waits for the
    # two (one thread each, blocked in waitpid), never for time: a faster or a busier
    # machine gives the same verdict. (The timeout only ends a hung test.)
    runs = [start(*ARGS, "--data-dir", mnist_dir, *extra, cwd=tmp_path,
                  crash=["--at-update", "1", "--action", "stop"])
            for extra in ([], ["--seed", "5"])]
    waiting = ThreadPoolExecutor(len(runs))
    try:
        states = dict(enumerate(waiting.map(settled, runs, timeout=600)))
        stopped = [i for i, status in states.items() if os.WIFSTOPPED(status)]
        exited = [i for i, status in states.items() if os.WIFEXITED(status)]
        assert len(stopped) == 1 and len(exited) == 1, f"not one holder and one refusal: {states}"
        holder, refused = runs[stopped[0]], runs[exited[0]]
        err = refused.stderr.read()
        assert refused.returncode == 1, err
        assert f"params.pkl.ckpt is in use by process {holder.pid}" in err
        assert "Traceback" not in err
        # the refused run removed nothing it did not hold
        assert lock_files(tmp_path) == [".params.pkl.ckpt.lock", ".params.pkl.lock"]
        assert lock_path(tmp_path / "params.pkl.ckpt").read_text().split()[0] == str(holder.pid)
        holder.send_signal(signal.SIGCONT)
        code, out, err = finish(holder)
        assert code == 0, err
        assert not lock_files(tmp_path)
        if holder is runs[0]:  # the run with the reference's settings
            assert (tmp_path / "params.pkl").read_bytes() == reference[0]
            assert history_without_seconds(out) == reference[1]
        else:
            assert (tmp_path / "params.pkl").read_bytes() != reference[0]
    finally:  # a failed test leaves no child behind, stopped or running
        for process in runs:
            if process.returncode is None:
                process.kill()
        waiting.shutdown()
        for process in runs:
            process.wait()


def test_a_run_on_the_same_out_with_another_checkpoint_is_refused(mnist_dir, tmp_path):
    first = start(*ARGS, "--data-dir", mnist_dir, "--checkpoint", "a.ckpt", cwd=tmp_path,
                  crash=["--at-update", "1", "--action", "stop"])
    stopped_itself(first)
    try:
        code, _, err = finish(start(*ARGS, "--data-dir", mnist_dir, "--checkpoint", "b.ckpt",
                                    cwd=tmp_path))
        assert code == 1 and f"params.pkl is in use by process {first.pid}" in err
        assert not (tmp_path / "b.ckpt").exists()
    finally:
        first.kill()
        first.wait()


def make_checkpoint(path):
    write_checkpoint(path, {"run": {"epochs": 1}, "finished": False},
                     {"a": np.arange(10, dtype=np.float32), "b": np.ones((3, 4))})


def test_checkpoint_round_trip(tmp_path):
    make_checkpoint(tmp_path / "c")
    meta, arrays = read_checkpoint(tmp_path / "c")
    assert meta == {"run": {"epochs": 1}, "finished": False}
    np.testing.assert_array_equal(arrays["a"], np.arange(10, dtype=np.float32))
    assert arrays["b"].shape == (3, 4)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-40], "damaged checkpoint"),
    (lambda b: b[:30], "damaged checkpoint"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum mismatch"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),
    (lambda b: b"\x80\x04garbage" + b, "not a lowmem-cnn checkpoint"),
    (lambda b: b"", "not a lowmem-cnn checkpoint"),
])
def test_damaged_checkpoints_say_so(tmp_path, damage, message):
    path = tmp_path / "c"
    make_checkpoint(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LowmemError, match=message):
        read_checkpoint(path)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c"
    make_checkpoint(path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LowmemError, match="cannot write checkpoint .*No space left"):
        write_checkpoint(path, {"finished": True}, {"a": np.zeros(5)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c"]


def run_cli(*args, cwd):
    return finish(start(*args, cwd=cwd))


def test_resume_errors_are_clear(tmp_path, mnist_dir):
    code, _, err = run_cli("train", "--resume", "--checkpoint", tmp_path / "none.ckpt", cwd=tmp_path)
    assert code == 1 and "no checkpoint there" in err and "Traceback" not in err
    (tmp_path / "p.pkl").write_bytes(b"\x80\x04not a checkpoint")
    code, _, err = run_cli("train", "--resume", "--checkpoint", tmp_path / "p.pkl", cwd=tmp_path)
    assert code == 1 and "not a lowmem-cnn checkpoint" in err


def test_a_new_run_does_not_overwrite_an_unfinished_one(tmp_path, mnist_dir):
    checkpoint = tmp_path / "params.pkl.ckpt"
    killed(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path, crash=["--at-update", "4"])
    assert lock_path(checkpoint).exists()  # left by the killed run, and no obstacle
    before = checkpoint.read_bytes()
    code, _, err = run_cli(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path)
    assert code == 1 and "holds an unfinished run" in err and "--resume" in err
    assert checkpoint.read_bytes() == before
    assert not lock_files(tmp_path)  # the refused run took the locks, then let them go
    # nor does a resume under a budget too small for the recorded plan damage it
    code, _, err = run_cli("train", "--resume", "--max-ram", "45M", "--data-dir", mnist_dir,
                           cwd=tmp_path)
    assert code == 1 and "at least" in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before
    # nor a resume on other data of the same size
    other = write_dataset(tmp_path / "other", n_train=1000, n_test=10)
    code, _, err = run_cli("train", "--resume", "--data-dir", other, cwd=tmp_path)
    assert code == 1 and "started on other data" in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before
    # a killed run's lock file (no process holds it: the refusals above removed the
    # first one) does not block its resume
    lock_path(checkpoint).write_text("99999999\n")
    code, _, err = run_cli("train", "--resume", "--data-dir", mnist_dir, cwd=tmp_path)
    assert code == 0, err
    assert not lock_files(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows keeps lock files (they stay open)")
def test_a_lock_file_removed_as_its_holder_let_go_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    from lowmem_cnn.common import locks
    guarded = tmp_path / "params.pkl"
    target = lock_path(guarded)
    first = locks.RunLock(guarded, "parameter file")
    stale = os.open(target, os.O_RDWR)  # opened just before the holder lets go
    first.release()
    assert not target.exists()
    # the stale file can be locked now, but it is no longer the lock, even once another
    # file is at the path
    assert locks.try_lock(stale) and not locks.still_at(stale, target)
    target.touch()
    assert not locks.still_at(stale, target)
    os.close(stale)

    # a run that locks a file its holder removed meanwhile takes the path's file instead
    real_try_lock, calls = locks.try_lock, []

    def holder_lets_go_first(fd):
        if not calls:  # as the holder would: remove the file, then unlock it
            os.unlink(target)
        calls.append(fd)
        return real_try_lock(fd)

    target.touch()
    monkeypatch.setattr(locks, "try_lock", holder_lets_go_first)
    second = locks.RunLock(guarded, "parameter file")
    monkeypatch.undo()
    assert len(calls) == 2  # the removed file locked, then the new one
    assert target.exists() and os.fstat(second._fd).st_ino == target.stat().st_ino
    with pytest.raises(LowmemError, match=f"in use by process {os.getpid()}"):
        locks.RunLock(guarded, "parameter file")
    second.release()
    assert not target.exists()


def test_a_refused_start_lets_go_of_the_lock_it_took(tmp_path):
    # the parameter file is in use: start refuses after it has locked the checkpoint
    from lowmem_cnn.training.run import Checkpointing, Settings
    from lowmem_cnn.training.starting import start
    from lowmem_cnn.data.idx import DataOptions
    from lowmem_cnn.common.locks import RunLock

    out = tmp_path / "params.pkl"
    held = RunLock(out, "parameter file")
    settings = Settings(config="simple_convnet", dtype="float32", epochs=1, batch_size=100,
                        lr=0.001, optimizer="adam", seed=0, limit=None, out=str(out),
                        max_ram=2**30, threads=1)
    checkpointing = Checkpointing(tmp_path / "params.pkl.ckpt", None)
    with pytest.raises(LowmemError, match="in use by process"):
        start(settings, checkpointing, DataOptions(tmp_path / "no data"))
    assert lock_files(tmp_path) == [".params.pkl.lock"]  # only the one still held
    held.release()
    assert not lock_files(tmp_path)


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    import struct

    from lowmem_cnn.files.checkpoint import MAGIC, VERSION, read_checkpoint, write_checkpoint

    path = tmp_path / "old.ckpt"
    write_checkpoint(path, {"run": {}}, {"x": np.zeros(3)})
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 4] = struct.pack("<I", VERSION - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(LowmemError, match=f"version {VERSION - 1}, this lowmem-cnn reads {VERSION}"):
        read_checkpoint(path)
