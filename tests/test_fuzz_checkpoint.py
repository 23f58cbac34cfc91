"""Fuzzing checkpoints: seeded mutations of a real one (a tiny network trained by the CLI
and stopped half-way through its second epoch).

Every mutated file is either read, and then it is exactly what a plain decoder of the
same bytes makes of it (the arrays are the file's bytes where its header says, in
native byte order), or refused with a LowmemError: never another exception, a signal,
or an allocation beyond the file's size and MEMORY_SLACK. Mutations of the JSON header
get a recomputed SHA-256, as whoever crafts a checkpoint would give it, so they reach
the header's checks; others keep the old one, as damage would. A few go through
`lowmem-cnn train --resume` in a child, whose exit status, stderr and peak RSS are
checked.
"""

import copy
import hashlib
import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import run_lowmem
from idx_files import write_dataset

from lowmem_cnn.files.checkpoint import MAGIC, VERSION, check_run_meta, read_checkpoint
from lowmem_cnn.common.errors import LowmemError

ROOT = Path(__file__).resolve().parent.parent
CRASH_CHILD = Path(__file__).with_name("crash_child.py")
# 1 MiB beyond the file's size: what a reader holds besides the arrays (at most the file's
# size): the header's text and its objects (a 3 KiB header makes about 60 KiB of them;
# read_checkpoint's HEADER_LIMIT bounds the worst to about 24 MiB, tested below) and the
# SHA-256's chunk (the whole file here, freed before the arrays are made).
MEMORY_SLACK = 1 << 20
BUDGET = 256 * 2**20  # --max-ram 256M, which the children must keep to
FUZZ = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# A network small enough that a checkpoint is 30 KB (4 filters, batch normalization, so
# that every kind of array is in it), trained with --val-split and --keep best, so that
# its checkpoint has the optimizer's state, the epoch's order and the best epoch's copy.
TINY_CONFIG = """
[network]
name = "Tiny"
input_shape = [1, 28, 28]
[[network.layers]]
type = "conv"
filters = 4
size = 5
stride = 2
pad = 0
[[network.layers]]
type = "batchnorm"
[[network.layers]]
type = "relu"
[[network.layers]]
type = "pool"
size = 2
stride = 2
[[network.layers]]
type = "affine"
units = 10
"""


class Made(tuple):
    """A fixture's files, named shortly where hypothesis shows a failing example."""

    def __repr__(self):
        return f"<files in {self[0]}>"


def run_child(args, cwd, env_data):
    """(exit status, stderr, peak RSS in bytes) of `python -m lowmem_cnn ARGS` (its stdout
    in stdout.txt): the peak is
    the child's own, through conftest's launcher (a child of pytest itself would start at
    pytest's high-water mark)."""
    done = run_lowmem(*map(str, args), cwd=cwd, env={"LOWMEM_CNN_DATA": str(env_data)})
    (Path(cwd) / "stdout.txt").write_text(done.stdout)
    return done.returncode, done.stderr, done.peak_rss


