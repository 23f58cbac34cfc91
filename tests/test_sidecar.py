"""Issue 23: a parameter file describes its own network in PATH.json beside it, so eval,
predict and export need no --config; a file without one is matched against the shipped
configs; and the description, which travels with a shared file, is untrusted input."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, run_lowmem, run_python
from idx_files import write_dataset
from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.files.description import meta_path, read_description
from lowmem_cnn.files.network_file import network_for
from lowmem_cnn.files.params import load_params, save_params, write_params
from lowmem_cnn.files.pickles import read_params

SIMPLE_TOML = ROOT / "configs" / "simple_convnet.toml"


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def last_json(done):
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_error_line(done, *names):
    """The command failed with exit status 1 and one line on stderr, naming `names`."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


# --- a network trained with a config of one's own travels without it ---------------------


def test_a_custom_config_evaluates_from_another_folder_with_the_toml_gone(tmp_path, mnist_dir):
    trained_in, shared_to = tmp_path / "mine", tmp_path / "elsewhere"
    trained_in.mkdir()
    shared_to.mkdir()
    toml = trained_in / "mine.toml"
    toml.write_text(SIMPLE_TOML.read_text().replace("filters = 30", "filters = 8"))
    trained = run_lowmem("train", "--config", "mine.toml", "--epochs", "1", "--limit", "2000",
                         "--out", "m.pkl", "--max-ram", "512M", "--json", "--data-dir", mnist_dir,
                         cwd=trained_in)
    assert trained.returncode == 0, trained.stderr
    accuracy = last_json(trained)["test_accuracy"]
    assert accuracy > 0.3  # ten classes: chance is 0.1
    pickle_bytes = (trained_in / "m.pkl").read_bytes()
    description = json.loads((trained_in / "m.pkl.json").read_text())
    # the network itself, not the config's name or path
    assert description["layers"][0] == {"type": "conv", "filters": 8, "size": 5, "stride": 1, "pad": 0}
    assert description["input_shape"] == [1, 28, 28] and description["classes"] is None
    assert description["dtype"] == "float32"
    assert description["sha256"] == hashlib.sha256(pickle_bytes).hexdigest()
    assert "mine" not in (trained_in / "m.pkl.json").read_text()
    for name in ("m.pkl", "m.pkl.json"):
        (shared_to / name).write_bytes((trained_in / name).read_bytes())
    toml.unlink()
    evaluated = run_lowmem("eval", "m.pkl", "--max-ram", "512M", "--json", "--data-dir", mnist_dir,
                           cwd=shared_to)
    assert evaluated.returncode == 0, evaluated.stderr
    assert last_json(evaluated)["accuracy"] == pytest.approx(accuracy)
    # the same file without its description: no shipped config has 8 filters, and it says so
    (shared_to / "m.pkl.json").unlink()
    refused = run_lowmem("eval", "m.pkl", "--max-ram", "512M", "--data-dir", mnist_dir, cwd=shared_to)
    line = one_error_line(refused, "m.pkl")
    assert "closest: simple_convnet" in line and "(8, 1, 5, 5)" in line and "--config" in line


def test_the_books_deep_convnet_file_needs_no_config(tmp_path, mnist_dir, deep_params):
    assert not meta_path(deep_params).exists()  # matched against the shipped configs
    before = snapshot(deep_params.parent)
    done = run_lowmem("eval", deep_params, "--batch-size", "10000", "--max-ram", "512M", "--json",
                      "--data-dir", mnist_dir, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (last_json(done)["correct"], last_json(done)["n"]) == (9797, 10000)
    assert snapshot(deep_params.parent) == before  # nothing written beside the book's files


def test_without_a_description_the_shipped_config_of_its_shapes(tmp_path, book_params):
    params = read_params(book_params, 10**8)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(params))
    assert network_for(path)[0].name == "SimpleConvNet"
    params["W9"] = np.zeros(3)
    path.write_bytes(pickle.dumps(params))
    with pytest.raises(LowmemError, match=r"closest: simple_convnet, against which unexpected W9.*"
                                          r"--config"):
        network_for(path)
    assert network_for(path, "simple_convnet")[1] is None  # --config: the user's word


