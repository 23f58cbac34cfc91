"""Crash-safe training: checkpoints, resume after SIGKILL/SIGINT/SIGTERM, damaged files."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lowmem_cnn.checkpoint import read_checkpoint, write_checkpoint
from lowmem_cnn.errors import LowmemError

# 1,000 real images, batches of 50: 20 updates an epoch, a checkpoint every 3.
ARGS = ["train", "--limit", "1000", "--epochs", "2", "--batch-size", "50", "--checkpoint-every", "3",
        "--max-ram", "256M", "--json"]


def start(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "lowmem_cnn", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def history_without_seconds(stdout):
    summary = json.loads(stdout.strip().splitlines()[-1])
    return [{k: v for k, v in h.items() if k != "seconds"} for h in summary["history"]]


@pytest.fixture
def reference(mnist_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    code, out, err = finish(start(*ARGS, "--data-dir", mnist_dir, cwd=directory))
    assert code == 0, err
    return (directory / "params.pkl").read_bytes(), history_without_seconds(out)


def wait_for(path, process, limit=120):
    deadline = time.monotonic() + limit
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigkill_at_random_points_then_resume_gives_the_same_run(mnist_dir, tmp_path, reference):
    rng = random.Random(1234)
    checkpoint = tmp_path / "params.pkl.ckpt"
    process = start(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path)
    kills = 0
    for _ in range(4):  # a bounded number of crashes
        wait_for(checkpoint, process)
        time.sleep(rng.uniform(0.0, 0.8))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        process = start("train", "--resume", "--json", "--data-dir", mnist_dir, cwd=tmp_path)
    code, out, err = finish(process)
    assert code == 0, err
    assert kills >= 1
    params, history = reference
    assert (tmp_path / "params.pkl").read_bytes() == params  # bitwise
    assert history_without_seconds(out) == history


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_checkpoints_and_resume_finishes_the_same(mnist_dir, tmp_path, reference, signum,
                                                            status):
    checkpoint = tmp_path / "params.pkl.ckpt"
    process = start(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path)
    wait_for(checkpoint, process)
    process.send_signal(signum)
    code, _, err = finish(process)
    if code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert code == status
    assert "train --resume --checkpoint" in err and "Traceback" not in err
    meta, _ = read_checkpoint(checkpoint)
    assert not meta["finished"]
    code, out, err = finish(start("train", "--resume", "--json", "--data-dir", mnist_dir, cwd=tmp_path))
    assert code == 0, err
    assert (tmp_path / "params.pkl").read_bytes() == reference[0]
    assert history_without_seconds(out) == reference[1]
    # a finished run says so, and changes nothing
    before = (tmp_path / "params.pkl").read_bytes()
    code, out, _ = finish(start("train", "--resume", "--data-dir", mnist_dir, cwd=tmp_path))
    assert code == 0 and "finished all 2 epochs" in out
    assert (tmp_path / "params.pkl").read_bytes() == before


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
    process = start(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path)
    wait_for(checkpoint, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = checkpoint.read_bytes()
    code, _, err = run_cli(*ARGS, "--data-dir", mnist_dir, cwd=tmp_path)
    assert code == 1 and "holds an unfinished run" in err and "--resume" in err
    assert checkpoint.read_bytes() == before
    # nor does a resume under a budget too small for the recorded plan damage it
    code, _, err = run_cli("train", "--resume", "--max-ram", "45M", "--data-dir", mnist_dir,
                           cwd=tmp_path)
    assert code == 1 and "at least" in err and "Traceback" not in err
    assert checkpoint.read_bytes() == before


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    import struct

    from lowmem_cnn.checkpoint import MAGIC, VERSION, read_checkpoint, write_checkpoint

    path = tmp_path / "old.ckpt"
    write_checkpoint(path, {"run": {}}, {"x": np.zeros(3)})
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 4] = struct.pack("<I", VERSION - 1)
    path.write_bytes(bytes(data))
    with pytest.raises(LowmemError, match=f"version {VERSION - 1}, this lowmem-cnn reads {VERSION}"):
        read_checkpoint(path)
