"""Batch normalization (the book's chapter 6): the formulas at float64, numerical
gradients, and a config that uses it end to end (train, checkpoint, resume bitwise,
eval, predict)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_lowmem

from lowmem_cnn.files.config import load_config
from lowmem_cnn.engine.layers import BatchNormalization, Gradients, Statistics
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import chosen_plan
from lowmem_cnn.engine.workspace import Context, Workspace

EPS = 1e-6


def book_forward(x, gamma, beta):
    """The book's train-mode forward on rows (N, D): its intermediate values."""
    mu = x.mean(axis=0)
    xc = x - mu
    var = np.mean(xc**2, axis=0)
    std = np.sqrt(var + EPS)
    xn = xc / std
    return gamma * xn + beta, (xc, std, xn, mu, var)


def book_backward(dout, gamma, cache):
    """The book's backward, step by step through the graph of its forward."""
    xc, std, xn, _, _ = cache
    n = len(dout)
    dbeta = dout.sum(axis=0)
    dgamma = np.sum(xn * dout, axis=0)
    dxn = gamma * dout
    dxc = dxn / std
    dstd = -np.sum((dxn * xc) / (std * std), axis=0)
    dvar = 0.5 * dstd / std
    dxc += (2.0 / n) * xc * dvar
    dmu = np.sum(dxc, axis=0)
    return dxc - dmu / n, dgamma, dbeta


def layer(shape, rng):
    bn = BatchNormalization(shape)
    channels = shape[-1]
    bn.gamma = rng.uniform(0.5, 1.5, channels)
    bn.beta = rng.standard_normal(channels)
    bn.running_mean = rng.standard_normal(channels)
    bn.running_var = rng.uniform(0.5, 2.0, channels)
    return bn


def grads_of(bn):
    return Gradients({name: np.zeros(shape) for name, shape in bn.param_shapes.items()})


def statistics_of(bn):
    """The Statistics a thread gives batch normalization, apart from its gradients."""
    return Statistics({name: np.zeros(shape) for name, shape in bn.state_shapes.items()})


@pytest.mark.parametrize("shape, m", [((5,), 7), ((4, 3, 6), 3)])
def test_forward_and_backward_follow_the_books_formulas(shape, m):
    """Per unit after an affine layer, per channel (over images and positions) after a
    convolution; float64."""
    rng = np.random.default_rng(0)
    bn = layer(shape, rng)
    x = rng.standard_normal((m, *shape)) * 3 + 1
    rows = x.reshape(-1, shape[-1])
    expected, cache = book_forward(rows, bn.gamma, bn.beta)
    dout = rng.standard_normal(x.shape)
    dx_expected, dgamma, dbeta = book_backward(dout.reshape(rows.shape), bn.gamma, cache)

    statistics = statistics_of(bn)
    statistics.restart()
    ctx = Context(Workspace(), True, batch_images=m, statistics={id(bn): statistics})
    out, saved = bn.forward(x.copy(), ctx)
    np.testing.assert_allclose(out.reshape(rows.shape), expected, rtol=1e-12, atol=1e-12)
    grads = grads_of(bn)
    grads.restart()
    dx = bn.backward(dout.copy(), saved, grads, ctx)
    np.testing.assert_allclose(dx.reshape(rows.shape), dx_expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads.value("gamma"), dgamma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.value("beta"), dbeta, rtol=1e-12, atol=1e-12)
    # the batch's statistics, for the running ones
    np.testing.assert_allclose(statistics.value("running_mean"), cache[3], rtol=1e-12)
    np.testing.assert_allclose(statistics.value("running_var"), cache[4], rtol=1e-12)
    assert set(grads.names()) == {"gamma", "beta"}  # statistics are no gradients

    # evaluation: the running statistics
    out, _ = bn.forward(x.copy(), Context())
    running = (rows - bn.running_mean) / np.sqrt(bn.running_var + EPS) * bn.gamma + bn.beta
    np.testing.assert_allclose(out.reshape(rows.shape), running, rtol=1e-12, atol=1e-12)


def test_running_statistics_move_by_the_books_momentum():
    bn = layer((3,), np.random.default_rng(1))
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    batch = {"running_mean": np.array([1.0, 2.0, 3.0]), "running_var": np.array([4.0, 5.0, 6.0])}
    bn.update_state(batch)
    np.testing.assert_allclose(bn.running_mean, 0.9 * mean + 0.1 * batch["running_mean"])
    np.testing.assert_allclose(bn.running_var, 0.9 * var + 0.1 * batch["running_var"])