# --- writing: both files, atomically, in an order no reader misreads ------------------------


@pytest.fixture
def pair(tmp_path, book_params):
    """The book's SimpleConvNet file with its description, as write_params makes them."""
    path = tmp_path / "p.pkl"
    write_params(path, read_params(book_params, 10**8), load_config().network, np.float32)
    return path


def test_the_description_names_the_pickle_it_was_written_with(pair):
    description = json.loads(meta_path(pair).read_text())
    assert set(description) == {"version", "name", "input_shape", "layers", "classes", "dtype",
                                "sha256"}
    assert description["sha256"] == hashlib.sha256(pair.read_bytes()).hexdigest()
    assert read_description(pair) == description
    config, found = network_for(pair)
    assert found == description and config.layers == tuple(description["layers"])


def test_a_failed_description_write_keeps_both_old_files(pair, monkeypatch):
    import errno

    from lowmem_cnn.engine.model import Network

    before = snapshot(pair.parent)
    network = Network(load_config().network)
    network.init_params(np.random.default_rng(3))
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the pickle's went through; the description's fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LowmemError, match="description .*No space left"):
        save_params(pair, network)
    assert snapshot(pair.parent) == before  # no new pickle beside the old description


def test_a_pickle_rewritten_without_its_description_is_refused(pair):
    from lowmem_cnn.engine.model import Network

    params = read_params(pair, 10**8)
    params["b1"] = params["b1"] + 1
    pair.write_bytes(pickle.dumps(params))  # as a script with plain pickle would
    with pytest.raises(LowmemError, match=r"p\.pkl\.json: describes another version of p\.pkl"):
        load_params(pair, Network(load_config().network))


def test_the_books_classes_write_and_read_the_description(tmp_path):
    from lowmem_cnn.book import SimpleConvNet

    np.random.seed(0)
    net = SimpleConvNet(conv_param={"filter_num": 6, "filter_size": 5, "pad": 0, "stride": 1},
                        hidden_size=20, max_ram="2G")
    path = tmp_path / "small.pkl"
    net.save_params(path)
    config, _ = network_for(path)  # the command line knows the network from the file alone
    assert config.layers[0]["filters"] == 6 and config.layers[3]["units"] == 20
    other = SimpleConvNet(conv_param={"filter_num": 6, "filter_size": 5, "pad": 0, "stride": 1},
                          hidden_size=20, max_ram="2G")
    other.load_params(path)
    np.testing.assert_array_equal(other.params["W1"], net.params["W1"])
    meta_path(path).write_text("[" * 100_000 + "]" * 100_000)  # read as the command line reads it
    with pytest.raises(LowmemError, match="small.pkl.json: .*nests deeper"):
        other.load_params(path)


def test_folder_networks_keep_their_classes_and_brackets_in_names_are_text(tmp_path, book_params):
    from lowmem_cnn.session import network_config

    classes = [f"[[[[[[[[[[{k}" for k in range(10)]  # brackets in strings do not nest
    config = load_config().network.for_data((1, 28, 28), classes)
    path = tmp_path / "p.pkl"
    write_params(path, read_params(book_params, 10**8), config, np.float64)
    config, meta = network_config(None, path)
    assert config.class_names == tuple(classes) and meta["classes"] == classes
    assert meta["dtype"] == "float64"
    digits = tmp_path / "d.pkl"
    write_params(digits, read_params(book_params, 10**8), load_config().network, np.float32)
    assert network_config(None, digits)[1] is None  # MNIST's digits: no classes to name


def test_config_given_must_be_the_described_network(pair):
    assert network_for(pair, "simple_convnet")[0].layers == network_for(pair)[0].layers
    with pytest.raises(LowmemError, match="another network than --config deep_convnet"):
        network_for(pair, "deep_convnet")


