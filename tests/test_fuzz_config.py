"""Configs as a careless or hostile user writes them: seeded mutations of the shipped
configs (bit flips, truncations, values replaced by extreme or wrong-typed ones, keys
misspelt, binary and deeply nested text inserted). Each is either read as the same
config as the original (where the change did not touch what the TOML says) or refused
with a one-line LowmemError, allocating no more than the file's size and a small bound.
A few go through `lowmem-cnn train` in a child, whose exit status, stderr and peak RSS
are checked."""

import json
import re
import tomllib
import tracemalloc
from importlib import resources

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import refusal_line, run_lowmem
from idx_files import write_dataset
from lowmem_cnn.files.config import describe_network, load_config, network_from_description, shipped_configs
from lowmem_cnn.common.errors import LowmemError

SHIPPED = {name: (resources.files("lowmem_cnn") / "configs" / f"{name}.toml").read_bytes()
           for name in shipped_configs()}
# What tracemalloc may see a read take beyond the file's size: tomllib's dicts and
# strings for a config of 2 KiB (measured peak: 60 to 130 KiB), with room to spare.
READ_ROOM = 512 * 1024

EXTREMES = [b"0", b"-1", b"-0", b"1e308", b"-1e308", b"inf", b"-inf", b"nan", b"2.5",
            b"99999999999999999999999999", b"65537", b"4294967296", b"true", b'"7"', b'""',
            b"[]", b"{}", b"[1, 2, 3]", b'"\\u0000"', b"0x7fffffff", b"1979-05-27T07:32:00Z",
            b"'" + b"x" * 3000 + b"'", b"[" * 60 + b"]" * 60,
            b"{a = {b = {c = {d = {e = {f = {g = {h = {i = 1}}}}}}}}}"]
INSERTS = [b"\x00", b"\xff\xfe", b"\x80abc", bytes(range(256)), b"[" * 5000, b"\na = " + b"[" * 5000,
           b"\na = " + b"{b = " * 3000, b"\n" + b"a." * 3000 + b"a = 1\n", b'\nx = """' + b"[" * 3000,
           b"\n[network]\n", b"\n[[network.layers]]\ntype = \"conv\"\n", b"\n[netwrok]\n",
           b"\n[training]\nepoch = 3\n", b"\nweight_init = 0\n", b"\n" + b"k = 1\n" * 2000]
ASSIGNMENT = re.compile(rb"^([A-Za-z_]+) = (.*)$", re.M)


def _assignments(data):
    return list(ASSIGNMENT.finditer(data))


