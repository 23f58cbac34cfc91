"""Networks from configs (DeepConvNet, dropout, He initialisation), pictures and predict."""

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lowmem_cnn.cli import main
from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.layers import Dropout
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import chosen_plan
from lowmem_cnn.engine.workspace import Context, Workspace
from lowmem_cnn.files.pickles import read_params

from conftest import run_lowmem


def test_deep_convnet_has_the_books_parameters():
    net = Network(load_config("deep_convnet").network)
    expected = {"W1": (16, 1, 3, 3), "W2": (16, 16, 3, 3), "W3": (32, 16, 3, 3),
                "W4": (32, 32, 3, 3), "W5": (64, 32, 3, 3), "W6": (64, 64, 3, 3),
                "W7": (1024, 50), "W8": (50, 10)}
    shapes = net.expected_book_shapes()
    for key, shape in expected.items():
        assert shapes[key] == shape
        assert shapes["b" + key[1:]] == (shape[0] if len(shape) == 4 else shape[1],)


def test_deep_convnet_reads_the_books_file(deep_params):
    book = read_params(deep_params, 10**8)
    shapes = Network(load_config("deep_convnet").network).expected_book_shapes()
    assert {k: v.shape for k, v in book.items()} == shapes


def test_he_initialisation():
    net = Network(load_config("deep_convnet").network, np.float64)
    net.init_params(np.random.default_rng(0))
    params = net.params()
    for key, fan_in in (("W6", 64 * 9), ("W7", 1024)):
        assert params[key].std() == pytest.approx(np.sqrt(2 / fan_in), rel=0.05)


def write_config(tmp_path, layers, init="0.01"):
    text = f'[network]\ninput_shape = [1, 28, 28]\nweight_init = {init}\n'
    for layer in layers:
        text += "[[network.layers]]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                 for k, v in layer.items())
    path = tmp_path / "net.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("layers, message", [
    ([{"type": "conv", "filters": 4, "size": 30}], "layer 1 (conv): a 30x30 filter is larger"),
    ([{"type": "affine", "units": 10}, {"type": "conv", "filters": 2, "size": 3}],
     "layer 2 (conv): needs a map"),
    ([{"type": "pool", "size": 2}] * 6, "layer 5 (pool): a 2x2 pool is larger than its 1x1"),
    ([{"type": "dropout", "ratio": 1.5}], "ratio = 1.5"),
    ([{"type": "conv", "filters": 0, "size": 3}], "filters = 0"),
    ([{"type": "softmax"}], "layer 1 (softmax): unknown layer type"),
    ([{"type": "conv", "filters": 2, "size": 3}], "the last layer must be affine"),
])
def test_impossible_configs_name_the_layer(tmp_path, layers, message):
    with pytest.raises(LowmemError, match=re.escape(message)):
        Network(load_config(write_config(tmp_path, layers)).network)


def test_bad_init_is_refused(tmp_path):
    with pytest.raises(LowmemError, match="weight_init"):
        load_config(write_config(tmp_path, [{"type": "affine", "units": 10}], init='"xavier"'))


def test_dropout_trains_with_masks_and_scales_at_test_time():
    layer = Dropout((1000,), 0.5)
    x = np.ones((4, 1000))
    out, mask = layer.forward(x.copy(), Context(Workspace(), True, dropout_rng=np.random.default_rng(0)))
    assert 0.45 < mask.mean() < 0.55
    np.testing.assert_array_equal(out, mask)
    again, _ = layer.forward(x.copy(), Context(Workspace(), True, dropout_rng=np.random.default_rng(0)))
    np.testing.assert_array_equal(again, out)  # the same key, the same mask
    np.testing.assert_array_equal(layer.backward(np.full((4, 1000), 3.0), mask, {}, Context()),
                                  3.0 * mask)
    test_out, _ = layer.forward(x.copy(), Context())
    np.testing.assert_array_equal(test_out, 0.5)


