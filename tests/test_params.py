import errno
import os
import pickle
import pickletools
import re
import tracemalloc

import numpy as np
import pytest

from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import chosen_plan
from lowmem_cnn.files.params import load_params, save_params


@pytest.fixture
def network():
    net = Network(load_config().network)
    net.init_params(np.random.default_rng(0))
    return net


def book_dict(seed=1):
    rng = np.random.default_rng(seed)
    shapes = {"W1": (30, 1, 5, 5), "b1": (30,), "W2": (4320, 100), "b2": (100,),
              "W3": (100, 10), "b3": (10,)}
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def test_save_then_load_is_the_same_network(network, tmp_path):
    path = tmp_path / "p.pkl"
    save_params(path, network)
    other = Network(load_config().network)
    load_params(path, other)
    for key, value in network.params().items():
        np.testing.assert_array_equal(other.params()[key], value)
    # what we write is what the book's load_params reads: a plain dict of arrays
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert sorted(raw) == ["W1", "W2", "W3", "b1", "b2", "b3"]
    assert raw["W1"].shape == (30, 1, 5, 5) and raw["W2"].shape == (4320, 100)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class Evil:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('pwned').touch()",))


class Exec:
    def __reduce__(self):
        import builtins

        return (builtins.exec, ("open('pwned', 'w').close()",))


class Sub:
    def __reduce__(self):
        import subprocess

        return (subprocess.call, (["touch", "pwned"],))


@pytest.mark.parametrize("payload", [Boom(), Evil(), Exec(), Sub()])
def test_malicious_pickles_are_refused_before_anything_runs(network, tmp_path, monkeypatch,
                                                            payload):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    params = book_dict()
    params["W1"] = payload
    path.write_bytes(pickle.dumps(params))
    with pytest.raises(LowmemError, match="refused: a pickle can run code"):
        load_params(path, network)
    assert not (tmp_path / "pwned").exists()


BROKEN = {
    "missing key": (lambda d: {k: v for k, v in d.items() if k != "b3"}, "missing b3"),
    "extra key": (lambda d: d.update(W9=np.zeros(3)) or d, "unexpected W9"),
    "wrong shape": (lambda d: d.update(W2=np.zeros((100, 4320))) or d,
                    r"W2 has shape \(100, 4320\), expected \(4320, 100\)"),
    "int dtype": (lambda d: d.update(b1=np.zeros(30, np.int64)) or d, "dtype int64"),
    "complex dtype": (lambda d: d.update(b1=np.zeros(30, complex)) or d, "dtype complex128"),
    "object dtype": (lambda d: d.update(b1=np.array([None] * 30)) or d, "dtype object"),
    "dtype.type smuggled": (lambda d: d.update(b1=np.zeros(30, "U3")) or d, "dtype <U3"),
    "nan": (lambda d: d["W3"].__setitem__((0, 0), np.nan) or d, "NaN or infinity"),
    "infinity": (lambda d: d["b2"].__setitem__(3, np.inf) or d, "NaN or infinity"),
    "a list": (lambda d: list(d.values()), "holds a list"),
    "a string": (lambda d: "W1 b1", "holds a str"),
    "not an array": (lambda d: d.update(W1=[1, 2]) or d, "W1 is a list"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_parameter_files_name_the_problem(network, tmp_path, case):
    make, message = BROKEN[case]
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(make(book_dict())))
    with pytest.raises(LowmemError, match=message) as err:
        load_params(path, network)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"hello, this is not a pickle", "not a parameter file"),
    (None, "not a parameter file"),  # truncated
])
def test_unreadable_parameter_files(network, tmp_path, content, message):
    path = tmp_path / "p.pkl"
    if content is None:
        content = pickle.dumps(book_dict())[:5000]
    path.write_bytes(content)
    with pytest.raises(LowmemError, match=message):
        load_params(path, network)


