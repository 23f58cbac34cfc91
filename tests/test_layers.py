"""Tiled convolution and pooling against plain reference implementations, and
numerical gradient checks of every layer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_cnn import columns as columns_module
from lowmem_cnn.columns import column_tiles, tile_rows, windows
from lowmem_cnn.layers import (Affine, Convolution, Gradients, MaxPooling, ReLU,
                               softmax_cross_entropy)
from lowmem_cnn.workspace import Workspace


def reference_conv(x, w, b, stride, pad):
    """Direct convolution, NCHW like the book: out[n,f,i,j] = sum x_pad[n,c,i*s+p,j*s+q] w[f,c,p,q] + b[f]."""
    n, _c, h, wd = x.shape
    f, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def reference_pool(x, size, stride):
    n, c, h, w = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * stride : i * stride + size, j * stride : j * stride + size
                                ].max(axis=(2, 3))
    return out


def nhwc(a):
    return a.transpose(0, 2, 3, 1)


def nchw(a):
    return a.transpose(0, 3, 1, 2)


def make_conv(rng, in_shape, filters, size, stride, pad, tile_rows, dtype=np.float64):
    conv = Convolution(in_shape, filters, size, stride, pad)
    book_w = rng.standard_normal((filters, in_shape[2], size, size)).astype(dtype)
    conv.W = np.ascontiguousarray(conv.from_book("W", book_w))
    conv.b = rng.standard_normal(filters).astype(dtype)
    conv.tile_rows = tile_rows
    return conv, book_w


def numerical_grad(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


conv_cases = st.tuples(
    st.integers(1, 3),  # images
    st.integers(1, 3),  # channels
    st.integers(3, 8),  # height
    st.integers(3, 8),  # width
    st.integers(1, 4),  # filters
    st.integers(1, 3),  # filter size
    st.integers(1, 3),  # stride
    st.integers(0, 2),  # pad
    st.integers(1, 200),  # tile rows (1 row, and sizes that do not divide the rows)
    st.integers(0, 2**32 - 1),
)


def check_conv_against_reference(conv, book_w, x, rng, ws=None, rtol=1e-10):
    """Forward and backward of `conv` on `x` against the direct convolution and the
    gradients of sum(out * dout) computed directly."""
    n, h, w, _c = x.shape
    k, stride, pad = conv.size, conv.stride, conv.pad
    out, saved = conv.forward(x.copy(), True, ws)
    expected = reference_conv(nchw(x), book_w, conv.b, stride, pad)
    np.testing.assert_allclose(nchw(out), expected, rtol=rtol, atol=rtol)

    dout = rng.standard_normal(out.shape)
    grads = Gradients({"W": np.full_like(conv.W, np.nan), "b": np.full_like(conv.b, np.nan)})
    grads.restart()  # the first tile overwrites the stale values, the others add
    dx = conv.backward(dout.copy(), saved, grads, ws)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = out.shape[1:3]
    w4 = book_w.transpose(2, 3, 1, 0)  # (k, k, c, f)
    dxp, dw4 = np.zeros_like(xp), np.zeros_like(w4)
    for i in range(k):
        for j in range(k):
            xs = xp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride]
            dxp[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride] += (
                dout @ w4[i, j].T)
            dw4[i, j] = np.tensordot(xs, dout, axes=([0, 1, 2], [0, 1, 2]))
    if conv.need_input_grad:
        assert dx.flags.c_contiguous  # the layer before may reshape it
        np.testing.assert_allclose(dx, dxp[:, pad : pad + h, pad : pad + w], rtol=10 * rtol,
                                   atol=10 * rtol)
    else:
        assert dx is None
    np.testing.assert_allclose(conv.to_book("W", grads["W"]), dw4.transpose(3, 2, 0, 1),
                               rtol=10 * rtol, atol=10 * rtol)
    np.testing.assert_allclose(grads["b"], dout.sum(axis=(0, 1, 2)), rtol=10 * rtol,
                               atol=10 * rtol)


@settings(max_examples=120, deadline=None)
@given(conv_cases)
def test_tiled_convolution_matches_reference(case):
    n, c, h, w, f, k, stride, pad, tile_rows, seed = case
    rng = np.random.default_rng(seed)
    conv, book_w = make_conv(rng, (h, w, c), f, k, stride, pad, tile_rows)
    check_conv_against_reference(conv, book_w, rng.standard_normal((n, h, w, c)), rng)


class PoisonedWorkspace(Workspace):
    """Hands out arrays full of NaN on every call, so that a layer relying on what an
    array held before (zeros, or a previous micro-batch's values) fails; records the
    largest size of each array."""

    def __init__(self):
        super().__init__()
        self.sizes = {}

    def array(self, owner, name, shape, dtype):
        a = super().array(owner, name, shape, dtype)
        a[...] = np.nan
        key = (id(owner), name)
        self.sizes[key] = max(self.sizes.get(key, 0), a.nbytes)
        return a


wide_cases = st.tuples(
    st.integers(1, 3),  # images
    st.sampled_from([1, 2, 3, 16, 32, 64]),  # channels
    st.integers(3, 9),  # height
    st.integers(3, 9),  # width
    st.sampled_from([1, 3, 16, 64]),  # filters
    st.integers(1, 3),  # filter size
    st.integers(1, 2),  # stride
    st.integers(0, 2),  # pad
    st.integers(1, 300),  # tile rows
    st.booleans(),  # the input gradient is needed
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=80, deadline=None)
@given(wide_cases)
def test_convolution_of_many_channels_in_a_reused_workspace(case):
    """Channels 1-64, every array from one workspace, poisoned, and used by micro-batches
    of changing sizes (the padded border must be zeroed each time); float32 as trained."""
    n, c, h, w, f, k, stride, pad, rows, need_input_grad, seed = case
    rng = np.random.default_rng(seed)
    if k > min(h, w) + 2 * pad:
        return
    conv, book_w = make_conv(rng, (h, w, c), f, k, stride, pad, rows)
    conv.need_input_grad = need_input_grad
    ws = PoisonedWorkspace()
    for m in (n, n + 2, n):
        check_conv_against_reference(conv, book_w, rng.standard_normal((m, h, w, c)), rng, ws)
    for dtype in (np.float32,):
        conv.W, conv.b = conv.W.astype(dtype), conv.b.astype(dtype)
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
        out32, _ = conv.forward(x, False, ws)
        expected = reference_conv(nchw(x.astype(np.float64)), book_w, conv.b.astype(np.float64),
                                  stride, pad)
        np.testing.assert_allclose(nchw(out32), expected, rtol=1e-4, atol=1e-4 * np.sqrt(conv.width))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("need_input_grad", [False, True])
@pytest.mark.parametrize("shape,filters,size,stride,pad,rows", [
    ((28, 28, 1), 16, 3, 1, 1, 29127),  # DeepConvNet's layers, with the plan's tiles at 2G
    ((28, 28, 16), 16, 3, 1, 1, 1820),
    ((14, 14, 16), 32, 3, 1, 1, 1820),
    ((14, 14, 32), 32, 3, 1, 2, 910),
    ((8, 8, 32), 64, 3, 1, 1, 910),
    ((8, 8, 64), 64, 3, 1, 1, 455),
    ((9, 9, 3), 4, 3, 2, 1, 7),  # col2im: stride 2
    ((6, 6, 2), 3, 1, 1, 2, 1),  # col2im: pad above size - 1; one-row tiles
    ((6, 6, 2), 3, 3, 1, 0, 5),  # no padding: the input itself is kept
])
def test_memory_states_exactly_what_the_layer_holds(train, need_input_grad, shape, filters, size,
                                                    stride, pad, rows):
    """Every array the layer allocates comes from the workspace, and `memory` adds up to
    their bytes: the planner's promise rests on it."""
    rng = np.random.default_rng(8)
    conv, _ = make_conv(rng, shape, filters, size, stride, pad, rows, np.float32)
    conv.need_input_grad = need_input_grad
    m = 7
    ws = PoisonedWorkspace()
    x = rng.standard_normal((m, *shape)).astype(np.float32)
    out, saved = conv.forward(x, train, ws)
    if train:
        grads = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
        conv.backward(rng.standard_normal(out.shape).astype(np.float32), saved, grads, ws)
    mem = conv.memory(m, 4, train)
    assert mem.workspace == sum(ws.sizes.values())
    assert (mem.out, mem.kept, mem.forward_scratch, mem.grad_in, mem.backward_scratch) == (0,) * 5
    assert mem.keeps_input == (not pad)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_pooling_matches_reference(n, c, h, w, size, stride, seed):
    size = min(size, h, w)
    rng = np.random.default_rng(seed)
    # few distinct values, so that ties occur and the first maximum must win
    x = rng.integers(-3, 4, (n, h, w, c)).astype(np.float64)
    pool = MaxPooling((h, w, c), size, stride)
    out, saved = pool.forward(x.copy(), train=True)
    np.testing.assert_array_equal(nchw(out), reference_pool(nchw(x), size, stride))
    dout = rng.standard_normal(out.shape)
    dx = pool.backward(dout, saved, {})
    expected = np.zeros_like(x)
    oh, ow = out.shape[1:3]
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    window = x[a, i * stride : i * stride + size, j * stride : j * stride + size, ch]
                    p, q = np.unravel_index(np.argmax(window), window.shape)  # first maximum
                    expected[a, i * stride + p, j * stride + q, ch] += dout[a, i, j, ch]
    np.testing.assert_allclose(dx, expected)


@pytest.mark.parametrize("train", [False, True])
def test_convolutions_in_a_row_share_a_workspace(train):
    """Several convolutions in one thread's workspace (scratch arrays shared, each input
    gradient written over the kept input) give what each gives alone, and hold the
    largest of each shared array once, as shared_workspace says."""
    rng = np.random.default_rng(9)
    specs = [((8, 8, 2), 16, 3, 1, 1), ((8, 8, 16), 4, 3, 1, 0), ((6, 6, 4), 16, 3, 1, 2),
             ((8, 8, 16), 3, 3, 2, 1), ((4, 4, 3), 5, 2, 1, 1)]
    convs = [make_conv(rng, shape, f, k, s, p, 40)[0] for shape, f, k, s, p in specs]
    # pairs of outputs, of input gradients, transposed columns, no padding, pad 2, col2im
    assert [(conv.group, conv.grad_group) for conv in convs] == [(2, 2), (2, 2), (2, 2),
                                                                   (1, 1), (1, 2)]
    x = rng.standard_normal((3, 8, 8, 2))
    douts = [rng.standard_normal((3, *conv.out_shape)) for conv in convs]

    def run(ws_for):
        outs, saved, a = [], [], x.copy()
        for conv in convs:
            a, keep = conv.forward(a, train, ws_for(conv))
            outs.append(a.copy())
            saved.append(keep)
            a = np.maximum(a, 0, out=a)  # ReLU in place, as in a network
        grads = []
        if train:
            for conv, keep, dout in zip(reversed(convs), reversed(saved), reversed(douts),
                                        strict=True):
                g = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
                dx = conv.backward(dout.copy(), keep, g, ws_for(conv))
                grads.append((dx.copy(), g["W"], g["b"]))
        return outs, grads

    shared = PoisonedWorkspace()
    together = run(lambda conv: shared)
    alone = run(lambda conv: Workspace())
    for a, b in zip(together[0] + [g for t in together[1] for g in t],
                    alone[0] + [g for t in alone[1] for g in t], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    own = sum(conv.memory(3, 8, train).workspace - sum(conv.shared_workspace(3, 8, train).values())
              for conv in convs)
    names = {name for conv in convs for name in conv.shared_workspace(3, 8, train)}
    largest = sum(max(conv.shared_workspace(3, 8, train).get(name, 0) for conv in convs)
                  for name in names)
    assert sum(shared.sizes.values()) == own + largest


@pytest.mark.parametrize("channels", [1, 2])  # the transposed columns and the usual ones
def test_one_row_tiles_and_ragged_tiles_agree(channels):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 9, 9, channels))
    dout = rng.standard_normal((5, 9, 9, 3))
    results = []
    for rows in (1, 7, 9, 49, 81, 100, 10_000):
        conv, _ = make_conv(np.random.default_rng(2), (9, 9, channels), 3, 3, 1, 1, rows)
        out, saved = conv.forward(x.copy(), train=True)
        grads = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
        dx = conv.backward(dout.copy(), saved, grads)
        results.append((out, dx, grads["W"]))
    for result in results[1:]:
        for a, b in zip(result, results[0], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("limit,expected", [
    (1, 1), (6, 6),  # less than a line: rows
    (7, 7), (20, 14),  # lines
    (35, 35), (80, 70), (1000, 105),  # whole images, at most all of them
])
def test_tile_rows_are_whole_images_or_lines_when_one_fits(limit, expected):
    assert tile_rows(limit, per_image=35, per_line=7, total=105) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(3, 7), st.integers(3, 7),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 60), st.booleans())
