"""`lowmem-cnn export` and the book's save_onnx: the ONNX model run by onnxruntime gives
the engine's predictions, image for image, and its scores within 1e-4."""

import json
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import need_module, run_lowmem, run_python
from test_cli import error_line
from test_folder_cli import WORDS, named_folder

import lowmem_cnn
from lowmem_cnn.engine import layer_types, layers
from lowmem_cnn.cli import main
from lowmem_cnn.files.config import load_config
from lowmem_cnn.data.idx import DataOptions
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network
from lowmem_cnn.files.params import load_params, save_params
from lowmem_cnn.memory.planner import chosen_plan
from lowmem_cnn.session import Session

SCORE_TOLERANCE = 1e-4
MIB = 2**20

# Every layer kind a config can name, in every place the export treats apart: a
# convolution fused with its pooling (ReLU between: swapped behind the pooling), one
# of stride 2 and one of more than 4 channels (not fused), an overlapping pooling,
# batch normalization and dropout on a map and on a vector, affine after a map and
# after a vector.
EVERY_KIND = """
[network]
name = "every-kind"
input_shape = [1, 28, 28]
weight_init = "he"

[[network.layers]]
type = "conv"
filters = 4
size = 3
pad = 1

[[network.layers]]
type = "relu"

[[network.layers]]
type = "pool"
size = 2

[[network.layers]]
type = "batchnorm"

[[network.layers]]
type = "conv"
filters = 6
size = 3
stride = 2
pad = 1

[[network.layers]]
type = "dropout"
ratio = 0.3

[[network.layers]]
type = "relu"

[[network.layers]]
type = "pool"
size = 3
stride = 2

[[network.layers]]
type = "conv"
filters = 8
size = 2

[[network.layers]]
type = "affine"
units = 20

[[network.layers]]
type = "batchnorm"

[[network.layers]]
type = "relu"

[[network.layers]]
type = "dropout"
ratio = 0.5

[[network.layers]]
type = "affine"
units = 10
"""


@pytest.fixture(scope="module")
def ort():
    need_module("onnx")
    return need_module("onnxruntime")


@pytest.fixture(scope="module")
def baseline_rss():
    """The command line's own peak RSS: the interpreter, NumPy, click (`--version`)."""
    return run_lowmem("--version").peak_rss


