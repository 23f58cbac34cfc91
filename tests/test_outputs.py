"""Every file a command writes is safe: an output that is an input, another output, a
device or "" is refused in one line before any work; a diverged run replaces nothing;
a killed writer's temporary file is removed by the next write of its output."""

import fcntl
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idx_files import NAMES, write_dataset
from lowmem_cnn.files.checkpoint import read_checkpoint
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.writing import atomic_write

CRASH_CHILD = Path(__file__).with_name("crash_child.py")
SMALL_RUN = ["--limit", "300", "--epochs", "1", "--max-ram", "1G"]


def lowmem(*args, cwd, prefix=("-m", "lowmem_cnn")):
    result = subprocess.run([sys.executable, *prefix, *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


def checksums(directory: Path) -> dict:
    """The SHA-256 of each file under `directory`, and the kind of everything else."""
    found = {}
    for path in sorted(directory.rglob("*")):
        mode = path.lstat().st_mode
        found[path] = (hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode)
                       else stat.S_IFMT(mode))
    return found


def refused(code, out, err, *words, before_work=True):
    """Exit 1, one line of error naming `words`, no traceback; `before_work`: said
    before anything else (no budget, no plan, no epoch)."""
    assert code == 1, f"exit {code}: {out} {err}"
    assert "Traceback" not in out + err
    if before_work:
        assert out == "", out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path, book_params):
    """A folder with the book's parameter file and its description, and a small data set."""
    shutil.copy(book_params, tmp_path / "p.pkl")
    (tmp_path / "p.pkl.json").write_text("{}")  # never read: the refusal comes first
    write_dataset(tmp_path / "data")
    return tmp_path


SAME_FILE = {
    "eval: --misclassified is PARAMS": (["eval", "p.pkl", "--misclassified", "p.pkl"],
                                        "would replace the parameter file"),
    "eval: --misclassified is PARAMS.json": (["eval", "p.pkl", "--misclassified", "p.pkl.json"],
                                             "would replace the parameter file's description"),
    "eval: --misclassified by another path": (["eval", "p.pkl", "--misclassified", "data/../p.pkl"],
                                              "would replace the parameter file"),
    "eval: --misclassified is a data file": (
        ["eval", "p.pkl", "--misclassified", "data/" + NAMES["test_labels"]], "data set"),
    "eval: --misclassified beside a gzipped data file": (
        ["eval", "p.pkl", "--misclassified", "data/" + NAMES["test_images"] + ".gz"], "data set"),
    "export: OUT is PARAMS": (["export", "p.pkl", "p.pkl"], "would replace the parameter file"),
    "export: OUT is PARAMS.json": (["export", "p.pkl", "p.pkl.json"], "description"),
    "train: --plot is --out": (["train", "--out", "p.pkl", "--plot", "p.pkl"], "the same file"),
    "train: --checkpoint is --out": (["train", "--out", "p.pkl", "--checkpoint", "p.pkl"],
                                     "--out p.pkl and --checkpoint p.pkl are the same file"),
    "train: --checkpoint is --out's description": (
        ["train", "--out", "p.pkl", "--checkpoint", "p.pkl.json"], "the same file"),
    "train: --plot is the checkpoint": (["train", "--out", "p.pkl", "--plot", "p.pkl.ckpt"],
                                        "the same file"),
    "train: --out is a data file": (["train", "--out", "data/" + NAMES["train_images"]],
                                    "data set"),
    "profile-memory: --plot is a data file": (
        ["profile-memory", "--plot", "data/" + NAMES["test_images"]], "data set"),
}


@pytest.mark.parametrize("case", sorted(SAME_FILE))
def test_an_output_that_is_an_input_or_another_output_is_refused(files, case):
    args, words = SAME_FILE[case]
    (files / "p.pkl.ckpt").write_bytes(b"a checkpoint")
    before = checksums(files)
    data = [] if args[0] == "export" else ["--data-dir", "data"]
    refused(*lowmem(*args, *data, cwd=files), words)
    assert checksums(files) == before