def numerical_gradient(f, x, h=1e-5):
    """Central differences, one value at a time (the book's numerical_gradient)."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        kept = x[index]
        x[index] = kept + h
        up = f()
        x[index] = kept - h
        down = f()
        x[index] = kept
        grad[index] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("shape, m", [((4,), 6), ((3, 2, 3), 2)])
def test_layer_gradients_numerically(shape, m):
    rng = np.random.default_rng(2)
    bn = layer(shape, rng)
    x = rng.standard_normal((m, *shape))
    weights = rng.standard_normal(x.shape)  # loss = sum(out * weights)

    def loss():
        out, _ = bn.forward(x.copy(), Context(Workspace(), True, batch_images=m))
        return float(np.sum(out * weights))

    ctx = Context(Workspace(), True, batch_images=m)
    _, saved = bn.forward(x.copy(), ctx)
    grads = grads_of(bn)
    grads.restart()
    dx = bn.backward(weights.copy(), saved, grads, ctx)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads.value("gamma"), numerical_gradient(loss, bn.gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads.value("beta"), numerical_gradient(loss, bn.beta), rtol=1e-6, atol=1e-8)


TINY_BN = """
[network]
name = "tiny-bn"
input_shape = [1, 6, 6]
weight_init = 0.5
[[network.layers]]
type = "conv"
filters = 3
size = 3
pad = 1
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
units = 5
[[network.layers]]
type = "batchnorm"
[[network.layers]]
type = "relu"
[[network.layers]]
type = "affine"
units = 4
"""


def test_network_gradient_numerically(tmp_path):
    """The whole network in training mode (batch statistics), float64: the parameter
    names follow the book's (gamma1 with W1), and every gradient matches central
    differences of the mean loss."""
    path = tmp_path / "tiny_bn.toml"
    path.write_text(TINY_BN)
    net = Network(load_config(str(path)).network, np.float64, 1)
    net.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(3)
    for key, value in net.params().items():  # scales and shifts away from 1 and 0
        if key.startswith(("gamma", "beta")):
            value += rng.uniform(-0.3, 0.3, value.shape)
    assert list(net.state()) == ["running_mean1", "running_var1", "running_mean2", "running_var2"]
    images = rng.integers(0, 256, (5, 36), dtype=np.uint8)
    labels = rng.integers(0, 4, 5)
    plan = chosen_plan(net, 5)  # one micro-batch: the statistics are the batch's
    state = {key: value.copy() for key, value in net.state().items()}
    net.accumulate_gradient(images, labels, plan)
    analytic = {key: grad.copy() for key, grad in net.grads(plan).items()}
    for key, value in state.items():  # the running statistics moved
        assert not np.allclose(net.state()[key], value)

    def loss():
        return net.accumulate_gradient(images, labels, plan)

    for key, param in net.params().items():
        np.testing.assert_allclose(analytic[key], numerical_gradient(loss, param, 1e-6),
                                   rtol=1e-5, atol=1e-8, err_msg=key)


# 600 real images, batches of 50: 12 updates an epoch, a checkpoint every 4.
ARGS = ["train", "--config", "deep_convnet_bn", "--limit", "600", "--epochs", "2", "--batch-size", "50",
        "--checkpoint-every", "4", "--max-ram", "256M", "--json"]


def test_a_batchnorm_config_end_to_end(mnist_dir, tmp_path, book_params):
    """Train it, stop it with SIGINT after an update it chooses and resume it: the same
    parameter file to the byte as a run never stopped; then eval and predict use the
    running statistics saved in it."""
    whole = tmp_path / "whole"
    whole.mkdir()
    result = run_lowmem(*ARGS, "--data-dir", mnist_dir, cwd=whole)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    # the child stops itself at update 6 (crash_child.py sends the signal from inside)
    child = subprocess.run([sys.executable, str(Path(__file__).with_name("crash_child.py")),
                            "--action", "SIGINT", "--at-update", "6", "--", *ARGS,
                            "--data-dir", str(mnist_dir)],
                           cwd=stopped, capture_output=True, text=True, timeout=600)
    assert child.returncode == 128 + signal.SIGINT, child.stderr
    resumed = run_lowmem("train", "--resume", "--json", "--data-dir", mnist_dir, cwd=stopped)
    assert resumed.returncode == 0, resumed.stderr
    assert (stopped / "params.pkl").read_bytes() == (whole / "params.pkl").read_bytes()

    evaluated = run_lowmem("eval", whole / "params.pkl", "--config", "deep_convnet_bn", "--json",
                           "--data-dir", mnist_dir, cwd=whole)
    assert evaluated.returncode == 0, evaluated.stderr
    # the test accuracy the run measured after its last epoch, on the same 10,000 images
    assert json.loads(evaluated.stdout.splitlines()[-1])["accuracy"] == summary["test_accuracy"]

    pytest.importorskip("PIL")
    from PIL import Image

    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a one
    Image.fromarray(digit).save(tmp_path / "one.png")
    predicted = run_lowmem("predict", whole / "params.pkl", tmp_path / "one.png", "--config",
                           "deep_convnet_bn", "--json", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    line = json.loads(predicted.stdout.splitlines()[-1])
    assert len(line["probabilities"]) == 10 and abs(sum(line["probabilities"]) - 1) < 1e-4
