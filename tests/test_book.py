"""lowmem_cnn.book: the book's load_mnist, SimpleConvNet and DeepConvNet on the engine.

The reference below is a plain float64 NCHW forward pass written from the book's
definitions (convolution, ReLU, 2x2 max-pooling, affine), independent of the engine.
"""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import DEEP_PARAMS, SIMPLE_PARAMS, _book_file
from numpy.lib.stride_tricks import sliding_window_view

import lowmem_cnn.book as book
from lowmem_cnn.book import DeepConvNet, SimpleConvNet, engine_views, load_mnist
from lowmem_cnn.common.errors import LowmemError

SIMPLE_FILE, DEEP_FILE = SIMPLE_PARAMS, DEEP_PARAMS  # tests/fixtures/book/

# The book's gradient check (ch07/gradient_check.py): a 10x10 input, ten 3x3 filters.
SMALL = dict(input_dim=(1, 10, 10), conv_param={'filter_num': 10, 'filter_size': 3, 'pad': 0, 'stride': 1},
             hidden_size=10, output_size=10, weight_init_std=0.01)


def small_net(seed=0, **kwargs):
    np.random.seed(seed)
    return SimpleConvNet(**{**SMALL, **kwargs})


def book_file(path):
    return _book_file(path)  # fails under CI, as conftest's fixtures do


# --- a reference forward pass, float64 NCHW, from the book's definitions ------------------


def reference_scores(params, x, conv):
    W, b = params["W1"], params["b1"]
    _, _, fh, fw = W.shape
    s, p = conv["stride"], conv["pad"]
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    win = sliding_window_view(padded, (fh, fw), axis=(2, 3))[:, :, ::s, ::s]
    out = np.einsum("ncijkl,fckl->nfij", win, W) + b[None, :, None, None]
    out = np.maximum(out, 0)
    n, f, oh, ow = out.shape
    ph, pw = oh // 2, ow // 2
    out = out[:, :, : 2 * ph, : 2 * pw].reshape(n, f, ph, 2, pw, 2).max(axis=(3, 5))
    hidden = np.maximum(out.reshape(n, -1) @ params["W2"] + params["b2"], 0)
    return hidden @ params["W3"] + params["b3"]


def reference_loss(params, x, labels, conv):
    s = reference_scores(params, x, conv)
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(labels)), labels] + 1e-7).mean()


def reference_numerical_gradient(params, x, labels, conv, h=1e-4):
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    grads = {}
    for key, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            kept = value[index]
            value[index] = kept + h
            up = reference_loss(params, x, labels, conv)
            value[index] = kept - h
            down = reference_loss(params, x, labels, conv)
            value[index] = kept
            grad[index] = (up - down) / (2 * h)
        grads[key] = grad
    return grads


