"""The fused convolution + pooling layer against a convolution and a pooling layer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_cnn.engine.conv_pool import ConvolutionPooling
from lowmem_cnn.engine.layers import Convolution, Gradients, MaxPooling
from lowmem_cnn.engine.workspace import Context


def separate_and_fused(rng, in_shape, filters, size, pad, pool_size, integers):
    conv = Convolution(in_shape, filters, size, 1, pad)
    pool = MaxPooling(conv.out_shape, pool_size, pool_size)
    if integers:
        # small integers: every sum is exact, so ties are the same ties in both layers
        conv.W = rng.integers(-2, 3, conv.param_shapes["W"]).astype(np.float64)
        conv.b = rng.integers(-2, 3, filters).astype(np.float64)
    else:
        conv.W = rng.standard_normal(conv.param_shapes["W"])
        conv.b = rng.standard_normal(filters)
    return conv, pool, ConvolutionPooling(conv, pool)


cases = st.tuples(
    st.integers(1, 5),  # images
    st.integers(3, 11), st.integers(3, 11), st.integers(1, 3),  # H, W, C
    st.integers(1, 4),  # filters
    st.integers(1, 3),  # filter size
    st.integers(0, 1),  # pad
    st.integers(1, 3),  # pool size
    st.booleans(),  # integer data (ties)
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=150, deadline=None)
@given(cases, st.sampled_from([1, 2, 1 << 30]))
def test_fused_layer_equals_conv_then_pool(case, tile_images):
    m, h, w, c, filters, size, pad, pool_size, integers, seed = case
    if pool_size > min(h, w) + 2 * pad - size + 1:  # no room for a filter and a pool
        return
    rng = np.random.default_rng(seed)
    conv, pool, fused = separate_and_fused(rng, (h, w, c), filters, size, pad, pool_size, integers)
    x = (rng.integers(0, 3, (m, h, w, c)) if integers else rng.standard_normal((m, h, w, c))
         ).astype(np.float64)
    separate_ctx = Context(train=True)
    conv_out, conv_saved = conv.forward(x, separate_ctx)
    expected, pool_saved = pool.forward(conv_out, separate_ctx)
    fused_ctx = Context(train=True, tiles={id(fused): tile_images})  # a tile is images
    got, saved = fused.forward(x, fused_ctx)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(expected.shape)
    separate = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
    expected_dx = conv.backward(pool.backward(dout.copy(), pool_saved, {}, separate_ctx), conv_saved,
                                separate, separate_ctx)
    together = Gradients({"W": np.full_like(conv.W, 7.0), "b": np.full_like(conv.b, 7.0)})
    together.restart()  # stale values: the first add overwrites them
    dx = fused.backward(dout.copy(), saved, together, fused_ctx)
    np.testing.assert_allclose(together.value("W"), separate.value("W"), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(together.value("b"), separate.value("b"), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-10)


def test_ties_go_to_the_first_position():
    rng = np.random.default_rng(0)
    conv, pool, fused = separate_and_fused(rng, (4, 4, 1), 2, 1, 0, 2, integers=True)
    x = np.ones((1, 4, 4, 1))  # every pooling window is one tie
    ctx = Context(train=True)
    _, saved = fused.forward(x, ctx)
    grads = Gradients({"W": np.zeros_like(conv.W), "b": np.zeros_like(conv.b)})
    dx = fused.backward(np.ones((1, 2, 2, 2)), saved, grads, ctx)
    # each window's gradient lands on its top-left value only
    assert dx[0, ::2, ::2].all() and dx[0, 1::2].sum() == 0 and dx[0, :, 1::2].sum() == 0


def test_tiles_cover_every_image_once():
    rng = np.random.default_rng(1)
    *_, fused = separate_and_fused(rng, (28, 28, 1), 30, 5, 0, 2, integers=False)
    ctx = Context(tiles={id(fused): 7})
    for m in (1, 7, 50, 101):
        tiles = list(fused._tiles(m, fused._tile_images(m, ctx)))
        assert tiles[0][0] == 0 and tiles[-1][1] == m
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:], strict=False))
        assert all(hi - lo == (last - first) * 144 for first, last, lo, hi in tiles)
        assert max(last - first for first, last, _, _ in tiles) == min(m, 7)