class DeclaredArray:
    """Pickles as NumPy pickles an array (_reconstruct, then BUILD with the state
    (version, shape, dtype, fortran order, bytes)), with the shapes and bytes given."""

    def __init__(self, shape, data=b"\0" * 24, initial=(0,)):
        self.shape, self.data, self.initial = shape, data, initial

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, self.initial, b"b"),
                (1, self.shape, np.dtype("f8"), False, self.data))


def declared_ints(data: bytes) -> set:
    return {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, int)}


def load_and_trace(path, network):
    """The LowmemError of loading `path`, and the peak bytes allocated meanwhile
    (NumPy reports its arrays' memory to tracemalloc, even when never touched)."""
    tracemalloc.start()
    try:
        with pytest.raises(LowmemError) as err:
            load_params(path, network)
        return str(err.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# 2**31 float64 (16 GiB) could be mapped here without an error, 10**12 (8 TB) not
@pytest.mark.parametrize("elements", [2**31, 10**12])
def test_huge_declared_array_is_refused(network, tmp_path, elements):
    params = book_dict()
    params["W1"] = DeclaredArray((elements,))  # over the 24 bytes actually present
    data = pickle.dumps(params, protocol=4)
    assert elements in declared_ints(data)
    path = tmp_path / "p.pkl"
    path.write_bytes(data)
    message, peak = load_and_trace(path, network)
    # refused for its size, not for anything else about the file (its keys are all there)
    assert re.search(r"\b(size|shape)\b|too (big|large)", message), message
    assert "missing" not in message and "Unable to allocate" not in message
    assert peak < 64 * 2**20


@pytest.mark.parametrize("elements", [2**31, 10**12])
def test_huge_array_declared_to_the_constructor_is_refused_unallocated(network, tmp_path,
                                                                       elements):
    params = book_dict()
    params["W1"] = DeclaredArray((3,), initial=(elements,))
    data = pickle.dumps(params, protocol=4)
    assert elements in declared_ints(data)
    path = tmp_path / "p.pkl"
    path.write_bytes(data)
    message, peak = load_and_trace(path, network)
    assert "Unable to allocate" not in message, message
    assert peak < 64 * 2**20


def test_file_far_larger_than_the_parameters_is_refused_unread(network, tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(book_dict(), protocol=4) * 4)
    message, peak = load_and_trace(path, network)
    assert "far more than" in message
    assert peak < path.stat().st_size // 4  # the file's bytes were never read into memory


def test_disk_full_on_save_keeps_the_old_file(network, tmp_path, monkeypatch):
    path = tmp_path / "p.pkl"
    save_params(path, network)
    before = {name: (tmp_path / name).read_bytes() for name in ("p.pkl", "p.pkl.json")}
    network.init_params(np.random.default_rng(5))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LowmemError, match="cannot write parameter file .*No space left"):
        save_params(path, network)
    # the parameter file and its description, both as they were
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["p.pkl", "p.pkl.json"]  # no temporary file left behind


def test_unwritable_directory_on_save(network, tmp_path):
    with pytest.raises(LowmemError, match="cannot write parameter file"):
        save_params(tmp_path / "no-such-dir" / "p.pkl", network)


def test_book_fixture_on_real_test_set(book_params, mnist_dir):
    from lowmem_cnn.data.idx import open_directory
    from lowmem_cnn.training.evaluation import evaluate

    data = open_directory(mnist_dir)
    predictions = {}
    for dtype in (np.float64, np.float32):
        net = Network(load_config().network, dtype)
        load_params(book_params, net)
        # tiles of 7 images in the fused convolution and pooling
        result = evaluate(net, data.test, chosen_plan(net, 500, 1, (7,)), 10_000)
        assert result.correct == 9600, dtype
        predictions[dtype] = net.predict(data.test.images.read_range(0, 10_000),
                                         chosen_plan(net, 777))
    # float32 rounding may flip an exact tie, nothing more
    assert (predictions[np.float64] != predictions[np.float32]).sum() <= 2
