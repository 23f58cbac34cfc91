"""Fuzzing parameter files: seeded mutations of real pickles (a tiny network's, written by
save_params, in protocols 2 to 5 and big-endian; the book's DeepConvNet file) and of the
description beside one (PATH.json).

A mutated pickle is either read, and then it is what a plain unpickler that may call
NumPy's own rebuilders makes of the same bytes (in native byte order), or refused with
a LowmemError: never another exception, a signal, or an allocation beyond the file's
size and MEMORY_SLACK (protocol 2 keeps each array's bytes three times: the file's,
the text pickle 2 makes of them, and the bytes of that text). A mutated description is
either read as the JSON it is, or refused; the parameters beside it are then read as
they are, or refused. A few go through `lowmem-cnn eval` in a child, whose exit status,
stderr and peak RSS are checked.
"""

import copy
import io
import json
import pickle
import pickletools
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import DEEP_PARAMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_checkpoint import (BUDGET, EXTREMES, MEMORY_SLACK, TINY_CONFIG, Made,
                                  assert_one_line_refusal, flip_bit, replace, run_child,
                                  some_node, truncate)

from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network
from lowmem_cnn.files.description import meta_path, read_description
from lowmem_cnn.files.network_file import network_for
from lowmem_cnn.files.params import param_file_limit, read_checked, save_params
from lowmem_cnn.files.pickles import read_params

FUZZ = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny network's parameter file and description as save_params writes them, the
    same arrays pickled as the book's code would in protocols 2, 3 and 5 and big-endian,
    the book's DeepConvNet file, and a place to work."""
    home = tmp_path_factory.mktemp("fuzz_params")
    (home / "tiny.toml").write_text(TINY_CONFIG)
    network = Network(load_config(str(home / "tiny.toml")).network)
    network.init_params(np.random.default_rng(0))
    save_params(home / "tiny.pkl", network)
    params = network.book_params()
    files = {"protocol 4": (home / "tiny.pkl").read_bytes()}
    for protocol in (2, 3, 5):
        files[f"protocol {protocol}"] = pickle.dumps(params, protocol=protocol)
    big = {key: value.astype(value.dtype.newbyteorder(">")) for key, value in params.items()}
    files["big-endian"] = pickle.dumps(big, protocol=4)
    files["book"] = DEEP_PARAMS.read_bytes()
    return Made((home, network, files))


class Plain(pickle.Unpickler):
    """The standard unpickler, calling only NumPy's own rebuilders: the reference for what
    a file the reader took holds (it is never given one the reader refused)."""

    def find_class(self, module, name):
        import codecs
        from collections import OrderedDict

        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode, ("collections", "OrderedDict"): OrderedDict}
        if (module, name) in allowed:
            return allowed[module, name]
        assert module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                          "numpy._core.numeric") and name in ("_reconstruct", "_frombuffer"), (module, name)
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def read_traced(read, path):
    tracemalloc.start()
    try:
        try:
            result = read(path)
        except LowmemError as err:
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_same_arrays(found: dict, expected: dict):
    assert list(found) == list(expected)
    for key, array in found.items():
        want = expected[key]
        if not isinstance(want, np.ndarray):
            assert not isinstance(array, np.ndarray) and type(array) is type(want), key
            continue
        want = want.astype(want.dtype.newbyteorder("="))
        assert array.dtype == want.dtype and array.dtype.isnative and array.flags.writeable, key
        assert array.shape == want.shape and array.tobytes() == want.tobytes(), key


# --- pickles ---------------------------------------------------------------------------

def spliced(rnd, data):
    """A few bytes deleted, or inserted from elsewhere in the file."""
    at, length = rnd.randrange(len(data)), rnd.randint(1, 16)
    if rnd.random() < 0.5:
        return data[:at] + data[at + length :]
    other = rnd.randrange(len(data))
    return data[:at] + data[other : other + length] + data[at:]