def onnx_run(ort, path, images, input_shape, batch=500):
    """The model's output for uint8 rows (n, C*H*W), fed as pixels / 255 in NCHW."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c, h, w = input_shape
    parts = []
    for lo in range(0, len(images), batch):
        x = images[lo : lo + batch].reshape(-1, c, h, w).astype(np.float32) / np.float32(255)
        parts.append(session.run(None, {"input": x})[0])
    return np.concatenate(parts)


def metadata(ort, path) -> dict:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) \
        .get_modelmeta().custom_metadata_map


def export(*args, cwd):
    done = run_lowmem("export", *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ") and len(done.stdout.splitlines()) == 1
    return done


def evaluated(params, data_dir, cwd, *options) -> dict:
    done = run_lowmem("eval", params, "--data-dir", data_dir, "--json", "--max-ram", "512M",
                      *options, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def compare(ort, model, network, split, ties_allowed=False, count=None, run=onnx_run):
    """onnxruntime (or `run`) against the engine on every image of `split` (or the
    first `count`): the scores within SCORE_TOLERANCE, the predictions image for image
    (ties_allowed: where the engine's two best scores are closer than twice the
    tolerance, either is accepted). Returns the predictions."""
    n = len(split) if count is None else count
    images = split.images.read_range(0, n)
    engine = network.predict_scores(images, chosen_plan(network, 100), split.images.pixels)
    found = run(ort, model, images, network.config.input_shape)
    assert found.shape == engine.shape
    assert np.abs(found - engine).max() <= SCORE_TOLERANCE
    predicted = found.argmax(axis=1)
    differ = predicted != engine.argmax(axis=1)
    if ties_allowed:
        best_two = np.sort(engine, axis=1)[:, -2:]
        near = best_two[:, 1] - best_two[:, 0] < 2 * SCORE_TOLERANCE
        assert near.sum() < n // 100  # random weights, yet a real comparison
        rows = np.flatnonzero(differ)
        assert near[rows].all() and (engine[rows, predicted[rows]] >= best_two[rows, 0]).all()
    else:
        assert not differ.any(), f"{differ.sum()} images differ, the first {np.flatnonzero(differ)[:10]}"
    return predicted


def confusion(labels, predicted, classes):
    return np.bincount(labels.astype(np.int64) * classes + predicted,
                       minlength=classes * classes).reshape(classes, classes).tolist()


def mnist_session(mnist_dir, config_name, params):
    run = Session(1 << 30, config_name, "float32", 1, DataOptions(mnist_dir), params)
    load_params(params, run.network)
    return run.network, run.open_data().test


# --- the book's files ----------------------------------------------------------------


@pytest.mark.parametrize("which, config, correct", [("simple", None, 9600),
                                                     ("deep", "deep_convnet", 9797)])
def test_the_books_files_exported_predict_as_eval_does(ort, tmp_path, mnist_dir, book_params,
                                                       deep_params, baseline_rss, which, config,
                                                       correct):
    params = book_params if which == "simple" else deep_params
    options = ["--config", config] if config else []
    out = tmp_path / "model.onnx"
    done = export(params, out, *options, cwd=tmp_path)
    assert "opset" in done.stdout and "[N, 1, 28, 28]" in done.stdout
    # the shipped configs export within 64 MiB of the command line's own footprint
    assert done.peak_rss - baseline_rss < 64 * MIB, (done.peak_rss, baseline_rss)
    report = evaluated(params, mnist_dir, tmp_path, *options)
    network, split = mnist_session(mnist_dir, config, params)
    predicted = compare(ort, out, network, split)
    assert int((predicted == split.labels).sum()) == report["correct"] == correct
    assert confusion(split.labels, predicted, 10) == report["confusion"]
    meta = metadata(ort, out)
    assert json.loads(meta["classes"]) == [str(k) for k in range(10)]
    assert json.loads(meta["input_shape"]) == [1, 28, 28]
    assert "/ 255" in meta["preprocessing"] and "MNIST" in meta["preprocessing"]
    # what a client needs: the input's name, layout and scaling; that the centring is its own
    assert meta["input"].startswith("'input': float32 [N, 1, 28, 28] (NCHW") and "/ 255" in meta["input"]
    assert meta["preprocessing"].startswith("not in the graph") and "centred" in meta["preprocessing"]
    assert meta["opset"] == "9"
    assert meta["lowmem_cnn_version"] == lowmem_cnn.__version__


def test_the_model_is_checked_and_stamped_with_the_oldest_opset(ort, tmp_path, book_params,
                                                                mnist_dir):
    import onnx

    from lowmem_cnn.data.idx import open_directory

    out = tmp_path / "model.onnx"
    done = export(book_params, out, "--softmax", cwd=tmp_path)
    assert "ONNX opset 9, IR version 4" in done.stdout
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 9)]
    assert model.ir_version == 4
    assert [n.op_type for n in model.graph.node] == \
        ["Conv", "MaxPool", "Relu", "Flatten", "Gemm", "Relu", "Gemm", "Softmax"]  # conv+pool, then ReLU
    # a dynamic batch: one image and 300 alike
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    images = open_directory(mnist_dir).test.images.read_range(0, 300)
    for n in (1, 300):
        p = onnx_run(ort, out, images[:n], (1, 28, 28))
        assert p.shape == (n, 10) and np.allclose(p.sum(axis=1), 1, atol=1e-5)


SHIPPED_CONFIGS = sorted(p.stem for p in (Path(lowmem_cnn.__file__).parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_every_shipped_config_is_stamped_with_opset_9_and_ir_4(ort, tmp_path, config):
    """The oldest opset its nodes declare, and the lowest IR version of that opset:
    what onnxruntime 1.16 and OpenCV load (scripts/onnx_clients_check.sh)."""
    import onnx

    from lowmem_cnn.files.export import save_onnx

    network = random_network(config)
    for softmax in (False, True):
        out = tmp_path / f"{config}.onnx"
        done = save_onnx(network, out, softmax)
        model = onnx.load(out)
        assert (done.opset, done.ir_version) == (9, 4)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 9)]
        assert model.ir_version == 4
        assert {p.key: p.value for p in model.metadata_props}["opset"] == "9"
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # loads


# The sha256 of the book's simple file exported with --softmax: the same with onnx 1.14.1,
# 1.17.0 and 1.23.2 (measured). The file depends on the network, the opset and lowmem-cnn's
# version only; change this when the exporter or the version changes on purpose (it
# changed when the modules moved into folders: the preprocessing names
# lowmem_cnn.data.imaging.mnist_style).
SIMPLE_SOFTMAX_SHA256 = "cd20b2419eaecf585142e84ed3096f942c1572f07cc22b258901cb75c89e7dc1"


def test_the_file_does_not_depend_on_the_installed_onnx(ort, tmp_path, book_params):
    import hashlib

    import onnx

    out = tmp_path / "model.onnx"
    export(book_params, out, "--softmax", cwd=tmp_path)
    model = onnx.load(out)
    assert (model.producer_name, model.producer_version) == ("lowmem-cnn", lowmem_cnn.__version__)
    assert onnx.__version__ not in out.read_bytes().decode("latin-1")
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SIMPLE_SOFTMAX_SHA256


def test_opset_chosen_within_the_range_that_works(ort, tmp_path, book_params, mnist_dir):
    import onnx

    from lowmem_cnn.data.idx import open_directory

    newest = onnx.defs.onnx_opset_version()
    images = open_directory(mnist_dir).test.images.read_range(0, 200)
    out = tmp_path / "default.onnx"
    export(book_params, out, cwd=tmp_path)
    expected = onnx_run(ort, out, images, (1, 28, 28))
    for opset, ir_version in ((13, 7), (newest, helper_ir(newest))):
        out = tmp_path / f"opset{opset}.onnx"
        done = export(book_params, out, "--opset", str(opset), cwd=tmp_path)
        assert f"ONNX opset {opset}, IR version {ir_version}" in done.stdout
        model = onnx.load(out)
        assert (model.opset_import[0].version, model.ir_version) == (opset, ir_version)
    # the onnxruntime installed may be older than the onnx: opset 13 it runs
    found = onnx_run(ort, tmp_path / "opset13.onnx", images, (1, 28, 28))
    assert np.abs(found - expected).max() <= 1e-6
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    for opset in (8, newest + 1):
        done = run_lowmem("export", book_params, out, "--opset", str(opset), cwd=tmp_path)
        assert done.returncode == 1
        assert error_line(done.stderr).endswith(
            f"opsets 9 to {newest} (its oldest is 9, the installed onnx's newest {newest})"
            if opset == 8 else f"knows opsets up to {newest}; choose one up to {newest}, or "
                               f"upgrade onnx")
    assert out.read_bytes() == b"the previous model"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left


def helper_ir(opset):
    from onnx import helper

    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


# --- a folder of RGB pictures with named classes ---------------------------------------


def test_a_network_trained_on_a_folder_exports_with_its_class_names(ort, tmp_path, mnist_dir):
    from lowmem_cnn.data.imaging import image_row

    root = named_folder(mnist_dir, tmp_path / "photos", fmt="png", tint=True, size=32, limit=300)
    params = tmp_path / "p.pkl"
    trained = run_lowmem("train", "--data-dir", root, "--image-size", "20", "--epochs", "2",
                         "--max-ram", "256M", "--out", params, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "pictures.onnx"
    done = export(params, out, cwd=tmp_path)
    assert "[N, 3, 20, 20]" in done.stdout and "eight, five" in done.stdout
    meta = metadata(ort, out)
    names = json.loads(meta["classes"])
    assert names == sorted(WORDS)
    assert json.loads(meta["input_shape"]) == [3, 20, 20]
    assert "RGB" in meta["preprocessing"] and "centre-cropped" in meta["preprocessing"]
    report = evaluated(params, root, tmp_path)
    assert report["classes"] == names
    run = Session(1 << 30, None, "float32", 1, DataOptions(root), params)
    load_params(params, run.network)
    split = run.open_data().test
    predicted = compare(ort, out, run.network, split)
    assert int((predicted == split.labels).sum()) == report["correct"]
    assert confusion(split.labels, predicted, 10) == report["confusion"]
    # the README's example: a picture scaled and cropped as predict does, named from the
    # metadata, is predict's class
    pictures = [next((root / word).iterdir()) for word in WORDS[:4]]
    said = run_lowmem("predict", params, *pictures, "--json", cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    expected = [json.loads(line)["class"] for line in said.stdout.splitlines()]
    rows = np.stack([image_row(path, (20, 20), 3) for path in pictures])
    found = [names[k] for k in onnx_run(ort, out, rows, (3, 20, 20)).argmax(axis=1)]
    assert found == expected


# --- every layer kind, on random weights ------------------------------------------------


def random_network(config, seed=1, variances=(0.05, 0.2), means=(0, 0.3)) -> Network:
    """Random weights, and batch normalization's values all different from their start
    (running variances and means drawn uniformly from `variances` and `means`)."""
    network = Network(load_config(str(config)).network)
    rng = np.random.default_rng(seed)
    network.init_params(rng)
    for _, layer, name in (*network.param_names(), *network.state_names()):
        value = getattr(layer, name)
        if name == "gamma":
            value[:] = rng.uniform(0.5, 1.5, value.shape)
        elif name == "running_var":
            value[:] = rng.uniform(*variances, value.shape)
        elif name == "running_mean":
            value[:] = rng.uniform(*means, value.shape)
        elif name != "W":  # biases and beta
            value[:] = rng.normal(0, 0.05, value.shape)
    return network


def test_every_layer_kind_exports_on_random_weights(ort, tmp_path, mnist_dir):
    config = tmp_path / "every_kind.toml"
    config.write_text(EVERY_KIND)
    network = random_network(config)
    kinds = {type(layer).__name__ for layer in network.layers}
    assert kinds == {"ConvolutionPooling", "Convolution", "MaxPooling", "ReLU", "Affine",
                     "Dropout", "BatchNormalization"}
    params = tmp_path / "random.pkl"
    save_params(params, network)
    out = tmp_path / "every.onnx"
    export(params, out, "--config", config, cwd=tmp_path)
    import onnx

    assert [n.op_type for n in onnx.load(out).graph.node] == [
        "Conv", "MaxPool", "Relu", "BatchNormalization", "Conv", "Mul", "MaxPool", "Relu", "Conv",
        "Flatten", "Gemm", "BatchNormalization", "Relu", "Mul", "Gemm"]
    report = evaluated(params, mnist_dir, tmp_path, "--config", config)
    network, split = mnist_session(mnist_dir, str(config), params)
    predicted = compare(ort, out, network, split, ties_allowed=True)
    assert len(np.unique(predicted)) >= 5  # the scores depend on the image
    assert abs(int((predicted == split.labels).sum()) - report["correct"]) <= 10


def test_deep_convnet_bn_exports_within_64_mib(ort, tmp_path, mnist_dir, baseline_rss):
    # seven normalizations in a row: running variances near 1 keep the scores near 1
    network = random_network("deep_convnet_bn", variances=(0.8, 1.2), means=(-0.1, 0.1))
    params = tmp_path / "bn.pkl"
    save_params(params, network)
    out = tmp_path / "bn.onnx"
    done = export(params, out, "--config", "deep_convnet_bn", cwd=tmp_path)
    assert done.peak_rss - baseline_rss < 64 * MIB, (done.peak_rss, baseline_rss)
    network, split = mnist_session(mnist_dir, "deep_convnet_bn", params)
    compare(ort, out, network, split, ties_allowed=True, count=2000)


# --- PyTorch: onnx2torch makes a torch.nn.Module of the file (docs/onnx.md) -------------


def onnx2torch_convert(monkeypatch):
    """onnx2torch.convert. onnx2torch imports torchvision, for converters of operators
    these graphs never use (NonMaxSuppression, RoiAlign): where it is missing or does
    not import (PyPI's beside the CPU wheel of torch on this machine), a stand-in."""
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:
        import types

        ops = types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = None
        vision = types.ModuleType("torchvision")
        vision.ops = ops
        monkeypatch.setitem(sys.modules, "torchvision", vision)
        monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    return pytest.importorskip("onnx2torch", reason="pip install --no-deps onnx2torch").convert


def torch_run(_, module, images, input_shape, batch=500):
    import torch

    c, h, w = input_shape
    parts = []
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            x = images[lo : lo + batch].reshape(-1, c, h, w).astype(np.float32) / np.float32(255)
            parts.append(module(torch.from_numpy(x)).numpy())
    return np.concatenate(parts)


def test_pytorch_users_pick_the_network_up_with_onnx2torch(tmp_path, mnist_dir, deep_params,
                                                           monkeypatch):
    convert = onnx2torch_convert(monkeypatch)
    need_module("onnx")
    out = tmp_path / "deep.onnx"
    export(deep_params, out, "--config", "deep_convnet", cwd=tmp_path)
    network, split = mnist_session(mnist_dir, "deep_convnet", deep_params)
    predicted = compare(None, convert(str(out)).eval(), network, split, run=torch_run)
    report = evaluated(deep_params, mnist_dir, tmp_path, "--config", "deep_convnet")
    assert int((predicted == split.labels).sum()) == report["correct"]
    # every layer kind: batch normalization too
    config = tmp_path / "every_kind.toml"
    config.write_text(EVERY_KIND)
    from lowmem_cnn.files.export import save_onnx

    network = random_network(config)
    save_onnx(network, tmp_path / "every.onnx")
    compare(None, convert(str(tmp_path / "every.onnx")).eval(), network, split, ties_allowed=True,
            count=2000, run=torch_run)


# --- the book's classes ---------------------------------------------------------------


def test_the_books_classes_save_onnx_with_their_live_params(ort, tmp_path, mnist_dir, book_params,
                                                             deep_params):
    from lowmem_cnn.book import DeepConvNet, SimpleConvNet, load_mnist

    (_, _), (x_test, _) = load_mnist(flatten=False)
    x = x_test[:500]
    for network, params in ((SimpleConvNet(max_ram="1G"), book_params),
                            (DeepConvNet(max_ram="1G"), deep_params)):
        network.load_params(params)
        network.params["b1"] = network.params["b1"] + 0.01  # a new array: the network changes
        out = tmp_path / "book.onnx"
        network.save_onnx(out)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        found = session.run(None, {"input": x.astype(np.float32)})[0]
        assert np.abs(found - network.predict(x)).max() <= SCORE_TOLERANCE
        network.save_onnx(out, softmax=True, opset=13)  # as export's --opset
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert np.allclose(session.run(None, {"input": x[:5].astype(np.float32)})[0].sum(axis=1), 1,
                           atol=1e-5)
        assert session.get_modelmeta().custom_metadata_map["opset"] == "13"
        with pytest.raises(LowmemError, match="can be written at opsets 9 to"):
            network.save_onnx(out, opset=8)


# --- bad input: one line each ---------------------------------------------------------


def test_a_parameter_file_that_does_not_fit_its_config(ort, tmp_path, book_params, deep_params):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    for params, config in ((deep_params, "simple_convnet"), (book_params, "deep_convnet")):
        done = run_lowmem("export", params, out, "--config", config, cwd=tmp_path)
        assert done.returncode == 1
        assert str(params) in error_line(done.stderr)
    assert out.read_bytes() == b"the previous model"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left


def test_an_unwritable_output(ort, tmp_path, book_params):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "missing" / "model.onnx", tmp_path / "file" / "model.onnx"):
        done = run_lowmem("export", book_params, out, cwd=tmp_path)
        assert done.returncode == 1
        assert str(out) in error_line(done.stderr)  # checked before anything is read
    # an existing model is replaced whole
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    export(book_params, out, cwd=tmp_path)
    assert out.read_bytes()[:3] != b"old" and len(out.read_bytes()) > 1_000_000