@st.composite
def mutated_configs(draw):
    """(shipped name, mutated bytes, how)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    data = SHIPPED[name]
    how = draw(st.sampled_from(["flip", "truncate", "value", "key", "insert", "drop line",
                                "repeat line"]))
    if how == "flip":
        at, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
        data = data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how in ("value", "key"):
        line = draw(st.sampled_from(_assignments(data)))
        if how == "value":
            new = line.group(1) + b" = " + draw(st.sampled_from(EXTREMES))
        else:
            key = line.group(1)
            i = draw(st.integers(0, len(key) - 1))
            key = draw(st.sampled_from([key[:i] + key[i + 1 :], key[:i] + key[i : i + 1] * 2 + key[i + 1 :],
                                        key.upper(), key + b"s", b"strid", b"unit", b"filter"]))
            new = (key or b"k") + b" = " + line.group(2)
        data = data[: line.start()] + new + data[line.end() :]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from(INSERTS)) + data[at:]
    else:
        lines = data.split(b"\n")
        i = draw(st.integers(0, len(lines) - 1))
        lines[i : i + 1] = [] if how == "drop line" else [lines[i], lines[i]]
        data = b"\n".join(lines)
    return name, data, how


def _meaning(data: bytes):
    """What the TOML says, as tomllib reads it, types and all (True is not 1 here);
    None: not valid TOML."""
    try:
        return json.dumps(tomllib.loads(data.decode("utf-8")), sort_keys=True, default=repr)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ValueError):
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    directory = tmp_path_factory.mktemp("configs")
    path = directory / "config.toml"
    references = {}
    for name, data in SHIPPED.items():
        path.write_bytes(data)
        references[name] = load_config(str(path))
    return path, references


@settings(max_examples=500, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=mutated_configs())
def test_mutated_configs_are_read_alike_or_refused_in_one_line(scratch, case):
    path, references = scratch
    name, data, how = case
    path.write_bytes(data)
    tracemalloc.start()
    try:
        config = load_config(str(path))
        refused = None
    except LowmemError as err:
        config, refused = None, str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= len(data) + READ_ROOM, (how, peak)
    unchanged = _meaning(data) == _meaning(SHIPPED[name])
    if refused is not None:
        assert "\n" not in refused and str(path) in refused, refused
        assert not unchanged, f"{how}: the same config refused: {refused}"
    elif unchanged:
        assert config == references[name], how
    else:  # another config, but one whose network a parameter file can describe
        network_from_description(describe_network(config.network))


MISTAKES = {
    "strid": (lambda text: text.replace("stride = 2", "strid = 2", 1), "has no strid: did you mean stride?"),
    "network key": (lambda text: text.replace("[network]", "[network]\nnmae = 'x'", 1),
                    "[network] has no nmae: did you mean name?"),
    "training key": (lambda text: text.replace("[training]", "[training]\nepoch = 3", 1),
                     "[training] has no epoch: did you mean epochs?"),
    "layer type": (lambda text: text.replace('"relu"', '"rleu"', 1),
                   "unknown layer type: did you mean relu?"),
    "table name": (lambda text: text.replace("[training]", "[trainig]", 1),
                   "has no trainig: did you mean training?"),
    "deep": (lambda text: text + "a = " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than"),
    "dotted": (lambda text: text + "a" + ".a" * 5000 + " = 1\n", "nests deeper than"),
    "binary": (lambda text: "\udcff\udcfe" + text, "not UTF-8"),
    "bool size": (lambda text: text.replace("filters = 30", "filters = true", 1), "filters = True"),
    "infinite init": (lambda text: text.replace("weight_init = 0.01", "weight_init = inf", 1),
                      "weight_init = inf"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_mistake_is_named(tmp_path, case):
    change, message = MISTAKES[case]
    text = SHIPPED["simple_convnet"].decode()
    path = tmp_path / "bad.toml"
    path.write_bytes(change(text).encode("utf-8", "surrogateescape"))
    with pytest.raises(LowmemError) as caught:
        load_config(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_devices_fifos_and_huge_files_are_refused_unread(tmp_path):
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(8 * 2**30)  # sparse: 8 GiB that take no room
    for path, message in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                          (huge, "more than a config ever holds")):
        with pytest.raises(LowmemError, match=message):
            load_config(str(path))


def test_a_shipped_name_is_never_a_path():
    with pytest.raises(LowmemError, match="no config"):
        load_config("../configs/simple_convnet", shipped_only=True)


@pytest.mark.parametrize("case, message", [
    ("/dev/zero", "not a regular file"), ("deep", "nests deeper"), ("binary", "not UTF-8"),
    ("units", "units = 7"), ("strid", "did you mean stride"),
])
def test_train_refuses_a_bad_config_in_one_line_within_its_budget(tmp_path, case, message):
    text = SHIPPED["simple_convnet"].decode()
    config = tmp_path / "bad.toml"
    if case == "/dev/zero":
        config = "/dev/zero"
    elif case == "units":
        config.write_text(text.replace("units = 10", "units = 7"))
    else:
        config.write_bytes(MISTAKES[case][0](text).encode("utf-8", "surrogateescape"))
    data = write_dataset(tmp_path / "data", n_train=30, n_test=10)
    run = run_lowmem("train", "--config", config, "--max-ram", "256M", "--epochs", "1",
                     "--data-dir", data, "--out", tmp_path / "p.pkl", cwd=tmp_path)
    assert run.returncode == 1
    assert message in refusal_line(run.stderr)
    assert run.peak_rss < 256 * 2**20
    assert not (tmp_path / "p.pkl").exists()
