"""Tiled convolution and pooling against plain reference implementations, and
numerical gradient checks of every layer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_cnn.engine import columns as columns_module
from lowmem_cnn.engine.columns import column_tiles, tile_rows, windows
from lowmem_cnn.engine.layers import (Affine, Convolution, Gradients, MaxPooling, ReLU,
                               softmax_cross_entropy)
from lowmem_cnn.engine.workspace import Context, Recording, Workspace


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
    """A convolution, its weights in the book's layout, and the tiles to put in its
    contexts ({id(conv): tile_rows}: a tile is no attribute of the layer)."""
    conv = Convolution(in_shape, filters, size, stride, pad)
    book_w = rng.standard_normal((filters, in_shape[2], size, size)).astype(dtype)
    conv.W = np.ascontiguousarray(conv.from_book("W", book_w, book_w.dtype))
    conv.b = rng.standard_normal(filters).astype(dtype)
    return conv, book_w, {id(conv): tile_rows}


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


def check_conv_against_reference(conv, book_w, x, rng, tiles, ws=None, rtol=1e-10):
    """Forward and backward of `conv` on `x` (with `tiles`, in `ws` or a fresh
    workspace) against the direct convolution and the gradients of sum(out * dout)
    computed directly."""
    n, h, w, _c = x.shape
    k, stride, pad = conv.size, conv.stride, conv.pad
    ctx = Context(Workspace() if ws is None else ws, True, tiles)
    out, saved = conv.forward(x.copy(), ctx)
    expected = reference_conv(nchw(x), book_w, conv.b, stride, pad)
    np.testing.assert_allclose(nchw(out), expected, rtol=rtol, atol=rtol)

    dout = rng.standard_normal(out.shape)
    grads = Gradients({"W": np.full_like(conv.W, np.nan), "b": np.full_like(conv.b, np.nan)})
    grads.restart()  # the first tile overwrites the stale values, the others add
    dx = conv.backward(dout.copy(), saved, grads, ctx)
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
    np.testing.assert_allclose(conv.to_book("W", grads.value("W")), dw4.transpose(3, 2, 0, 1),
                               rtol=10 * rtol, atol=10 * rtol)
    np.testing.assert_allclose(grads.value("b"), dout.sum(axis=(0, 1, 2)), rtol=10 * rtol,
                               atol=10 * rtol)


@settings(max_examples=120, deadline=None)
@given(conv_cases)
def test_tiled_convolution_matches_reference(case):
    n, c, h, w, f, k, stride, pad, tile_rows, seed = case
    rng = np.random.default_rng(seed)
    conv, book_w, tiles = make_conv(rng, (h, w, c), f, k, stride, pad, tile_rows)
    check_conv_against_reference(conv, book_w, rng.standard_normal((n, h, w, c)), rng, tiles)


class PoisonedWorkspace(Workspace):
    """Hands out arrays full of NaN (masks all True, integers their largest value) on
    every call, so that a layer relying on what an array held before (zeros, or a
    previous micro-batch's values) fails; records the largest size of each array, and
    the last array handed out under each name."""

    def __init__(self):
        super().__init__()
        self.sizes = {}
        self.handed = {}

    def array(self, owner, name, shape, dtype):
        a = super().array(owner, name, shape, dtype)
        if a.dtype.kind == "f":
            a[...] = np.nan
        else:  # masks and positions: all set
            a[...] = True if a.dtype == bool else np.iinfo(a.dtype).max
        key = (id(owner), name)
        self.sizes[key] = max(self.sizes.get(key, 0), a.nbytes)
        self.handed[key] = a
        return a

    def holds(self, a) -> bool:
        """`a` is (part of) an array this workspace handed out."""
        return any(np.shares_memory(a, held) for held in self.handed.values())


def dry_run(convs, m, train, tiles, dtype=np.float64) -> Recording:
    """What a Recording workspace sees of m images through `convs` in a row (forward,
    then backward from the last when training), as the planner runs it: dry inputs,
    no gradients; a dry call computes nothing."""
    recording = Recording()
    ctx = Context(recording, train, tiles)
    a = np.broadcast_to(np.zeros((), dtype), (m, *convs[0].in_shape))
    saved = []
    for conv in convs:
        a, keep = conv.forward(a, ctx)
        saved.append((a, keep))
    if train:
        for conv, (out, keep) in zip(reversed(convs), reversed(saved), strict=True):
            conv.backward(out, keep, None, ctx)
    return recording


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
    conv, book_w, tiles = make_conv(rng, (h, w, c), f, k, stride, pad, rows)
    conv.need_input_grad = need_input_grad
    ws = PoisonedWorkspace()
    for m in (n, n + 2, n):
        check_conv_against_reference(conv, book_w, rng.standard_normal((m, h, w, c)), rng, tiles,
                                      ws)
    for dtype in (np.float32,):
        conv.W, conv.b = conv.W.astype(dtype), conv.b.astype(dtype)
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
        out32, _ = conv.forward(x, Context(ws, False, tiles))
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
    """Every array the layer allocates comes from the workspace, and a dry run of the
    same calls (a Recording workspace) adds up to their bytes: the planner's promise
    rests on it. The dry run computes nothing: the parameters, the input and the
    gradients it is handed stay as they were, and a real pass gives the same after it."""
    rng = np.random.default_rng(8)
    conv, _, tiles = make_conv(rng, shape, filters, size, stride, pad, rows, np.float32)
    conv.need_input_grad = need_input_grad
    m = 7
    x = rng.standard_normal((m, *shape)).astype(np.float32)
    dout = rng.standard_normal((m, *conv.out_shape)).astype(np.float32)
    params = (conv.W.copy(), conv.b.copy())

    def real_pass():
        ws = PoisonedWorkspace()
        ctx = Context(ws, train, tiles)
        given = x.copy()
        out, saved = conv.forward(given, ctx)
        assert ws.holds(out)  # nothing outside the workspace: no output of its own
        results = [out.copy()]
        if train:
            # what backward needs is the padded input, kept in the workspace, or the
            # input itself (no padding)
            assert np.shares_memory(saved, given) == (not pad)
            assert pad == 0 or ws.holds(saved)
            grads = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
            dx = conv.backward(dout.copy(), saved, grads, ctx)
            results += [grads.value("W"), grads.value("b")]
            if need_input_grad:
                assert ws.holds(dx) or np.shares_memory(dx, given)
                results.append(dx.copy())
            else:
                assert dx is None
        else:
            assert saved is None
        return ws, results

    ws, before = real_pass()
    recording = Recording()
    ctx = Context(recording, train, tiles)
    dry_x = x.copy()
    out, saved = conv.forward(dry_x, ctx)
    assert out.shape == (m, *conv.out_shape) and (saved is None) == (not train)
    if train:
        stale = Gradients({"W": np.full_like(conv.W, 7), "b": np.full_like(conv.b, 7)})
        stale.restart()
        dx = conv.backward(out, saved, stale, ctx)
        assert (dx is None) == (not need_input_grad)
        assert dx is None or dx.shape == x.shape
        assert (stale.value("W") == 7).all() and (stale.value("b") == 7).all()
    np.testing.assert_array_equal(dry_x, x)
    np.testing.assert_array_equal(conv.W, params[0])
    np.testing.assert_array_equal(conv.b, params[1])
    assert sum(ws.sizes.values()) == ws.held_bytes() == recording.held_bytes()
    again, after = real_pass()
    assert sum(again.sizes.values()) == recording.held_bytes()
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9),
       st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_pooling_matches_reference(n, c, h, w, size, stride, seed):
    size = min(size, h, w)
    rng = np.random.default_rng(seed)
    # few distinct values, so that ties occur and the first maximum must win
    x = rng.integers(-3, 4, (n, h, w, c)).astype(np.float64)
    pool = MaxPooling((h, w, c), size, stride)
    ctx = Context(PoisonedWorkspace(), True)
    out, saved = pool.forward(x.copy(), ctx)
    np.testing.assert_array_equal(nchw(out), reference_pool(nchw(x), size, stride))
    dout = rng.standard_normal(out.shape)
    dx = pool.backward(dout, saved, {}, ctx)
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
    largest of each shared array once: less than each alone, and exactly what one dry
    run of them in a row records."""
    rng = np.random.default_rng(9)
    specs = [((8, 8, 2), 16, 3, 1, 1), ((8, 8, 16), 4, 3, 1, 0), ((6, 6, 4), 16, 3, 1, 2),
             ((8, 8, 16), 3, 3, 2, 1), ((4, 4, 3), 5, 2, 1, 1)]
    made = [make_conv(rng, shape, f, k, s, p, 40) for shape, f, k, s, p in specs]
    convs = [conv for conv, _, _ in made]
    tiles = {key: rows for _, _, conv_tiles in made for key, rows in conv_tiles.items()}
    # pairs of outputs, of input gradients, transposed columns, no padding, pad 2, col2im
    assert [(conv.geometry.group, conv.geometry.grad_group) for conv in convs] == [
        (2, 2), (2, 2), (2, 2), (1, 1), (1, 2)]
    x = rng.standard_normal((3, 8, 8, 2))
    douts = [rng.standard_normal((3, *conv.out_shape)) for conv in convs]

    def run(ws_for):
        outs, saved, a = [], [], x.copy()
        for conv in convs:
            a, keep = conv.forward(a, Context(ws_for(conv), train, tiles))
            outs.append(a.copy())
            saved.append(keep)
            a = np.maximum(a, 0, out=a)  # ReLU in place, as in a network
        grads = []
        if train:
            for conv, keep, dout in zip(reversed(convs), reversed(saved), reversed(douts),
                                        strict=True):
                g = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
                dx = conv.backward(dout.copy(), keep, g, Context(ws_for(conv), train, tiles))
                grads.append((dx.copy(), g.value("W"), g.value("b")))
        return outs, grads

    shared = PoisonedWorkspace()
    together = run(lambda conv: shared)
    own = {id(conv): PoisonedWorkspace() for conv in convs}
    alone = run(lambda conv: own[id(conv)])
    for a, b in zip(together[0] + [g for t in together[1] for g in t],
                    alone[0] + [g for t in alone[1] for g in t], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)

    held = sum(shared.sizes.values())
    assert held == shared.held_bytes()
    assert held < sum(sum(ws.sizes.values()) for ws in own.values())
    # the largest of each array (by owner and name) once: some are the convolutions'
    largest = {}
    for ws in own.values():
        for key, nbytes in ws.sizes.items():
            largest[key] = max(largest.get(key, 0), nbytes)
    assert len(largest) < sum(len(ws.sizes) for ws in own.values())
    assert held == sum(largest.values())
    assert held == dry_run(convs, 3, train, tiles).held_bytes()
    # and any two in a row, dry
    for first, second in zip(convs, convs[1:], strict=False):
        both = dry_run([first, second], 3, train, tiles).held_bytes()
        assert both < (dry_run([first], 3, train, tiles).held_bytes()
                       + dry_run([second], 3, train, tiles).held_bytes())


@pytest.mark.parametrize("channels", [1, 2])  # the transposed columns and the usual ones
def test_one_row_tiles_and_ragged_tiles_agree(channels):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 9, 9, channels))
    dout = rng.standard_normal((5, 9, 9, 3))
    results = []
    for rows in (1, 7, 9, 49, 81, 100, 10_000):
        conv, _, tiles = make_conv(np.random.default_rng(2), (9, 9, channels), 3, 3, 1, 1, rows)
        ctx = Context(Workspace(), True, tiles)
        out, saved = conv.forward(x.copy(), ctx)
        grads = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
        dx = conv.backward(dout.copy(), saved, grads, ctx)
        results.append((out, dx, grads.value("W")))
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