class _Square(layers.Layer):
    """A layer the export does not know."""

    def __init__(self, in_shape):
        self.in_shape = self.out_shape = tuple(in_shape)

    @classmethod
    def from_spec(cls, spec, in_shape):
        return cls(in_shape)

    def forward(self, x, ctx):
        return x * x, None

    def describe(self):
        return "square"


def test_a_layer_with_no_export(ort, tmp_path, monkeypatch):
    from lowmem_cnn.files import config as config_module
    monkeypatch.setitem(layer_types.LAYER_TYPES, "square", _Square)
    monkeypatch.setitem(config_module.LAYER_SETTINGS, "square", {})  # config.py's copy of them
    config = tmp_path / "square.toml"
    config.write_text('[network]\ninput_shape = [1, 28, 28]\n[[network.layers]]\ntype = "square"\n'
                      '[[network.layers]]\ntype = "affine"\nunits = 10\n')
    network = Network(load_config(str(config)).network)
    network.init_params(np.random.default_rng(0))
    params = tmp_path / "p.pkl"  # the book's format alone (a description would refuse "square")
    params.write_bytes(pickle.dumps(network.book_params()))
    out = tmp_path / "square.onnx"
    result = CliRunner().invoke(main, ["export", str(params), str(out), "--config", str(config)])
    assert result.exit_code == 1
    line = error_line(result.output)
    assert "'square' (_Square) has no ONNX export" in line and "batchnorm" in line
    assert not out.exists()