def test_an_earlier_description_naming_a_shipped_config_still_works(pair):
    classes = [f"c{k}" for k in range(10)]
    meta_path(pair).write_text(json.dumps({"classes": classes, "input_shape": [1, 28, 28],
                                           "config": "simple_convnet"}))
    config, meta = network_for(pair)
    assert config.name == "SimpleConvNet" and config.class_names == tuple(classes)


# --- resume: the network the run began with ---------------------------------------------------


def test_resume_trains_the_recorded_network_with_its_toml_changed(tmp_path):
    from test_checkpoint import CRASH_CHILD

    data = write_dataset(tmp_path / "data", n_train=200, n_test=50)
    toml = SIMPLE_TOML.read_text().replace("filters = 30", "filters = 8")
    args = ["train", "--config", "mine.toml", "--data-dir", data, "--epochs", "2", "--limit", "200",
            "--batch-size", "50", "--checkpoint-every", "2", "--max-ram", "256M"]
    solo, crashed = tmp_path / "solo", tmp_path / "crashed"
    for directory in (solo, crashed):
        directory.mkdir()
        (directory / "mine.toml").write_text(toml)
    assert run_lowmem(*args, cwd=solo).returncode == 0
    killed = subprocess.run([sys.executable, str(CRASH_CHILD), "--at-update", "5", "--",
                             *map(str, args)], cwd=crashed, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    (crashed / "mine.toml").write_text(toml.replace("filters = 8", "filters = 12"))
    resumed = run_lowmem("train", "--resume", "--data-dir", data, cwd=crashed)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("params.pkl", "params.pkl.json"):
        assert (crashed / name).read_bytes() == (solo / name).read_bytes(), name


# --- hostile descriptions: one line, exit 1, in a child process --------------------------------


@pytest.fixture
def idx_data(tmp_path):
    return write_dataset(tmp_path / "data", n_train=20, n_test=20)


def run_eval(pair, idx_data, timeout=120):
    return run_lowmem("eval", pair, "--data-dir", idx_data, "--max-ram", "256M", cwd=pair.parent,
                      timeout=timeout)


def test_the_untouched_pair_evaluates(pair, idx_data):
    """What every hostile case changes one thing of: without the change, it works."""
    done = run_eval(pair, idx_data)
    assert done.returncode == 0, done.stderr


def edited(change):
    def edit(path):
        description = json.loads(meta_path(path).read_text())
        change(description)
        meta_path(path).write_text(json.dumps(description))
    return edit


def written(data: bytes):
    return lambda path: meta_path(path).write_bytes(data)


def fifo(path):
    meta_path(path).unlink()
    os.mkfifo(meta_path(path))


def to_dev_zero(path):
    meta_path(path).unlink()
    meta_path(path).symlink_to("/dev/zero")


def huge_class_name(path):
    description = json.loads(meta_path(path).read_text())
    description["classes"] = ["x" * 50_000_000] + [str(k) for k in range(1, 10)]
    meta_path(path).write_text(json.dumps(description))


def stale(path):
    params = read_params(path, 10**8)
    params["W1"] = params["W1"] * 0.5
    path.write_bytes(pickle.dumps(params))


HOSTILE = {
    "a config path (an earlier format)": (written(json.dumps(
        {"classes": [str(k) for k in range(10)], "input_shape": [1, 28, 28],
         "config": "/etc/passwd"}).encode()), "not one that comes with lowmem-cnn"),
    "a config path as an extra field": (edited(lambda d: d.update(config="/etc/passwd")),
                                        "unknown field config"),
    "100,000 nested brackets": (written(b"[" * 100_000 + b"]" * 100_000), "nests deeper"),
    "a 50 MB class name": (huge_class_name, "bytes, more than"),
    "invalid UTF-8": (written(b'{"name": "\xff\xfe"}'), "not UTF-8"),
    "a symlink to /dev/zero": (to_dev_zero, "not a regular file"),
    "a FIFO": (fifo, "not a regular file"),
    "not JSON": (written(b"{'version': 1"), "not valid JSON"),
    "a JSON list": (written(b"[]"), "not a JSON object"),
    "empty": (written(b""), "not valid JSON"),
    "NaN": (edited(lambda d: d["layers"].insert(5, {"type": "dropout", "ratio": float("nan")})),
            "NaN is not a number JSON has"),
    "a field twice": (written(b'{"version": 1, "version": 1}'), "given twice"),
    "a newer format": (edited(lambda d: d.update(version=2)), "newer lowmem-cnn"),
    "a missing field": (edited(lambda d: d.pop("layers")), "missing layers"),
    "mismatched shapes": (edited(lambda d: d.update(input_shape=[1, 32, 32])),
                          r"make W2 \(5880, 100\), but p.pkl has W2 of shape \(4320, 100\)"),
    "more layers than the file has parameters": (
        edited(lambda d: d["layers"].insert(4, {"type": "affine", "units": 50})),
        r"make W3 \(100, 50\), but p.pkl has W3 of shape \(100, 10\)"),
    "a network far larger than the file": (
        edited(lambda d: d["layers"][3].update(units=60_000)), "more than p.pkl's"),
    "classes that do not fit the outputs": (edited(lambda d: d.update(classes=["a", "b", "c"])),
                                            "3 classes for 10 scores"),
    "a class name with control characters": (
        edited(lambda d: d.update(classes=["\x1b[2J"] + [str(k) for k in range(1, 10)])),
        "is not a printable name"),
    "a class named twice": (edited(lambda d: d.update(classes=["a"] * 10)), "a class twice"),
    "an unknown layer type": (edited(lambda d: d["layers"][1].update(type="os.system")),
                              "layer 2: not a layer of type"),
    "an unknown layer setting": (edited(lambda d: d["layers"][0].update(path="/etc/passwd")),
                                 "no setting path"),
    "a missing layer setting": (edited(lambda d: d["layers"][0].pop("filters")), "missing filters"),
    "a size out of bounds": (edited(lambda d: d["layers"][0].update(size=10**12)),
                             "up to 65,536"),
    "a negative pad": (edited(lambda d: d["layers"][0].update(pad=-1)), "non-negative"),
    "a ratio of 1": (edited(lambda d: d["layers"].insert(5, {"type": "dropout", "ratio": 1})),
                     r"not a number in \[0, 1\)"),
    "a momentum above 1": (edited(lambda d: d["layers"].insert(1, {"type": "batchnorm",
                                                                    "momentum": 1.5})),
                           r"not a number in \[0, 1\)"),
    "a filter larger than the input": (edited(lambda d: d["layers"][0].update(size=30)),
                                       "larger than its 28x28 input"),
    "a stale description": (stale, "describes another version of p.pkl"),
}
# a wrong type for every field, and for every kind of layer setting
WRONG_TYPES = {
    "version": "1", "name": 5, "input_shape": "1x28x28", "layers": {"type": "conv"},
    "classes": "0123456789", "dtype": 32, "sha256": 123,
}
for _field, _value in WRONG_TYPES.items():
    HOSTILE[f"{_field} of a wrong type"] = (
        edited(lambda d, f=_field, v=_value: d.update({f: v})), f"{_field} ")
HOSTILE.update({
    "a layer that is a list": (edited(lambda d: d["layers"].__setitem__(0, ["conv"])),
                               "layer 1: not a layer"),
    "a layer type that is a number": (edited(lambda d: d["layers"][0].update(type=3)),
                                      "layer 1: not a layer"),
    "filters as text": (edited(lambda d: d["layers"][0].update(filters="30")),
                        "filters = '30' is not a positive whole number"),
    "filters as a boolean": (edited(lambda d: d["layers"][0].update(filters=True)),
                             "filters = True"),
    "filters as a fraction": (edited(lambda d: d["layers"][0].update(filters=30.5)),
                              "filters = 30.5"),
    "a ratio as text": (edited(lambda d: d["layers"].insert(5, {"type": "dropout", "ratio": "0.5"})),
                        "ratio = '0.5'"),
    "a class that is a number": (edited(lambda d: d.update(classes=list(range(10)))),
                                 "class 0 is not a printable name"),
    "an input shape of fractions": (edited(lambda d: d.update(input_shape=[1.0, 28, 28])),
                                    "input_shape"),
})


TRAINING = {"augment": "flip,crop:2", "weight_decay": 0.0001, "lr_schedule": "cosine", "warmup": 1,
            "val_split": 0.1, "epoch": 3}
HOSTILE.update({
    "a training record that is a list": (edited(lambda d: d.update(training=[1])),
                                         "training is not an object"),
    "a training record with an extra field": (
        edited(lambda d: d.update(training={**TRAINING, "path": "/etc/passwd"})),
        "training is not an object"),
    "an unknown augmentation": (edited(lambda d: d.update(training={**TRAINING, "augment": "rm -rf"})),
                                "augment 'rm -rf' is not one"),
    "an unknown schedule": (edited(lambda d: d.update(training={**TRAINING, "lr_schedule": 7})),
                            "lr_schedule 7"),
    "a weight decay as text": (edited(lambda d: d.update(training={**TRAINING, "weight_decay": "0"})),
                               "weight_decay '0'"),
    "a validation share above 1": (edited(lambda d: d.update(training={**TRAINING, "val_split": 2})),
                                   "val_split 2"),
    "an epoch of 0": (edited(lambda d: d.update(training={**TRAINING, "epoch": 0})), "epoch 0"),
})


def test_how_the_parameters_were_trained_is_recorded_and_read(tmp_path, book_params):
    path = tmp_path / "t.pkl"
    write_params(path, read_params(book_params, 10**8), load_config().network, np.float32, TRAINING)
    assert read_description(path)["training"] == TRAINING


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_description_is_one_line_naming_it(pair, idx_data, case):
    damage, message = HOSTILE[case]
    damage(pair)
    before = snapshot(pair.parent)
    done = run_eval(pair, idx_data, timeout=60)  # a reader that waited on the FIFO fails here
    line = one_error_line(done, pair.name)
    assert __import__("re").search(message, line), line
    assert len(line) < 600  # a hostile file does not make the message long
    assert snapshot(pair.parent) == before  # nothing the user had is changed


# An open of the path given makes the command exit 99: a path from the description is never
# opened, whatever it names (here a valid config, which the earlier reader would have used).
NEVER_OPENS = """
import os, sys
forbidden = os.path.realpath(sys.argv[1])

def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        if os.path.realpath(os.fsdecode(args[0])) == forbidden:
            os._exit(99)

sys.addaudithook(hook)
from lowmem_cnn.cli import main
sys.argv = ["lowmem-cnn", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("form", ["earlier", "extra field"])
def test_a_path_in_the_description_is_never_opened(pair, idx_data, form):
    evil = pair.parent / "evil.toml"
    evil.write_text(SIMPLE_TOML.read_text())
    if form == "earlier":
        written(json.dumps({"classes": [str(k) for k in range(10)], "input_shape": [1, 28, 28],
                            "config": str(evil)}).encode())(pair)
    else:
        edited(lambda d: d.update(config=str(evil)))(pair)
    # the hook works: the config given on the command line is opened
    opened = run_python("-c", textwrap.dedent(NEVER_OPENS), evil, "profile-memory", "--config",
                        evil, "--batch-size", "10", "--data-dir", idx_data, "--max-ram", "256M",
                        cwd=pair.parent)
    assert opened.returncode == 99, opened.stderr
    for command in (["eval", pair, "--data-dir", idx_data], ["predict", pair, pair]):
        done = run_python("-c", textwrap.dedent(NEVER_OPENS), evil, *command, "--max-ram", "256M",
                          cwd=pair.parent)
        one_error_line(done, "p.pkl.json")