def test_a_hard_link_to_an_input_is_the_same_file(files):
    os.link(files / "p.pkl", files / "linked.pkl")
    before = checksums(files)
    refused(*lowmem("export", "p.pkl", "linked.pkl", cwd=files), "would replace the parameter file")
    assert checksums(files) == before


def special_files(directory: Path) -> dict:
    """A FIFO, a socket, a directory and (as root) a character device like /dev/full."""
    made = {"FIFO": directory / "fifo", "socket": directory / "socket",
            "directory": directory / "folder"}
    os.mkfifo(made["FIFO"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["socket"]))
    server.close()
    made["directory"].mkdir()
    if os.geteuid() == 0:
        made["character device"] = directory / "full"
        os.mknod(made["character device"], stat.S_IFCHR | 0o666, os.makedev(1, 7))
    return made


SMALL_DATA = ["--data-dir", "data"]  # were it not refused, a short run
OUTPUT_OPTIONS = {
    "export OUT": lambda path: ["export", "p.pkl", path],
    "eval --misclassified": lambda path: ["eval", "p.pkl", "--misclassified", path, *SMALL_DATA],
    "train --out": lambda path: ["train", "--out", path, "--epochs", "1", *SMALL_DATA],
    "train --plot": lambda path: ["train", "--plot", path, "--epochs", "1", *SMALL_DATA],
    "train --checkpoint": lambda path: ["train", "--checkpoint", path, "--epochs", "1", *SMALL_DATA],
    "profile-memory --plot": lambda path: ["profile-memory", "--plot", path, *SMALL_DATA],
}


@pytest.mark.parametrize("option", sorted(OUTPUT_OPTIONS))
def test_an_output_that_is_not_a_regular_file_is_refused(files, option):
    made = special_files(files)
    before = checksums(files)
    for kind, path in made.items():
        args = OUTPUT_OPTIONS[option](path.name)
        code, out, err = lowmem(*args, cwd=files)
        if kind == "directory" and code == 2:  # click's own refusal (dir_okay=False)
            assert "Traceback" not in out + err and "directory" in err
        else:
            refused(code, out, err, path.name, "not a file to replace" if kind != "directory"
                    else "directory")
        assert checksums(files) == before, kind