# Where an instruction's argument is a number: its bytes, packed as the pickle packs them.
NUMBERED = {"BININT1": "<B", "BININT2": "<H", "BININT": "<i", "SHORT_BINBYTES": "<B", "BINBYTES": "<I",
            "BINBYTES8": "<Q", "BYTEARRAY8": "<Q", "SHORT_BINUNICODE": "<B", "BINUNICODE": "<I",
            "BINGET": "<B", "LONG_BINGET": "<I", "BINPUT": "<B", "LONG_BINPUT": "<I", "FRAME": "<Q",
            "PROTO": "<B"}
HUGE = [0, 1, 2, 3, 4, 7, 255, 2**16 - 1, 2**31 - 1, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


def number_changed(rnd, data):
    """A shape, a length, a memo index or a protocol replaced by an extreme value."""
    found = [(op.name, pos) for op, _, pos in pickletools.genops(data) if op.name in NUMBERED]
    name, pos = rnd.choice(found)
    form = NUMBERED[name]
    size = struct.calcsize(form)
    bits = 8 * size
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if form == "<i" else (0, 2**bits - 1)
    value = min(max(rnd.choice(HUGE + [-1, -(2**31)]), low), high)
    return data[: pos + 1] + struct.pack(form, value) + data[pos + 1 + size :]


# Texts a file names, each with others of its length (so the pickle stays whole): dtypes
# of other kinds, other byte orders, other modules and functions.
SAME_LENGTH = {b"f8": [b"O8", b"c8", b"U8", b"V8", b"M8", b"S8", b"f4", b"i8", b"b1", b"u8", b"f2"],
               b"f4": [b"O4", b"c8", b"U4", b"V4", b"m8", b"f8", b"i4", b"u4"],
               b"\x01<": [b"\x01>", b"\x01|", b"\x01=", b"\x01!"],
               b"numpy": [b"posix", b"numpz", b"os\x00\x00\x00"],
               b"_reconstruct": [b"_frombuffer\x00", b"__import__xx", b"_reconstrucT"],
               b"ndarray": [b"ndarrax", b"matrix\x00", b"recarra"], b"dtype": [b"print", b"dtypf"],
               b"encode": [b"decode", b"system"], b"_frombuffer": [b"_reconstruc", b"frombuffer_"]}


def text_changed(rnd, data):
    found = [(old, m.start()) for old in SAME_LENGTH for m in re.finditer(re.escape(old), data)]
    if not found:
        return flip_bit(rnd, data)
    old, at = rnd.choice(found)
    return data[:at] + rnd.choice(SAME_LENGTH[old]) + data[at + len(old) :]


PICKLE_MUTATIONS = [flip_bit, truncate, spliced, number_changed, text_changed]


@FUZZ
@given(kind=st.sampled_from(["protocol 4"] * 4 + ["protocol 2", "protocol 3", "protocol 5", "big-endian",
                                                   "book"]),
       mutate=st.sampled_from(PICKLE_MUTATIONS), rnd=st.randoms(use_true_random=False))
def test_a_mutated_pickle_is_read_as_it_is_or_refused(made, kind, mutate, rnd):
    home, network, files = made
    data = mutate(rnd, files[kind])
    path = home / "mutated.pkl"
    path.write_bytes(data)
    result, peak = read_traced(lambda p: read_params(p, len(data) + 1), path)
    copies = 3 if kind == "protocol 2" else 1
    assert peak <= copies * len(data) + MEMORY_SLACK, (kind, mutate.__name__, peak, len(data))
    if isinstance(result, LowmemError):
        assert "\n" not in str(result)
        return
    assert_same_arrays(result, Plain(io.BytesIO(data)).load())
    if kind != "book":  # what eval and the book's load_params do next: taken, or refused
        try:
            read_checked(path, network.expected_book_shapes(), param_file_limit(network))
        except LowmemError as err:
            assert "\n" not in str(err)


@pytest.mark.parametrize("kind", ["protocol 2", "protocol 3", "protocol 4", "protocol 5", "big-endian",
                                  "book"])
def test_every_protocol_and_byte_order_reads_the_same_arrays(made, kind):
    home, network, files = made
    path = home / f"{kind}.pkl"
    path.write_bytes(files[kind])
    found = read_params(path, len(files[kind]))
    assert_same_arrays(found, Plain(io.BytesIO(files[kind])).load())
    if kind != "book":
        assert_same_arrays(found, network.book_params())


# --- descriptions ----------------------------------------------------------------------

LAYER_VALUES = [0, -1, 2**16, 2**16 + 1, 10**9, 2**63, 0.5, 1.0, None, "3", [3], True]


def description_value(rnd, text):
    description = json.loads(text)
    path, _ = some_node(rnd, description)
    pool = LAYER_VALUES if "layers" in path or "input_shape" in path else EXTREMES
    return json.dumps(replace(description, path, copy.deepcopy(rnd.choice(pool)))).encode()


def description_key(rnd, text):
    description = json.loads(text)
    _, node = some_node(rnd, description, containers=True)
    if isinstance(node, dict) and node and rnd.random() < 0.5:
        del node[rnd.choice(list(node))]
    elif isinstance(node, dict):
        node[rnd.choice(["training", "config", "extra", "filters", "type", "classes"])] = \
            copy.deepcopy(rnd.choice(EXTREMES))
    elif node and rnd.random() < 0.5:
        del node[rnd.randrange(len(node))]
    else:
        node.append(copy.deepcopy(rnd.choice(node or EXTREMES)))
    return json.dumps(description).encode()


def description_bytes(rnd, text):
    text = bytearray(text)
    for _ in range(rnd.randint(1, 4)):
        text[rnd.randrange(len(text))] = rnd.choice(b'{}[]",:0123456789-eE.tfn\\ \x00\xff')
    return bytes(text)


def description_nested(rnd, text):
    description = json.loads(text)
    path, _ = some_node(rnd, description)
    depth = rnd.choice([4, 9, 1000, 100_000])
    return json.dumps(replace(description, path, "@")).replace('"@"', "[" * depth + "]" * depth).encode()


def description_field_twice(rnd, text):
    key = rnd.choice([b'"name"', b'"sha256"', b'"layers"', b'"version"'])
    return text.replace(b"{", b"{" + key + b": 1, ", 1)


DESCRIPTION_MUTATIONS = [description_value, description_key, description_bytes, description_nested,
                         description_field_twice, lambda rnd, text: truncate(rnd, text),
                         lambda rnd, text: flip_bit(rnd, text)]


@FUZZ
@given(mutate=st.sampled_from(DESCRIPTION_MUTATIONS), rnd=st.randoms(use_true_random=False))
def test_a_mutated_description_is_read_as_it_is_or_refused(made, mutate, rnd):
    home, network, files = made
    text = meta_path(home / "tiny.pkl").read_bytes()
    path = home / "described.pkl"
    path.write_bytes(files["protocol 4"])
    mutated = mutate(rnd, text)
    meta_path(path).write_bytes(mutated)
    result, peak = read_traced(read_description, path)
    assert peak <= len(mutated) + MEMORY_SLACK, (peak, len(mutated))
    if isinstance(result, LowmemError):
        assert "\n" not in str(result)
        return
    assert json.dumps(result) == json.dumps(json.loads(mutated))
    # the parameters beside it: as they are, or refused (the description no longer fits)
    try:
        params = read_checked(path, network.expected_book_shapes(), param_file_limit(network))
    except LowmemError as err:
        assert "\n" not in str(err)
    else:
        assert_same_arrays(params, network.book_params())
    try:
        network_for(path)
    except LowmemError as err:
        assert "\n" not in str(err)


# --- in a child: lowmem-cnn eval ---------------------------------------------------------


class Calls:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def with_array(made, key, value, protocol=4):
    _, network, _ = made
    params = network.book_params()
    params[key] = value
    return pickle.dumps(params, protocol=protocol)


def w2_rows(made, rows: int) -> bytes:
    """The protocol-3 file (no frames to keep whole) with W2's declared shape (144, 10)
    made (rows, 10), its bytes as they are."""
    data = made[2]["protocol 3"]
    assert data.count(b"K\x90K\n\x86") == 1
    return data.replace(b"K\x90K\n\x86", b"J" + struct.pack("<i", rows) + b"K\n\x86")


def described(made, change) -> tuple:
    """The real pickle, and its description changed by `change` (of the parsed JSON, or
    giving the text)."""
    home, _, files = made
    description = json.loads(meta_path(home / "tiny.pkl").read_text())
    text = change(description)
    return files["protocol 4"], (text or json.dumps(description)).encode()


def huge_layers(description):
    description["layers"][-1]["units"] = 2**16
    description["layers"].append({"type": "affine", "units": 2**16})


EVAL_CASES = {  # (the pickle, its description or None)
    "object dtype": lambda made: (with_array(made, "b1", np.array([None] * 4)), None),
    "complex dtype": lambda made: (with_array(made, "b1", np.zeros(4, complex)), None),
    "huge shape": lambda made: (w2_rows(made, 2**31 - 1), None),
    "negative shape": lambda made: (w2_rows(made, -144), None),
    "runs a command": lambda made: (with_array(made, "W1", Calls(__import__("os").system, "touch pwned")),
                                    None),
    "truncated": lambda made: (made[2]["protocol 4"][:-100], None),
    "description of a huge network": lambda made: described(made, huge_layers),
    "description nested deep": lambda made: described(
        made, lambda d: json.dumps({**d, "layers": "@"}).replace('"@"', "[" * 10**5 + "]" * 10**5)),
    "description of 300 classes": lambda made: described(
        made, lambda d: d.update(classes=[f"c{i}" for i in range(300)])),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval_of_a_crafted_file_says_one_line(made, case):
    home, _, files = made
    work = home / case.replace(" ", "_")
    work.mkdir()
    pickled, description = EVAL_CASES[case](made)
    (work / "bad.pkl").write_bytes(pickled)
    if description is not None:
        (work / "bad.pkl.json").write_bytes(description)
    status, stderr, peak = run_child(["eval", "bad.pkl", "--max-ram", "256M"], work,
                                     write_dataset_once(home))
    assert_one_line_refusal(status, stderr, peak)
    assert "bad.pkl" in stderr and not (work / "pwned").exists()


def write_dataset_once(home: Path) -> Path:
    from idx_files import write_dataset

    directory = home / "data"
    if not directory.exists():
        write_dataset(directory, n_train=20, n_test=20)
    return directory


def test_eval_reads_every_protocol_and_byte_order_alike(made):
    """The harness's control, and the big-endian file's fix: each file, in a child, gives
    the same accuracy, within the budget."""
    home, _, files = made
    accuracies = set()
    for kind in ("protocol 4", "big-endian", "protocol 2", "protocol 5"):
        work = home / f"eval_{kind.replace(' ', '_')}"
        work.mkdir()
        (work / "p.pkl").write_bytes(files[kind])
        status, stderr, peak = run_child(["eval", "p.pkl", "--config", home / "tiny.toml", "--max-ram",
                                          "256M", "--json"], work, write_dataset_once(home))
        assert status == 0 and peak <= BUDGET, (kind, stderr)
        accuracies.add(json.loads((work / "stdout.txt").read_text().splitlines()[-1])["accuracy"])
    assert len(accuracies) == 1


def test_the_most_a_crafted_pickle_makes_the_reader_hold(made):
    """Its memo full of views of empty bytes (each set into the dict, so the stack stays
    small): 4.0 MiB measured; one more value remembered is refused."""
    from lowmem_cnn.files.pickles import _MOST_MEMO

    home = made[0]
    start = b"\x80\x04}\x8c\x01a\x94N\x94s"  # {} and 'a' and None remembered as 0 and 1
    path = home / "memo.pkl"
    for extra, refused in ((0, False), (1, True)):
        data = start + b"h\x00C\x00\x94s" * (_MOST_MEMO - 2 + extra) + b"."
        path.write_bytes(data)
        result, peak = read_traced(lambda p: read_params(p, 10**7), path)
        assert isinstance(result, LowmemError) == refused, result
        assert peak <= len(data) + 5 * 2**20