def check_layer_gradients(layer, x, rng, params=(), tiles=None):
    """Each forward in a fresh workspace (`tiles`: the layer's), its backward in the
    same one, as a network runs them."""
    tiles = tiles or {}
    ctx = Context(Workspace(), True, tiles)
    out, saved = layer.forward(x.copy(), ctx)
    dout = rng.standard_normal(out.shape)
    # adding onto ones, and writing over stale values after restart(), give the same
    added = Gradients({name: np.ones_like(getattr(layer, name)) for name in params})
    other = Context(Workspace(), True, tiles)
    layer.backward(dout.copy(), layer.forward(x.copy(), other)[1], added, other)
    grads = Gradients({name: np.full_like(getattr(layer, name), np.nan) for name in params})
    grads.restart()
    dx = layer.backward(dout.copy(), saved, grads, ctx)
    for name in params:
        np.testing.assert_allclose(added.value(name) - 1, grads.value(name), rtol=1e-12, atol=1e-12)

    def loss():
        return float((layer.forward(x.copy(), Context(Workspace(), False, tiles))[0] * dout).sum())

    if dx is not None:
        np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-7)
    for name in params:
        np.testing.assert_allclose(grads.value(name), numerical_grad(
            loss, getattr(layer, name)), rtol=1e-5, atol=1e-7)


def test_conv_gradients_numerically():
    rng = np.random.default_rng(3)
    conv, _, tiles = make_conv(rng, (6, 5, 2), 3, 3, 2, 1, 4)
    check_layer_gradients(conv, rng.standard_normal((2, 6, 5, 2)), rng, ("W", "b"), tiles)


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
    conv, book_w, _ = make_conv(rng, (7, 7, 3), 4, 3, 1, 0, 5)
    np.testing.assert_array_equal(conv.to_book("W", conv.W), book_w)
    affine = Affine((2, 3, 4), 6)  # maps flatten in (C, H, W) order in the book
    book = rng.standard_normal((24, 6))
    inside = affine.from_book("W", book, book.dtype)
    np.testing.assert_array_equal(affine.to_book("W", inside), book)
    x_hwc = rng.standard_normal((1, 2, 3, 4))
    np.testing.assert_allclose(x_hwc.reshape(1, -1) @ inside,
                               x_hwc.transpose(0, 3, 1, 2).reshape(1, -1) @ book)


@pytest.mark.parametrize("size", [7, 9])
def test_filter_larger_than_input_is_refused(size):
    with pytest.raises(ValueError, match="larger"):
        Convolution((6, 6, 1), 2, size, 1, 0)