EMPTY = {
    "train --out": ["train", "--out", "", "--epochs", "1", *SMALL_DATA],
    "train --checkpoint": ["train", "--checkpoint", "", "--epochs", "1", *SMALL_DATA],
    "train --plot": ["train", "--plot", "", "--epochs", "1", *SMALL_DATA],
    "eval PARAMS": ["eval", "", *SMALL_DATA],
    "eval --misclassified": ["eval", "p.pkl", "--misclassified", "", *SMALL_DATA],
    "export PARAMS": ["export", "", "out.onnx"],
    "export OUT": ["export", "p.pkl", ""],
    "profile-memory --plot": ["profile-memory", "--plot", "", *SMALL_DATA],
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_an_empty_path_is_refused(files, case):
    before = checksums(files)
    refused(*lowmem(*EMPTY[case], cwd=files), "empty path")
    assert checksums(files) == before


@pytest.mark.parametrize("folder", ["missing", "a file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_training(files, folder):
    (files / "a file").write_text("not a folder")
    before = checksums(files)
    code, out, err = lowmem("train", "--data-dir", "data", "--plot", f"{folder}/curves.png",
                            "--epochs", "1", cwd=files)
    refused(code, out, err, f"{folder}/curves.png", "does not exist" if folder == "missing"
            else "is not a folder")
    assert "epoch" not in out + err.replace("--epochs", "")  # not one update made
    assert checksums(files) == before


# SGD at rate 1 with a weight decay of 1000 multiplies each weight by -999 an update: on
# the first 300 MNIST images (3 updates an epoch) the loss is finite after epoch 1 and
# the parameters overflow in epoch 2 (measured).
DIVERGING = ["--optimizer", "sgd", "--lr", "1", "--weight-decay", "1000"]


def test_a_diverged_run_keeps_the_good_files(mnist_dir, tmp_path):
    code, _, err = lowmem("train", "--data-dir", mnist_dir, *SMALL_RUN, cwd=tmp_path)
    assert code == 0, err
    good = {name: (tmp_path / name).read_bytes() for name in ("params.pkl", "params.pkl.json")}

    code, out, err = lowmem("train", "--data-dir", mnist_dir, *SMALL_RUN[:2], "--epochs", "4",
                            "--max-ram", "1G", *DIVERGING, cwd=tmp_path)
    line = refused(code, out, err, "diverged in epoch 2", "params.pkl is not written",
                   "params.pkl.ckpt keeps the run after epoch 1", before_work=False)
    assert "loss nan" in line or "loss inf" in line
    assert {name: (tmp_path / name).read_bytes() for name in good} == good
    meta, arrays = read_checkpoint(tmp_path / "params.pkl.ckpt")  # epoch 1, not the NaNs
    assert (meta["epochs_done"], meta["position"], meta["finished"]) == (1, 0, False)
    assert all(np.isfinite(array).all() for array in arrays.values()
               if array.dtype.kind == "f")


def test_a_checkpoint_within_an_epoch_is_not_written_with_diverged_parameters(mnist_dir, tmp_path):
    # a checkpoint after every update: the one of update 1 of epoch 2 finds the overflow
    code, out, err = lowmem("train", "--data-dir", mnist_dir, *SMALL_RUN[:2], "--epochs", "4",
                            "--max-ram", "1G", "--checkpoint-every", "1", *DIVERGING, cwd=tmp_path)
    refused(code, out, err, "diverged in epoch 2", "params.pkl.ckpt keeps the run",
            before_work=False)
    meta, arrays = read_checkpoint(tmp_path / "params.pkl.ckpt")
    assert meta["epochs_done"] == 1
    assert all(np.isfinite(array).all() for array in arrays.values()
               if array.dtype.kind == "f")
    assert not (tmp_path / "params.pkl").exists()


def temporaries(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(mnist_dir, tmp_path):
    # SIGKILL half-way through writing the first checkpoint (crash_child.py chooses the point)
    code, _, err = lowmem("--in-checkpoint", "1", "--", "train", "--data-dir", mnist_dir,
                          *SMALL_RUN, "--checkpoint-every", "1", cwd=tmp_path,
                          prefix=[str(CRASH_CHILD)])
    assert code == -9, err
    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".params.pkl.ckpt.")
    code, _, err = lowmem("train", "--data-dir", mnist_dir, *SMALL_RUN, cwd=tmp_path)
    assert code == 0, err
    assert temporaries(tmp_path) == []


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    out = tmp_path / "out.bin"
    dead = tmp_path / ".out.bin.abcd_123.tmp"  # as tempfile names them
    live = tmp_path / ".out.bin.live0123.tmp"
    others = [tmp_path / ".out.bin.json.abcd1234.tmp", tmp_path / "out.bin.tmp",
              tmp_path / ".out.bin.abc.tmp"]  # another output's, and not ours
    for path in (dead, live, *others):
        path.write_bytes(b"partial")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as its writer holds it while it writes
    try:
        with atomic_write(out) as f:
            f.write(b"new")
        assert not dead.exists()
        assert live.exists() and all(path.exists() for path in others)
    finally:
        os.close(holder)
    assert out.read_bytes() == b"new"
    assert sorted(temporaries(tmp_path)) == sorted(p.name for p in (live, *others))


def test_atomic_write_replaces_no_device(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LowmemError, match="a FIFO, not a file to replace"):
        with atomic_write(fifo) as f:
            f.write(b"data")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert os.listdir(tmp_path) == ["fifo"]


def test_one_runs_two_files_that_are_one_are_named_so_not_as_in_use(tmp_path):
    from lowmem_cnn.common.locks import RunLock

    path = tmp_path / "params.pkl"
    first = RunLock(path, "checkpoint")
    try:
        with pytest.raises(LowmemError, match="checkpoint .* are the same file"):
            RunLock(tmp_path / "." / "params.pkl", "parameter file")
    finally:
        first.release()