# --- load_mnist -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_env(mnist_dir, tmp_path_factory):
    """LOWMEM_CNN_DATA and one cache for the module, so the files are decompressed once."""
    return {"LOWMEM_CNN_DATA": str(mnist_dir), "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture
def with_data(data_env, monkeypatch):
    for key, value in data_env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def mnist(data_env):
    with pytest.MonkeyPatch.context() as patch:
        for key, value in data_env.items():
            patch.setenv(key, value)
        return load_mnist(flatten=False)


def test_load_mnist_defaults_are_the_books(with_data, mnist):
    (x_train, t_train), (x_test, t_test) = load_mnist()
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() == 1.0
    assert t_train.shape == (60000,) and t_test.shape == (10000,)
    assert t_train.dtype == np.uint8 and t_test.max() == 9
    (nchw, _), _ = mnist
    assert nchw.shape == (60000, 1, 28, 28)
    np.testing.assert_array_equal(nchw.reshape(60000, 784), x_train)


def test_load_mnist_raw_pixels_and_one_hot(with_data, mnist):
    (x_train, t_train), (x_test, t_test) = load_mnist(normalize=False, flatten=False, one_hot_label=True)
    assert x_train.shape == (60000, 1, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 1, 28, 28) and x_test.dtype == np.uint8
    assert t_train.shape == (60000, 10) and t_train.dtype == np.float64
    assert set(np.unique(t_train)) == {0.0, 1.0} and (t_train.sum(axis=1) == 1).all()
    (float_train, labels_train), (float_test, labels_test) = mnist
    np.testing.assert_array_equal(t_train.argmax(axis=1), labels_train)
    np.testing.assert_array_equal(t_test.argmax(axis=1), labels_test)
    # normalize=True is the book's float32 pixel / 255, bit for bit
    np.testing.assert_array_equal(float_test, x_test.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(float_train[:5000],
                                  x_train[:5000].astype(np.float32) / np.float32(255))


# --- construction -----------------------------------------------------------------------


def test_simple_convnet_draws_the_books_initial_weights():
    np.random.seed(7)
    net = SimpleConvNet()
    np.random.seed(7)
    expected = {"W1": 0.01 * np.random.randn(30, 1, 5, 5), "W2": 0.01 * np.random.randn(4320, 100),
                "W3": 0.01 * np.random.randn(100, 10)}
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    for key, value in expected.items():
        assert net.params[key].dtype == np.float64
        np.testing.assert_array_equal(net.params[key], value)
    for key, size in (("b1", 30), ("b2", 100), ("b3", 10)):
        np.testing.assert_array_equal(net.params[key], np.zeros(size))


def test_deep_convnet_draws_he_weights_with_the_books_fan_in():
    np.random.seed(3)
    net = DeepConvNet()
    np.random.seed(3)
    fan_in = [9, 144, 144, 288, 288, 576, 1024, 50]
    shapes = [(16, 1, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3),
              (64, 64, 3, 3), (1024, 50), (50, 10)]
    for i, (fan, shape) in enumerate(zip(fan_in, shapes, strict=True), start=1):
        np.testing.assert_array_equal(net.params[f"W{i}"], np.sqrt(2.0 / fan) * np.random.randn(*shape))
        np.testing.assert_array_equal(net.params[f"b{i}"], np.zeros(shape[0] if i <= 6 else shape[1]))
    assert len(net.params) == 16


@pytest.mark.parametrize("kwargs, message", [
    ({"conv_param": {"filter_num": 30, "filter_size": 5}}, "needs 'filter_num', 'filter_size', 'pad'"),
    ({"conv_param": {"filter_num": 0, "filter_size": 5, "pad": 0, "stride": 1}}, "filter_num 0"),
    ({"conv_param": {"filter_num": 3, "filter_size": 5, "pad": -1, "stride": 1}}, "pad -1"),
    ({"input_dim": (28, 28)}, "input_dim (28, 28)"),
    ({"hidden_size": 2.5}, "hidden_size 2.5"),
    ({"weight_init_std": "he"}, "weight_init_std 'he'"),
    ({"input_dim": (1, 4, 4)}, "a 5x5 filter is larger than its 4x4 input"),
    ({"max_ram": "lots"}, "'lots' is not a size"),
    ({"max_ram": "1M"}, "max_ram=1,048,576 bytes is too small"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises((ValueError, LowmemError)) as err:
        SimpleConvNet(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- parameters: the book's layout, live ----------------------------------------------


@pytest.mark.parametrize("make", [lambda: SimpleConvNet(), lambda: DeepConvNet(),
                                  lambda: small_net(conv_param={'filter_num': 4, 'filter_size': 3,
                                                                'pad': 1, 'stride': 2})])
def test_engine_views_are_the_layers_book_layout(make):
    net = make()
    rng = np.random.default_rng(0)
    arrays = {key: rng.standard_normal(value.shape) for key, value in net.network.params().items()}
    views = engine_views(net.network, arrays)
    for key, layer, name in net.network.param_names():
        expected = layer.to_book(name, arrays[key])
        np.testing.assert_array_equal(np.reshape(views[key], expected.shape), expected)
        assert np.shares_memory(views[key], arrays[key])


def test_params_changed_in_place_change_the_network():
    net = small_net(dtype=np.float64)
    x = np.random.rand(5, 1, 10, 10)
    before = net.predict(x)
    np.testing.assert_allclose(before, reference_scores(net.params, x, SMALL["conv_param"]), rtol=1e-12)
    # doubling the last layer doubles the scores, exactly
    net.params["W3"] *= 2
    net.params["b3"] *= 2
    np.testing.assert_array_equal(net.predict(x), 2 * before)


def test_sgd_step_in_place_lowers_the_loss():
    net = small_net()
    x, t = np.random.rand(20, 1, 10, 10), np.arange(20) % 10
    before = net.loss(x, t)
    for _ in range(3):
        grads = net.gradient(x, t)
        for key in net.params:
            net.params[key] -= 0.5 * grads[key]  # the book's SGD
    assert net.loss(x, t) < before


def test_params_rounded_to_float16_in_place():
    """As the book's half_float_network.py: every parameter rounded, in place."""
    net = small_net(weight_init_std=0.3)
    x = np.random.rand(8, 1, 10, 10)
    before = net.predict(x)
    for param in net.params.values():
        param[...] = param.astype(np.float16)
    after = net.predict(x)
    assert not np.array_equal(after, before)
    twin = small_net(weight_init_std=0.3)
    for key in twin.params:
        twin.params[key] = net.params[key].astype(np.float16)  # replaced, float16 arrays
    np.testing.assert_array_equal(twin.predict(x), after)
    np.testing.assert_array_equal(net.predict(x.astype(np.float16)).shape, (8, 10))


def test_params_replaced_change_the_network():
    net = small_net(dtype=np.float64)
    x = np.random.rand(4, 1, 10, 10)
    before = net.predict(x)
    net.params["W3"] = net.params["W3"] * 3
    net.params["b3"] = net.params["b3"] * 3
    np.testing.assert_allclose(net.predict(x), 3 * before, rtol=1e-12)
    net.params = {key: value.copy() for key, value in net.params.items()}  # a new dict too
    np.testing.assert_allclose(net.predict(x), 3 * before, rtol=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.__setitem__("W2", np.zeros((10, 10))),
     "params['W2'] has shape (10, 10), SimpleConvNet needs (160, 10)"),
    (lambda p: p.pop("b1"), "params has no 'b1'"),
    (lambda p: p.__setitem__("W1", np.full((10, 1, 3, 3), "a")), "params['W1'] has dtype <U1"),
])
def test_bad_params_are_named(change, message):
    net = small_net()
    change(net.params)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        net.predict(np.zeros((1, 100)))


def test_sync_from_engine_writes_into_the_users_arrays():
    net = small_net()
    w1 = net.params["W1"]
    for value in net.network.params().values():
        value += 1  # as a trainer running the engine would
    net.sync_from_engine()
    assert net.params["W1"] is w1
    np.random.seed(0)
    np.testing.assert_allclose(w1, 0.01 * np.random.randn(10, 1, 3, 3) + 1, rtol=1e-6)


# --- predict, loss, accuracy, gradient ---------------------------------------------


def test_predict_takes_the_books_inputs():
    net = small_net()
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (6, 1, 10, 10), dtype=np.uint8)
    scores = net.predict(pixels)
    assert scores.shape == (6, 10) and scores.dtype == np.float32
    # uint8 is the numbers it holds (the book does not divide by 255), flattened or not
    np.testing.assert_array_equal(net.predict(pixels.astype(np.float32)), scores)
    np.testing.assert_array_equal(net.predict(pixels.reshape(6, 100)), scores)
    np.testing.assert_array_equal(net.predict(pixels.astype(np.float64).tolist()), scores)
    assert net.predict(np.zeros((0, 100))).shape == (0, 10)
    double = small_net(dtype=np.float64)
    x = rng.random((6, 1, 10, 10))
    assert double.predict(x).dtype == np.float64
    np.testing.assert_allclose(double.predict(x), reference_scores(double.params, x, SMALL["conv_param"]),
                               rtol=1e-12)


@pytest.mark.parametrize("input_dim, conv", [
    ((1, 10, 10), {'filter_num': 4, 'filter_size': 4, 'pad': 0, 'stride': 1}),  # odd conv output (7x7)
    ((2, 12, 12), {'filter_num': 5, 'filter_size': 3, 'pad': 1, 'stride': 2}),
    ((3, 9, 13), {'filter_num': 6, 'filter_size': 2, 'pad': 2, 'stride': 1}),
])
def test_other_shapes_and_conv_params(input_dim, conv):
    np.random.seed(5)
    net = SimpleConvNet(input_dim=input_dim, conv_param=conv, hidden_size=7, output_size=4,
                        weight_init_std=0.2, dtype=np.float64)
    x = np.random.rand(9, *input_dim)
    np.testing.assert_allclose(net.predict(x), reference_scores(net.params, x, conv), rtol=1e-10)
    np.testing.assert_allclose(net.predict(x.reshape(9, -1)), net.predict(x), rtol=0)


def test_the_books_gradient_check():
    """ch07/gradient_check.py: one 10x10 image, label (1, 1)."""
    net = small_net(dtype=np.float64)
    x = np.random.rand(100).reshape((1, 1, 10, 10))
    t = np.array([1]).reshape((1, 1))
    numerical = net.numerical_gradient(x, t)
    grads = net.gradient(x, t)
    reference = reference_numerical_gradient(net.params, x, np.array([1]), SMALL["conv_param"])
    for key, value in net.params.items():
        assert grads[key].shape == numerical[key].shape == value.shape
        assert grads[key].dtype == numerical[key].dtype == np.float64
        # the same central differences as the book's, on the same function
        np.testing.assert_allclose(numerical[key], reference[key], rtol=1e-6, atol=1e-10)
    # as close as the book's check: what is left is the step crossing ReLU and max-pool
    # kinks (W1, b1) and the loss's 1e-7 (b2, b3); measured with this seed
    limits = {"W1": 3e-6, "b1": 3e-5, "W2": 1e-9, "b2": 1e-8, "W3": 1e-9, "b3": 1e-6}
    for key, limit in limits.items():
        assert np.abs(numerical[key] - grads[key]).mean() < limit, key


def test_gradient_is_exact_with_a_small_step(monkeypatch):
    """With a step too small to cross a kink, backpropagation and differences agree."""
    monkeypatch.setattr(book, "NUMERICAL_STEP", 1e-6)
    net = small_net(dtype=np.float64)
    x, t = np.random.rand(3, 1, 10, 10), np.array([1, 4, 9])
    numerical, grads = net.numerical_gradient(x, t), net.gradient(x, t)
    for key in net.params:
        tolerance = 1e-6 if key.startswith("b") else 1e-8  # the loss's + 1e-7 in the log
        np.testing.assert_allclose(grads[key], numerical[key], atol=tolerance, err_msg=key)


def test_float32_engine_gradient_check():
    """The default float32 engine: numerical_gradient still differences in float64."""
    single, double = small_net(), small_net(dtype=np.float64)
    x, t = np.random.rand(2, 1, 10, 10), np.array([[3], [5]])
    numerical = single.numerical_gradient(x, t)
    np.testing.assert_allclose(numerical["W2"], double.numerical_gradient(x, t)["W2"], rtol=1e-5,
                               atol=1e-12)
    grads = single.gradient(x, t)
    assert grads["W1"].dtype == np.float64
    for key in single.params:
        assert np.abs(numerical[key] - grads[key]).mean() < 5e-5, key


def test_labels_as_the_book_takes_them():
    net = small_net()
    x = np.random.rand(30, 1, 10, 10)
    labels = np.random.randint(0, 10, 30)
    one_hot = np.eye(10)[labels]
    forms = [labels, labels.astype(np.uint8), labels.reshape(30, 1), one_hot, one_hot.astype(np.float32)]
    losses = [net.loss(x, t) for t in forms]
    assert all(loss == losses[0] for loss in losses) and isinstance(losses[0], float)
    accuracies = {net.accuracy(x, t) for t in forms}
    assert len(accuracies) == 1
    grads = [net.gradient(x, t) for t in forms]
    for g in grads[1:]:
        for key in g:
            np.testing.assert_array_equal(g[key], grads[0][key])
    double = small_net(dtype=np.float64)
    np.testing.assert_allclose(double.loss(x, labels),
                               reference_loss(double.params, x, labels, SMALL["conv_param"]), rtol=1e-12)


def test_accuracy_counts_every_image():
    net = small_net(weight_init_std=0.5)
    x = np.random.rand(150, 1, 10, 10)
    t = np.random.randint(0, 10, 150)
    expected = np.mean(net.predict(x).argmax(axis=1) == t)
    assert net.accuracy(x, t) == expected == net.accuracy(x, t, batch_size=7)


@pytest.mark.parametrize("x_shape, t, message", [
    ((5, 1, 9, 10), None,
     "x has shape (5, 1, 9, 10): SimpleConvNet takes images of shape (N, 1, 10, 10) or (N, 100)"),
    ((1, 10, 10), None, "x has shape (1, 10, 10)"),
    ((5, 99), None, "x has shape (5, 99)"),
    ((5, 100), np.zeros(4, int), "t has 4 labels for 5 images"),
    ((5, 100), np.zeros((5, 3)), "t has shape (5, 3)"),
    ((5, 100), np.full(5, 10), "t holds label 10: labels are 0..9"),
    ((5, 100), np.full(5, -1), "t holds label -1"),
    ((5, 100), np.zeros(5), "t has dtype float64: labels are whole numbers"),
    ((0, 100), np.zeros(0, int), "x holds no images"),
])
def test_bad_inputs_are_one_line_errors(x_shape, t, message):
    net = small_net()
    x = np.zeros(x_shape)
    with pytest.raises(ValueError) as err:
        if t is None:
            net.predict(x)
        else:
            net.loss(x, t)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="dtype complex128"):
        net.predict(np.zeros((2, 100), complex))
    with pytest.raises(ValueError, match="batch_size 0"):
        net.accuracy(np.zeros((2, 100)), np.zeros(2, int), batch_size=0)


def test_deep_convnet_dropout_follows_train_flg():
    np.random.seed(0)
    net = DeepConvNet(input_dim=(1, 16, 16))  # 16 -> 8 -> 5 -> 2: W7 is 64*2*2 rows
    assert net.params["W7"].shape == (256, 50)
    x = np.random.rand(12, 1, 16, 16).astype(np.float32)
    test_scores = net.predict(x)
    np.testing.assert_array_equal(net.predict(x, train_flg=False), test_scores)
    np.random.seed(1)
    train_scores = net.predict(x, train_flg=True)
    np.random.seed(1)
    np.testing.assert_array_equal(net.predict(x, train_flg=True), train_scores)  # np.random.seed repeats it
    assert not np.array_equal(net.predict(x, train_flg=True), train_scores)
    # the last layer is a dropout: about half the scores are zero in training, none in test
    assert 0.2 < np.mean(train_scores == 0) < 0.8 and not (test_scores == 0).any()
    t = np.arange(12) % 10
    np.random.seed(2)
    loss, grads = net.loss(x, t), net.gradient(x, t)
    np.random.seed(2)
    assert net.loss(x, t) == loss  # the book's loss runs dropout, as in training
    for key, value in net.gradient(x, t).items():
        np.testing.assert_array_equal(value, grads[key])
        assert value.shape == net.params[key].shape


def test_a_plan_is_made_again_when_the_user_holds_more():
    net = small_net(max_ram="1G")
    x, t = np.random.rand(50, 1, 10, 10), np.arange(50) % 10
    net.accuracy(x, t)
    first = net.engine.plan
    net.accuracy(x, t)
    assert net.engine.plan is first
    held = np.ones(64 * 2**20 // 8)  # the user's new 64 MiB
    net.accuracy(x, t)
    assert net.engine.plan.baseline - first.baseline > 60 * 2**20
    del held


# --- parameter files -------------------------------------------------------------------


def test_save_and_load_params(tmp_path, monkeypatch):
    net = small_net(seed=1)
    monkeypatch.chdir(tmp_path)
    net.save_params()  # the book's default name
    with open("params.pkl", "rb") as f:
        raw = pickle.load(f)  # what the book's load_params reads
    assert list(raw) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    for key, value in net.params.items():
        np.testing.assert_array_equal(raw[key], value)
        assert raw[key].dtype == np.float64
    other = small_net(seed=2)
    other.load_params("params.pkl")
    x = np.random.rand(3, 100)
    np.testing.assert_array_equal(other.predict(x), net.predict(x))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_parameter_file_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = small_net()
    kept = {key: value.copy() for key, value in net.params.items()}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"W1": Boom()}))
    with pytest.raises(LowmemError, match="refused: a pickle can run code"):
        net.load_params(str(path))
    assert not (tmp_path / "pwned").exists()
    for key, value in kept.items():
        np.testing.assert_array_equal(net.params[key], value)