def assert_one_line_refusal(status, stderr, peak):
    assert status == 1, (status, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert peak <= BUDGET, (peak, stderr)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real unfinished checkpoint, the data it was trained on and a place to work."""
    if sys.platform != "linux":
        pytest.skip("the children's peak RSS is read with wait4")
    home = tmp_path_factory.mktemp("fuzz_checkpoint")
    data = write_dataset(home / "data", n_train=200, n_test=20)
    (home / "tiny.toml").write_text(TINY_CONFIG)
    # 160 training images in batches of 20: update 12 is the 4th of epoch 2
    child = subprocess.run(
        [sys.executable, str(CRASH_CHILD), "--at-update", "12", "--action", "SIGINT", "--",
         "train", "--config", "tiny.toml", "--epochs", "2", "--batch-size", "20",
         "--val-split", "0.2", "--keep", "best", "--max-ram", "256M", "--out", "t.pkl",
         "--checkpoint", "t.ckpt", "--data-dir", str(data)],
        cwd=home, capture_output=True, text=True, timeout=600)
    assert child.returncode == 130, child.stderr
    return Made((home, data, (home / "t.ckpt").read_bytes()))


def split(data: bytes):
    """(header as JSON, the arrays' bytes) of a checkpoint's bytes."""
    start = len(MAGIC) + 12
    (length,) = struct.unpack("<Q", data[len(MAGIC) + 4 : start])
    return json.loads(data[start : start + length]), data[start + length : -32]


def assemble(header, region: bytes, length=None, version=VERSION) -> bytes:
    """A checkpoint of `header` (JSON, or its bytes) and `region`, its SHA-256 recomputed."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = MAGIC + struct.pack("<IQ", version, len(text) if length is None else length) + text + region
    return body + hashlib.sha256(body).digest()


def decoded(data: bytes):
    """What a checkpoint the reader took holds, decoded plainly: meta as JSON, and each
    array the bytes its descriptor names, in native byte order."""
    header, region = split(data)
    arrays = {}
    for item in header["arrays"]:
        dtype = np.dtype(item["dtype"])
        count = int(np.prod(item["shape"], dtype=np.int64))
        array = np.frombuffer(region, dtype, count, item["offset"]).reshape(item["shape"])
        arrays[item["name"]] = array.astype(dtype.newbyteorder("="))
    return header["meta"], arrays


def read_traced(path: Path):
    """read_checkpoint's (meta, arrays) or LowmemError, and the peak bytes traced."""
    tracemalloc.start()
    try:
        try:
            result = read_checkpoint(path)
        except LowmemError as err:
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the mutations ---------------------------------------------------------------------

EXTREMES = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, -(2**63), 10**400, 1e308,
            -1e308, float("nan"), float("inf"), 0.5, "", "x" * 300, "\u0000\n", "PCG64", [],
            {}, [0], [-1], [2**40, 2**40], {"a": 1}, [[[[[[[[[[]]]]]]]]]], "float32", "|O"]
DTYPES = ["|O", "<U8", "|V8", "<c16", ">f4", "<f8", "|b1", ">i8", "<M8[s]", "O", "f4", "", 7, None,
          "<f4" * 100, ">u2", "|i1"]
SHAPES = [[], [0], [-1], [2**62], [2**40, 2**40], [10**30, 0], [1] * 9, [True], [1.5], "1", None,
          [3, 4], [2**31], [0, 2**64]]


def nodes(value, path=()):
    """Every (path, value) of a JSON value, the value itself included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from nodes(item, (*path, index))


def replace(root, path, value):
    if not path:
        return value
    target = root
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return root


def some_node(rnd, header, containers=False):
    found = [(p, v) for p, v in nodes(header) if not containers or isinstance(v, (dict, list))]
    return rnd.choice(found)


def flip_bit(rnd, data):
    at = rnd.randrange(len(data))
    return data[:at] + bytes([data[at] ^ (1 << rnd.randrange(8))]) + data[at + 1 :]


def truncate(rnd, data):
    return data[: rnd.randrange(len(data))]


def header_value(rnd, data):
    header, region = split(data)
    path, _ = some_node(rnd, header)
    return assemble(replace(header, path, copy.deepcopy(rnd.choice(EXTREMES))), region)


def header_key_removed(rnd, data):
    header, region = split(data)
    path, node = some_node(rnd, header, containers=True)
    if isinstance(node, dict) and node:
        del node[rnd.choice(list(node))]
    elif isinstance(node, list) and node:
        del node[rnd.randrange(len(node))]
    return assemble(header, region)


def header_key_added(rnd, data):
    header, region = split(data)
    path, node = some_node(rnd, header, containers=True)
    value = copy.deepcopy(rnd.choice(EXTREMES))
    if isinstance(node, dict):
        node[rnd.choice(["extra", "name", "run", "meta", "x" * 50])] = value
    else:
        node.append(value)
    return assemble(header, region)


def descriptor(rnd, data):
    header, region = split(data)
    item = rnd.choice(header["arrays"])
    field = rnd.choice(["dtype", "shape", "offset", "name"])
    pool = {"dtype": DTYPES, "shape": SHAPES,
            "offset": [-1, -8, 1, 2, len(region), len(region) - 1, 2**64, 10**30, 0.0, "0", None],
            "name": ["order", "param/W1", "", "x" * 200, None, 3, "best/param/W1", "\n"]}[field]
    item[field] = copy.deepcopy(rnd.choice(pool))
    return assemble(header, region)


def descriptors_swapped(rnd, data):
    header, region = split(data)
    a, b = rnd.sample(header["arrays"], 2)
    field = rnd.choice(["dtype", "shape", "offset", "name"])
    a[field], b[field] = b[field], a[field]
    return assemble(header, region)


def header_bytes(rnd, data):
    start = len(MAGIC) + 12
    (length,) = struct.unpack("<Q", data[len(MAGIC) + 4 : start])
    text = bytearray(data[start : start + length])
    for _ in range(rnd.randint(1, 4)):
        text[rnd.randrange(length)] = rnd.choice(b'{}[]",:0123456789-eE.tfn\\ \x00\xff')
    return assemble(bytes(text), data[start + length : -32])


def header_length(rnd, data):
    header, region = split(data)
    text = json.dumps(header).encode()
    length = rnd.choice([0, 1, len(text) - 1, len(text) + 1, len(text) + len(region), 2**20 + 1,
                         2**63, 2**64 - 1])
    return assemble(text, region, length)


def region_bytes(rnd, data):
    """Damage to the arrays' bytes, the SHA-256 recomputed: read, and different."""
    header, region = split(data)
    region = bytearray(region)
    for _ in range(rnd.randint(1, 8)):
        region[rnd.randrange(len(region))] = rnd.randrange(256)
    return assemble(header, bytes(region))


def nested(rnd, data):
    header, region = split(data)
    path, _ = some_node(rnd, header)
    depth = rnd.choice([9, 50, 1000, 100_000])
    text = json.dumps(replace(header, path, "@")).replace('"@"', "[" * depth + "]" * depth)
    return assemble(text.encode(), region)


def other_version(rnd, data):
    header, region = split(data)
    return assemble(header, region, version=rnd.choice([0, 1, 3, 2**32 - 1]))


MUTATIONS = [flip_bit, truncate, header_value, header_key_removed, header_key_added, descriptor,
             descriptors_swapped, header_bytes, header_length, region_bytes, nested, other_version]


@FUZZ
@given(mutate=st.sampled_from(MUTATIONS), rnd=st.randoms(use_true_random=False))
def test_a_mutated_checkpoint_is_read_as_it_is_or_refused(made, mutate, rnd):
    home, _, original = made
    data = mutate(rnd, original)
    path = home / "mutated.ckpt"
    path.write_bytes(data)
    result, peak = read_traced(path)
    assert peak <= len(data) + MEMORY_SLACK, (mutate.__name__, peak, len(data))
    if mutate is flip_bit or mutate is truncate:  # not a checkpoint, or a damaged one
        assert isinstance(result, LowmemError), mutate.__name__
    if mutate is region_bytes:  # the header is whole: read, with the bytes as they are
        assert not isinstance(result, LowmemError), result
    if isinstance(result, LowmemError):
        assert "\n" not in str(result)
        return
    meta, arrays = result
    expected_meta, expected_arrays = decoded(data)
    assert json.dumps(meta) == json.dumps(expected_meta)
    assert list(arrays) == list(expected_arrays)
    for name, array in arrays.items():
        expected = expected_arrays[name]
        assert array.dtype == expected.dtype and array.dtype.isnative
        assert array.shape == expected.shape and array.tobytes() == expected.tobytes()
    try:  # what a resumed run reads of the metadata: each field checked, or a LowmemError
        check_run_meta(path, meta)
    except LowmemError as err:
        assert "\n" not in str(err)


def test_a_crafted_header_costs_what_its_limit_says(made):
    """A header of the objects json.loads makes most of costs at most 32 bytes a byte of
    header (about 24 measured); one over HEADER_LIMIT is refused unread."""
    from lowmem_cnn.files.checkpoint import HEADER_LIMIT

    home, _, original = made
    _, region = split(original)
    # an eighth of the limit: tracing 50,000 dicts takes a second
    text = b'{"meta": [' + b"{}," * (HEADER_LIMIT // 24) + b'{}], "arrays": []}'
    assert len(text) <= HEADER_LIMIT
    path = home / "crafted.ckpt"
    path.write_bytes(assemble(text, region))
    result, peak = read_traced(path)
    assert isinstance(result, LowmemError) and "meta is not an object" in str(result)
    assert peak <= len(region) + 32 * len(text)
    path.write_bytes(assemble(b" " * (HEADER_LIMIT + 1), region))
    result, peak = read_traced(path)
    assert isinstance(result, LowmemError) and "more than a checkpoint's ever holds" in str(result)
    assert peak <= path.stat().st_size + MEMORY_SLACK


def test_both_byte_orders_are_read_as_native(made):
    """The same arrays written big-endian read as the little-endian ones do."""
    home, _, original = made
    header, region = split(original)
    swapped = bytearray(region)
    for item in header["arrays"]:
        dtype = np.dtype(item["dtype"])
        count = int(np.prod(item["shape"]))
        view = np.frombuffer(swapped, dtype, count, item["offset"])
        view.byteswap(inplace=True)
        item["dtype"] = dtype.newbyteorder(">" if dtype.byteorder in "<=" else "<").str
    path = home / "swapped.ckpt"
    path.write_bytes(assemble(header, bytes(swapped)))
    (home / "original.ckpt").write_bytes(original)
    _, arrays = read_checkpoint(path)
    _, expected = read_checkpoint(home / "original.ckpt")
    for name, array in expected.items():
        assert arrays[name].dtype == array.dtype and np.array_equal(arrays[name], array)


# --- the run a checkpoint resumes: its metadata and arrays against the network ---------

RUN_FIELDS = ["epochs_done", "position", "loss_sum", "seconds", "rng", "optimizer_steps", "history",
              "finished", "plan", "best", "run"]


def meta_field(rnd, data):
    header, region = split(data)
    meta = header["meta"]
    key = rnd.choice(RUN_FIELDS)
    if rnd.random() < 0.5 and isinstance(meta[key], (dict, list)) and meta[key]:
        path, _ = some_node(rnd, meta[key])
        meta[key] = replace(meta[key], path, copy.deepcopy(rnd.choice(EXTREMES)))
    else:
        meta[key] = copy.deepcopy(rnd.choice(EXTREMES))
    return assemble(header, region)


def array_of_other_shape(rnd, data):
    """An array replaced by one of another shape or dtype, with its bytes: the header
    is sound, the run is not."""
    header, region = split(data)
    item = rnd.choice(header["arrays"])
    region = bytearray(region)
    dtype = np.dtype(rnd.choice(["<f4", "<f8", ">f4", "<i8", "|u1", "|b1"]))
    shape = rnd.choice([[], [1], [3], [item["shape"][0] if item["shape"] else 1, 2],
                        [*item["shape"][::-1]], [160], [2, 80]])
    item.update(dtype=dtype.str, shape=shape, offset=len(region))
    array = np.zeros(shape, dtype)
    if rnd.random() < 0.5:
        array = np.arange(array.size).astype(dtype).reshape(shape)
    region += array.tobytes()
    return assemble(header, bytes(region))


def array_removed(rnd, data):
    header, region = split(data)
    header["arrays"].pop(rnd.randrange(len(header["arrays"])))
    return assemble(header, region)


def order_changed(rnd, data):
    header, region = split(data)
    item = next(item for item in header["arrays"] if item["name"] == "order")
    region = bytearray(region)
    order = np.frombuffer(region, np.int64, 160, item["offset"])
    order[rnd.randrange(160)] = rnd.choice([-1, 160, 200, 2**40, int(order[rnd.randrange(160)])])
    return assemble(header, bytes(region))


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutate=st.sampled_from([meta_field, array_of_other_shape, array_removed, order_changed]),
       rnd=st.randoms(use_true_random=False))
def test_a_mutated_run_is_resumed_or_refused(made, mutate, rnd):
    """starting.resume of a checkpoint whose metadata or arrays no longer fit the run:
    a LowmemError, or a run ready to go on (the mutation changed nothing it uses)."""
    from lowmem_cnn.training.run import Checkpointing
    from lowmem_cnn.training.starting import AlreadyFinished, resume
    from lowmem_cnn.data.idx import DataOptions

    home, data_dir, original = made
    path = home / "run.ckpt"
    path.write_bytes(mutate(rnd, original))
    try:
        run, _ = resume(Checkpointing(path), BUDGET, DataOptions(data_dir))
    except AlreadyFinished:
        return
    except LowmemError as err:
        assert "\n" not in str(err)
        return
    run.release_locks()
    run.release_memory()


def test_every_setting_of_a_run_is_checked():
    """Each training.Settings field is checked on resume: by run_options' declaration of
    the option, or by checkpoint's own list."""
    from dataclasses import fields

    from lowmem_cnn.files.checkpoint import _run_fields
    from lowmem_cnn.training.run_options import OPTIONS
    from lowmem_cnn.training.run import Settings

    unchecked = [f.name for f in fields(Settings) if f.name not in OPTIONS and f.name not in _run_fields()]
    assert not unchecked


def crafted(original: bytes, change) -> bytes:
    header, region = split(original)
    change(header)
    return assemble(header, region)


def set_first(field, value):
    def change(header):
        header["arrays"][0][field] = value
    return change


def set_meta(path, value):
    return lambda header: replace(header["meta"], path, value)


CHILD_CASES = {
    "object dtype": set_first("dtype", "|O"),
    "huge shape": set_first("shape", [2**40, 2**40]),
    "negative shape": set_first("shape", [-1, 16]),
    "deep nesting": set_meta(("history",), json.loads("[" * 7 + "]" * 7)),
    "no run": lambda header: header["meta"].pop("run"),
    "rng of text": set_meta(("rng",), "PCG64"),
    "negative micro-batch": set_meta(("plan", "micro_batch"), -5),
    "huge threads": set_meta(("run", "threads"), 10**9),
}


@pytest.mark.parametrize("case", sorted(CHILD_CASES))
def test_train_resume_of_a_crafted_checkpoint_says_one_line(made, case):
    home, data_dir, original = made
    work = home / case.replace(" ", "_")
    work.mkdir()
    (work / "bad.ckpt").write_bytes(crafted(original, CHILD_CASES[case]))
    status, stderr, peak = run_child(["train", "--resume", "--checkpoint", "bad.ckpt", "--out", "z.pkl",
                                      "--max-ram", "256M"], work, data_dir)
    assert_one_line_refusal(status, stderr, peak)
    assert "bad.ckpt" in stderr  # refused for the checkpoint, not for anything else
    assert not (work / "z.pkl").exists()


def test_the_unmutated_checkpoint_resumes_in_a_child(made):
    """The harness's control: the real checkpoint, in the same child, resumes to the end."""
    home, data_dir, original = made
    work = home / "control"
    work.mkdir()
    (work / "t.ckpt").write_bytes(original)
    status, stderr, peak = run_child(["train", "--resume", "--checkpoint", "t.ckpt", "--max-ram", "256M"],
                                     work, data_dir)
    assert status == 0, stderr
    assert peak <= BUDGET