def test_without_onnx_one_line_says_how_to_install_it(tmp_path, book_params):
    out = tmp_path / "model.onnx"
    code = ("import sys; sys.modules['onnx'] = None\n"  # import onnx raises ImportError
            "from lowmem_cnn.cli import main\n"
            f"main(['export', {str(book_params)!r}, {str(out)!r}])")
    done = run_python("-c", code, cwd=tmp_path)
    assert done.returncode == 1
    assert error_line(done.stderr) == \
        "Error: exporting to ONNX needs the onnx package: pip install 'lowmem-cnn[onnx]'"
    assert not out.exists()


def test_onnx_is_imported_by_export_only(tmp_path):
    code = ("import sys, lowmem_cnn.cli, lowmem_cnn.training.starting, lowmem_cnn.book, lowmem_cnn.session\n"
            "assert not {'onnx', 'onnxruntime'} & set(sys.modules), 'imported'")
    done = run_python("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# --- Ctrl-C: one line, whenever it comes ---------------------------------------------

# Runs `lowmem-cnn ARGS` as `python -m lowmem_cnn` does, and sends itself SIGINT when the
# module MODULE is first imported: a point the test chooses, not a time.
INTERRUPTED_AT_IMPORT = """
import os, runpy, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["lowmem-cnn", *{args!r}]
runpy.run_module("lowmem_cnn", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, said", [
    ("numpy", "lowmem-cnn: stopped by SIGINT while starting"),  # the command line imports
    ("onnx", "export stopped by SIGINT; {out} is untouched or the whole new model"),  # export's
])
def test_ctrl_c_while_importing_is_one_line(ort, tmp_path, book_params, module, said):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    code = INTERRUPTED_AT_IMPORT.format(module=module, args=["export", str(book_params), str(out)])
    done = run_python("-c", code, cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stderr.splitlines() == [said.format(out=out)]
    assert done.stdout == ""
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left