def test_a_file_of_another_network_is_refused(tmp_path):
    small_net().save_params(tmp_path / "small.pkl")
    with pytest.raises(LowmemError, match="has shape"):
        SimpleConvNet().load_params(tmp_path / "small.pkl")
    with pytest.raises(LowmemError, match="missing"):
        DeepConvNet().load_params(tmp_path / "small.pkl")


# --- the book's trained files on MNIST ----------------------------------------------


def cli_confusion(path, mnist_dir, *config):
    result = subprocess.run(
        [sys.executable, "-m", "lowmem_cnn", "eval", str(path), "--json", "--max-ram", "512M",
         "--data-dir", str(mnist_dir), *config],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return np.array(json.loads(result.stdout.splitlines()[-1])["confusion"])


def confusion(predicted, labels):
    return np.bincount(labels.astype(np.int64) * 10 + predicted, minlength=100).reshape(10, 10)


@pytest.mark.parametrize("make, path, correct, config", [
    (SimpleConvNet, SIMPLE_FILE, 9600, ()),
    (DeepConvNet, DEEP_FILE, 9797, ("--config", "deep_convnet")),
])
def test_the_books_files_give_the_books_predictions(make, path, correct, config, mnist, mnist_dir):
    net = make(max_ram="512M")
    net.load_params(book_file(path))
    _, (x_test, t_test) = mnist
    predicted = net.predict(x_test).argmax(axis=1)
    ours = confusion(predicted, t_test)
    assert np.trace(ours) == correct
    assert net.accuracy(x_test, t_test) == correct / 10000
    np.testing.assert_array_equal(ours, cli_confusion(path, mnist_dir, *config))


PREDICT_ALL = """
import json, sys
from lowmem_cnn.book import SimpleConvNet, load_mnist
from lowmem_cnn.memory.budget import current_rss, peak_rss

before = current_rss()
(x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)
loading = peak_rss() - before
budget = current_rss() + 40 * 2**20  # room for the network: far less than a float copy of x_train
net = SimpleConvNet(max_ram=str(budget))
net.load_params(sys.argv[1])
scores = net.predict(x_train)
loaded = x_train.nbytes + t_train.nbytes + x_test.nbytes + t_test.nbytes
print(json.dumps({"loading": loading, "loaded": loaded, "budget": budget, "train_bytes": x_train.nbytes,
                  "train_pixels": x_train.size, "peak": peak_rss(), "shape": scores.shape,
                  "correct": int((scores.argmax(axis=1) == t_train).sum())}))
"""


def test_predict_on_all_training_images_in_one_call_within_budget(with_data):
    """load_mnist converts a chunk at a time and predict allocates the scores and the
    plan's micro-batches: peak RSS stays under a budget with 40 MiB of room."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PREDICT_ALL), str(book_file(SIMPLE_FILE))],
                            capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["shape"] == [60000, 10]
    assert round(report["correct"] / 60000, 4) == 0.9590  # the book's, on the training images
    assert report["peak"] <= report["budget"]
    # converting to float32 held no whole-set temporary: the least of them, the training
    # images as uint8 (a byte a pixel, 47 MB) beside their float32 array (the book's
    # astype then /=), would take more than loading took for all four arrays
    assert report["loaded"] <= report["loading"] < report["train_bytes"] + report["train_pixels"]


def test_engine_input_pixels_and_values():
    """Network.to_input: uint8 pixels / 255 in float32 as before; other input as it is."""
    net = small_net().network
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (4, 100), dtype=np.uint8)
    nhwc = rows.reshape(4, 1, 10, 10).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(net.to_input(rows), np.divide(nhwc, np.float32(255), dtype=np.float32))
    np.testing.assert_array_equal(net.to_input(rows, pixels=False), nhwc.astype(np.float32))
    x = rng.random((4, 1, 10, 10))
    np.testing.assert_array_equal(net.to_input(x, pixels=False), x.transpose(0, 2, 3, 1).astype(np.float32))


def test_a_memory_mapped_input_is_counted(tmp_path):
    net = small_net()
    x = np.random.rand(300, 1, 10, 10).astype(np.float32)
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mapped[...] = x
    mapped.flush()
    scores = net.predict(np.load(tmp_path / "x.npy", mmap_mode="r"))
    assert net.engine.plan.fixed >= x.nbytes  # its pages become resident as they are read
    np.testing.assert_array_equal(scores, net.predict(x))


# --- Trainer ----------------------------------------------------------------------------


def trained(mnist, seed=3, n=1500, labels=None, **kwargs):
    """A SimpleConvNet trained by the book's Trainer on the first n training images."""
    (x_train, t_train), (x_test, t_test) = mnist
    np.random.seed(seed)
    network = SimpleConvNet()
    options = dict(epochs=2, mini_batch_size=50, optimizer="Adam", optimizer_param={"lr": 0.001},
                   evaluate_sample_num_per_epoch=200, verbose=False)
    options.update(kwargs)
    trainer = book.Trainer(network, x_train[:n], t_train[:n] if labels is None else labels,
                           x_test[:500], t_test[:500], **options)
    trainer.train()
    return network, trainer


def test_trainer_trains_the_users_params_in_place(mnist):
    (_, _), (x_test, t_test) = mnist
    np.random.seed(3)
    untrained = SimpleConvNet().accuracy(x_test[:500], t_test[:500])
    network, trainer = trained(mnist)
    arrays = {key: id(value) for key, value in network.params.items()}
    assert len(trainer.train_loss_list) == 2 * 1500 // 50
    assert len(trainer.train_acc_list) == len(trainer.test_acc_list) == len(trainer.epoch_seconds) == 2
    # accuracies on the first 200 images: multiples of 1/200
    assert all(round(a * 200, 6) == round(a * 200) for a in trainer.test_acc_list + trainer.train_acc_list)
    assert trainer.train_loss_list[-1] < trainer.train_loss_list[0]
    assert network.accuracy(x_test[:500], t_test[:500]) > max(untrained + 0.3, 0.6)
    assert {key: id(value) for key, value in network.params.items()} == arrays
    # the network goes on working with the trained weights, as a fresh one would
    fresh = SimpleConvNet()
    fresh.params = {key: value.copy() for key, value in network.params.items()}
    np.testing.assert_array_equal(network.predict(x_test[:50]), fresh.predict(x_test[:50]))


def test_trainer_repeats_with_numpys_seed_and_takes_one_hot_labels(mnist):
    (_, t_train), _ = mnist
    first, _ = trained(mnist)
    one_hot = np.eye(10)[t_train[:1500]]
    again, _ = trained(mnist, labels=one_hot)
    for key in first.params:
        np.testing.assert_array_equal(first.params[key], again.params[key])
    other, _ = trained(mnist, seed=4)
    assert not np.array_equal(first.params["W1"], other.params["W1"])


@pytest.mark.parametrize("name, param", [("sgd", {"lr": 0.1}), ("MOMENTUM", {"lr": 0.01, "momentum": 0.5}),
                                          ("Nesterov", {"lr": 0.01}), ("AdaGrad", {"lr": 0.01}),
                                          ("RMSprop", {"lr": 0.001, "decay_rate": 0.9})])
def test_trainer_takes_the_books_optimizers(mnist, name, param):
    np.random.seed(3)
    before = SimpleConvNet().params["W2"].copy()
    network, trainer = trained(mnist, n=200, epochs=1, optimizer=name, optimizer_param=param)
    assert type(trainer.optimizer).__name__.lower() == name.lower()
    for setting, value in param.items():
        assert getattr(trainer.optimizer, setting) == value
    assert np.isfinite(trainer.train_loss_list).all()
    assert not np.array_equal(network.params["W2"], before)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "LBFGS"}, "not one of SGD"),
    ({"optimizer": "SGD", "optimizer_param": {"lr": 0.1, "momentum": 0.9}}, "do not fit SGD"),
    ({"epochs": 0}, "epochs 0"),
    ({"mini_batch_size": -1}, "mini_batch_size -1"),
])
def test_trainer_bad_arguments_are_one_line_errors(mnist, kwargs, message):
    (x_train, t_train), (x_test, t_test) = mnist
    with pytest.raises(ValueError, match=message) as error:
        book.Trainer(SimpleConvNet(), x_train[:10], t_train[:10], x_test[:10], t_test[:10], **kwargs)
    assert "\n" not in str(error.value)


def test_trainer_refuses_a_budget_too_small(mnist):
    (x_train, t_train), (x_test, t_test) = mnist
    network = SimpleConvNet()
    before = {key: value.copy() for key, value in network.params.items()}
    trainer = book.Trainer(network, x_train[:100], t_train[:100], x_test[:10], t_test[:10],
                           verbose=False, max_ram="20M")
    with pytest.raises(LowmemError, match="max_ram=20,971,520 bytes is too small"):
        trainer.train()
    for key, value in before.items():
        np.testing.assert_array_equal(network.params[key], value)