def test_column_tiles_are_the_rows_of_im2col(n, c, h, w, size, stride, rows, flip):
    """Both layouts (transposed for few channels), any tile size, against the whole
    column matrix made row by row."""
    rng = np.random.default_rng(n * 1000 + c * 100 + h * 10 + w)
    x = rng.standard_normal((n, h, w, c))
    size = min(size, h, w)
    view = windows(x, size, stride)
    whole = np.array([view[i, a, b].ravel() for i in range(view.shape[0])
                      for a in range(view.shape[1]) for b in range(view.shape[2])])
    saved = columns_module.TRANSPOSED_MAX_CHANNELS
    columns_module.TRANSPOSED_MAX_CHANNELS = c if flip else 0
    try:
        buffer = np.full(rows * whole.shape[1], np.nan)
        made = np.concatenate([cols.copy() for _, _, cols in column_tiles(view, rows, buffer)])
    finally:
        columns_module.TRANSPOSED_MAX_CHANNELS = saved
    np.testing.assert_array_equal(made, whole)


def check_layer_gradients(layer, x, rng, params=()):
    out, saved = layer.forward(x.copy(), train=True)
    dout = rng.standard_normal(out.shape)
    # adding onto ones, and writing over stale values after restart(), give the same
    added = Gradients({name: np.ones_like(getattr(layer, name)) for name in params})
    layer.backward(dout.copy(), layer.forward(x.copy(), train=True)[1], added)
    grads = Gradients({name: np.full_like(getattr(layer, name), np.nan) for name in params})
    grads.restart()
    dx = layer.backward(dout.copy(), saved, grads)
    for name in params:
        np.testing.assert_allclose(added[name] - 1, grads[name], rtol=1e-12, atol=1e-12)

    def loss():
        return float((layer.forward(x.copy(), train=False)[0] * dout).sum())

    if dx is not None:
        np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)
    for name in params:
        np.testing.assert_allclose(grads[name], numerical_grad(
            loss, getattr(layer, name)), rtol=1e-5, atol=1e-7)