def test_dropout_gradients_are_deterministic_across_threads(tmp_path, monkeypatch):
    layers = [{"type": "conv", "filters": 3, "size": 5, "stride": 3}, {"type": "relu"},
              {"type": "affine", "units": 20}, {"type": "relu"}, {"type": "dropout", "ratio": 0.5},
              {"type": "affine", "units": 10}]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (9, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 9)
    masks = []
    real_forward = Dropout.forward

    def recording_forward(self, x, ctx):
        out, mask = real_forward(self, x, ctx)
        masks.append(mask.copy())  # the mask's array is the workspace's, used again
        return out, mask

    monkeypatch.setattr(Dropout, "forward", recording_forward)

    def gradient(config, threads):
        net = Network(load_config(config).network, np.float64, threads)
        net.init_params(np.random.default_rng(0))
        plan = chosen_plan(net, 2, threads)
        net.accumulate_gradient(images, labels, plan, noise_key=(7, 0, 3))
        return {k: g.copy() for k, g in net.grads(plan).items()}

    config = write_config(tmp_path, layers, init='"he"')
    grads = [gradient(config, threads) for threads in (1, 2, 2)]
    for key in grads[0]:
        np.testing.assert_allclose(grads[1][key], grads[0][key], rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(grads[2][key], grads[1][key])
    # dropout was applied: masks of 5 micro-batches per run, about half of them zeros,
    # and the gradient differs from that of the same network without the dropout layer
    assert len(masks) == 3 * 5 and all(mask.shape[1:] == (20,) for mask in masks)
    kept = np.concatenate([mask.reshape(-1) for mask in masks[:5]])
    assert kept.size == 9 * 20 and 0.35 < kept.mean() < 0.65
    plain = gradient(write_config(tmp_path, layers[:4] + layers[5:], init='"he"'), 1)
    assert sorted(plain) == sorted(grads[0])
    for key in ("W2", "W3"):
        assert np.abs(grads[0][key] - plain[key]).max() > 1e-3 * np.abs(plain[key]).max(), key


def test_book_deep_convnet_on_real_test_set(mnist_dir, deep_params):
    # in its own process: the budget is the process's, and pytest's is already larger
    result = run_lowmem("eval", deep_params, "--config", "deep_convnet", "--batch-size", "10000",
                        "--max-ram", "128M", "--data-dir", mnist_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["correct"], summary["n"]) == (9797, 10000)
    assert result.peak_rss < 128 * 2**20


# --- pictures -------------------------------------------------------------------------


def png_size(path):
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_curves_and_memory_plots(tmp_path):
    from lowmem_cnn.plotting import plot_curves, plot_memory

    history = [{"epoch": e, "loss": 1 / e, "train_accuracy": 0.9 + e / 100,
                "test_accuracy": 0.89 + e / 100} for e in range(1, 6)]
    plot_curves(history, tmp_path / "curves.png")
    assert png_size(tmp_path / "curves.png") == (1000, 400)
    rows = [{"layer": f"l{i}", "book_im2col_bytes": 10**9 * i, "tiled_bytes": 10**6 * i}
            for i in range(1, 7)]
    plot_memory(rows, 2**27, tmp_path / "mem.png")
    assert png_size(tmp_path / "mem.png") == (600, 450)


def drawn_memory_plot(rows, tmp_path, monkeypatch):
    """What plot_memory puts on its axes: bar heights, x labels, texts."""
    from lowmem_cnn import plotting

    seen = {}
    real_save = plotting._save

    def save(fig, path):
        (ax,) = fig.axes
        seen["heights"] = [bar.get_height() for bar in ax.patches]
        seen["labels"] = [label.get_text() for label in ax.get_xticklabels()]
        seen["texts"] = [text.get_text() for text in ax.texts]
        real_save(fig, path)

    monkeypatch.setattr(plotting, "_save", save)
    plotting.plot_memory(rows, 2**27, tmp_path / "mem.png")
    assert png_size(tmp_path / "mem.png")[1] == 450
    return seen


def test_memory_plot_draws_no_bars_for_layers_without_columns(tmp_path, monkeypatch):
    from lowmem_cnn.memory.planner import make_plan
    from lowmem_cnn.profiling import layer_table

    net = Network(load_config().network)
    net.init_params(np.random.default_rng(0))
    rows = layer_table(net, make_plan(net, 2**30, 40 * 2**20, False, 100, 0), 10_000, False)
    assert [r["layer"].split()[0] for r in rows] == ["conv", "pool", "relu", "affine", "relu",
                                                      "affine"]
    seen = drawn_memory_plot(rows, tmp_path, monkeypatch)
    # the convolution (both bars) and its fused pooling (the book's bar; "none" tiled);
    # ReLU and affine have no columns either way and are left out
    assert seen["labels"] == [rows[0]["layer"], rows[1]["layer"]]
    assert sorted(seen["heights"]) == sorted([rows[0]["book_im2col_bytes"],
                                              rows[0]["tiled_bytes"],
                                              rows[1]["book_im2col_bytes"]])
    assert min(seen["heights"]) > 1000
    assert seen["texts"] == ["none"]


def test_plot_without_matplotlib_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from lowmem_cnn.plotting import plot_curves

    with pytest.raises(LowmemError, match=r"pip install 'lowmem-cnn\[plot\]'"):
        plot_curves([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_train_plot_and_eval_misclassified(tmp_path, mnist_dir, book_params):
    runner = CliRunner()
    result = runner.invoke(main, [
        "train", "--limit", "600", "--epochs", "2", "--data-dir", str(mnist_dir), "--out",
        str(tmp_path / "p.pkl"), "--plot", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "curves.png") == (1000, 400)
    result = runner.invoke(main, [
        "eval", str(book_params), "--data-dir", str(mnist_dir), "--misclassified",
        str(tmp_path / "wrong.png")])
    assert result.exit_code == 0, result.output
    assert "100 misclassified images drawn" in result.output
    assert png_size(tmp_path / "wrong.png") == (1100, 1300)
    result = runner.invoke(main, [
        "profile-memory", "--batch-size", "500", "--data-dir", str(mnist_dir), "--config",
        "deep_convnet", "--plot", str(tmp_path / "mem.png")])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "mem.png")[1] == 450


# --- predict ---------------------------------------------------------------------------


@pytest.fixture
def digit_pictures(tmp_path, mnist_dir):
    """Test digits drawn the way a user would: large, dark ink on white paper."""
    from PIL import Image

    from lowmem_cnn.data.idx import open_directory

    test = open_directory(mnist_dir).test
    paths, labels = [], []
    for i, suffix in zip(range(6), [".png", ".jpg", ".pgm", ".png", ".jpg", ".png"], strict=True):
        digit = test.images.read_range(i, i + 1).reshape(28, 28)
        page = np.full((200, 160), 255, np.uint8)
        big = np.asarray(Image.fromarray(255 - digit).resize((112, 112), Image.BICUBIC))
        page[40:152, 20:132] = big
        path = tmp_path / f"digit{i}{suffix}"
        Image.fromarray(page).save(path)
        paths.append(path)
        labels.append(int(test.labels[i]))
    return paths, labels


def test_predict_own_pictures(digit_pictures, book_params):
    paths, labels = digit_pictures
    result = CliRunner().invoke(main, ["predict", str(book_params), *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["digit"] for line in lines] == labels
    assert all(abs(sum(line["probabilities"]) - 1) < 1e-4 for line in lines)


def test_predict_bad_pictures(tmp_path, book_params):
    (tmp_path / "notes.png").write_text("not an image")
    from PIL import Image

    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "blank.png")
    for name, message in (("notes.png", "not an image"), ("blank.png", "no digit found"),
                          ("missing.png", "no such file")):
        result = subprocess.run([sys.executable, "-m", "lowmem_cnn", "predict", str(book_params),
                                 str(tmp_path / name)], capture_output=True, text=True)
        assert result.returncode == 1 and message in result.stderr and name in result.stderr
        assert "Traceback" not in result.stderr


def test_predict_without_pillow_says_which_extra(tmp_path, monkeypatch, book_params):
    monkeypatch.setitem(sys.modules, "PIL", None)
    result = CliRunner().invoke(main, ["predict", str(book_params), str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert "pip install 'lowmem-cnn[images]'" in result.output


def test_saved_deep_params_round_trip(tmp_path):
    from lowmem_cnn.files.params import load_params, save_params

    net = Network(load_config("deep_convnet").network)
    net.init_params(np.random.default_rng(3))
    save_params(tmp_path / "d.pkl", net)
    raw = pickle.loads((tmp_path / "d.pkl").read_bytes())
    assert sorted(raw) == sorted([f"W{i}" for i in range(1, 9)] + [f"b{i}" for i in range(1, 9)])
    other = Network(load_config("deep_convnet").network)
    load_params(tmp_path / "d.pkl", other)
    for key, value in net.params().items():
        np.testing.assert_array_equal(other.params()[key], value)