def test_conv_gradients_numerically():
    rng = np.random.default_rng(3)
    conv, _ = make_conv(rng, (6, 5, 2), 3, 3, 2, 1, 4)
    check_layer_gradients(conv, rng.standard_normal((2, 6, 5, 2)), rng, ("W", "b"))


def test_affine_gradients_numerically():
    rng = np.random.default_rng(4)
    affine = Affine((3, 2, 2), 5)
    affine.W, affine.b = rng.standard_normal((12, 5)), rng.standard_normal(5)
    check_layer_gradients(affine, rng.standard_normal((4, 3, 2, 2)), rng, ("W", "b"))


def test_relu_and_pool_gradients_numerically():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 6, 3))  # distinct values: the max is never a tie
    check_layer_gradients(ReLU((6, 6, 3)), x, rng)
    check_layer_gradients(MaxPooling((6, 6, 3), 2, 2), x, rng)
    check_layer_gradients(MaxPooling((6, 6, 3), 3, 1), x, rng)


def test_softmax_cross_entropy_gradient_numerically():
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((4, 10))
    labels = np.array([3, 0, 9, 3])
    _, grad = softmax_cross_entropy(scores.copy(), labels, 4)

    def loss():
        return softmax_cross_entropy(scores.copy(), labels, 4)[0] / 4

    np.testing.assert_allclose(grad, numerical_grad(loss, scores), rtol=1e-5, atol=1e-8)


def test_book_layout_round_trip():
    rng = np.random.default_rng(7)
    conv, book_w = make_conv(rng, (7, 7, 3), 4, 3, 1, 0, 5)
    np.testing.assert_array_equal(conv.to_book("W", conv.W), book_w)
    affine = Affine((2, 3, 4), 6)  # maps flatten in (C, H, W) order in the book
    book = rng.standard_normal((24, 6))
    inside = affine.from_book("W", book)
    np.testing.assert_array_equal(affine.to_book("W", inside), book)
    x_hwc = rng.standard_normal((1, 2, 3, 4))
    np.testing.assert_allclose(x_hwc.reshape(1, -1) @ inside,
                               x_hwc.transpose(0, 3, 1, 2).reshape(1, -1) @ book)


@pytest.mark.parametrize("size", [7, 9])
def test_filter_larger_than_input_is_refused(size):
    with pytest.raises(ValueError, match="larger"):
        Convolution((6, 6, 1), 2, size, 1, 0)
