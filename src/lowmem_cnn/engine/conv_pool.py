"""A convolution (stride 1) and the max-pooling after it, computed as one layer.

Pooled output (i, j) depends on the input window of size F + P - 1 that starts at
(P i, P j), for an F x F filter and P x P pooling. One column per pooled output holds
that window, and one product with a weight matrix of P*P blocks, each the filter
shifted to one position of the pooling window, gives all P*P convolution outputs of
the pooling window. Against im2col of the convolution this needs 2.8x fewer column
values for a 5x5 filter and 2x2 pooling (36 against 4 x 25), at 1.44x the
multiply-adds, on zeros.

The matrices are transposed: columns are (window value, pooled output), and the
product is (pooling position, filter, pooled output). Each pooling position is then
one contiguous block, so the max over the window is P*P - 1 elementwise maxima of
whole blocks.

Fused only where it pays: few input channels, where im2col's columns are mostly
copying (see Convolution.FUSE_MAX_CHANNELS and fused_with). The bias is added after the max (adding
a constant commutes with it), on a quarter of the values.
"""

import math

import numpy as np

from lowmem_cnn.engine.columns import windows
from lowmem_cnn.engine.layers import Layer, column_sums, profile_row


class ConvolutionPooling(Layer):
    """Its tile (ctx.tile) is images whose products are made at once: all of a
    micro-batch's unless the plan says otherwise (each tile costs some 20 NumPy calls,
    and with two threads more calls mean more waiting for the GIL)."""

    tile_unit = "images"
    column_arrays = ("columns", "dcolumns")

    def __init__(self, conv, pool):
        if conv.stride != 1 or pool.stride != pool.size:
            raise ValueError("needs a stride-1 convolution and non-overlapping pooling")
        self.conv, self.pool = conv, pool
        self.in_shape, self.out_shape = conv.in_shape, pool.out_shape
        self.param_shapes = conv.param_shapes
        self.window = conv.size + pool.size - 1
        self.rows = self.window * self.window * conv.in_shape[2]  # rows of the columns

    # --- helpers ----------------------------------------------------------------

    def _window_views(self, padded):
        """For each offset (a, b) in the window, the (m, PH, PW, C) view of the values
        at that offset of every pooled output's window."""
        ph, pw, _ = self.out_shape
        p = self.pool.size
        for a in range(self.window):
            for b in range(self.window):
                yield a, b, padded[:, a : a + p * (ph - 1) + 1 : p, b : b + p * (pw - 1) + 1 : p, :]

    def _blocks(self):
        """(dy, dx, the filter's (F, F, C) slice of the window) for each pooling position."""
        f, p = self.conv.size, self.pool.size
        for dy in range(p):
            for dx in range(p):
                yield dy, dx, (slice(dy, dy + f), slice(dx, dx + f))

    def _weights_shape(self):
        p, w = self.pool.size, self.window
        return (p, p, self.conv.filters, w, w, self.in_shape[2])

    def _weights(self, big):
        """The (P, P, K, window, window, C) matrix, written into `big`: per pooling
        position, the filter at that offset in the window, zero elsewhere."""
        f, c, k = self.conv.size, self.in_shape[2], self.conv.filters
        p = self.pool.size
        big.fill(0)
        filters = self.W.reshape(f, f, c, k).transpose(3, 0, 1, 2)
        for dy, dx, (rows, cols) in self._blocks():
            big[dy, dx, :, rows, cols, :] = filters
        return big.reshape(p * p * k, self.rows)

    # --- forward and backward ---------------------------------------------------

    def _tile_images(self, m, ctx):
        return max(1, min(m, ctx.tile(self)))

    def _tiles(self, m, step):
        """(first image, last image + 1, first pooled output, last + 1) of each tile."""
        ph, pw, _ = self.out_shape
        for first in range(0, m, step):
            last = min(first + step, m)
            yield first, last, first * ph * pw, last * ph * pw

    def forward(self, x, ctx):
        ws, train = ctx.ws, ctx.train
        m = len(x)
        ph, pw, k = self.out_shape
        blocks = self.pool.size ** 2
        n = m * ph * pw  # pooled outputs
        step = self._tile_images(m, ctx)
        padded = x
        if self.conv.pad:
            padded = ws.array(self, "padded", (m, *self._padded_shape()), x.dtype)
        columns = ws.array(self, "columns", (self.window, self.window, self.in_shape[2], m, ph, pw),
                           x.dtype)
        weights = ws.array(self, "weights", self._weights_shape(), x.dtype)
        wins = ws.array(self, "wins", (blocks - 1, k, n), bool) if train else None
        out = ws.array(self, "out", (m, ph, pw, k), x.dtype)
        products = ws.array(self, "products", (blocks * k * step * ph * pw,), x.dtype)
        columns = columns.reshape(self.rows, n)
        if ctx.dry:
            return out, ((columns, wins) if train else None)
        if self.conv.pad:
            pad = self.conv.pad
            padded.fill(0)
            padded[:, pad:-pad, pad:-pad, :] = x
        np.copyto(columns.reshape(self.window, self.window, self.in_shape[2], m, ph, pw),
                  windows(padded, self.window, self.pool.size).transpose(3, 4, 5, 0, 1, 2))
        weights = self._weights(weights)
        for first, last, lo, hi in self._tiles(m, step):
            tile = _head(products, (blocks, k, hi - lo))
            np.matmul(weights, columns[:, lo:hi], out=tile.reshape(blocks * k, hi - lo))
            # the max in place in block 0; a later block wins only if strictly greater,
            # so ties go to the first position, as the book's argmax
            best = tile[0]
            for i in range(1, blocks):
                if train:
                    np.greater(tile[i], best, out=wins[i - 1, :, lo:hi])
                np.maximum(best, tile[i], out=best)
            best += self.b[:, None]
            np.copyto(out[first:last], best.reshape(k, last - first, ph, pw).transpose(1, 2, 3, 0))
        return out, ((columns, wins) if train else None)

    def backward(self, dout, saved, grads, ctx):
        ws = ctx.ws
        columns, wins = saved
        m = len(dout)
        ph, pw, k = self.out_shape
        f, c, p, w = self.conv.size, self.in_shape[2], self.pool.size, self.window
        blocks = p * p
        n = m * ph * pw
        dtype = dout.dtype
        step = self._tile_images(m, ctx)
        tile_outputs = step * ph * pw
        ones = ws.array(self, "ones", (n,), dtype)
        weights = grad = dcolumns = None
        if self.need_input_grad:
            weights = ws.array(self, "weights", self._weights_shape(), dtype)
            grad = ws.array(self, "grad", (m, *self._padded_shape()), dtype)
            dcolumns = ws.array(self, "dcolumns", (self.rows * tile_outputs,), dtype)
        dweights = ws.array(self, "dweights", (blocks * k, self.rows), dtype)
        dweights_tile = ws.array(self, "dweights_tile", (blocks * k, self.rows), dtype)
        dpool = ws.array(self, "dpool", (k * tile_outputs,), dtype)
        products = ws.array(self, "products", (blocks * k * tile_outputs,), dtype)
        dw = ws.array(self, "dW", (f, f, c, k), dtype)
        if ctx.dry:
            return None if grad is None else grad[:, : self.in_shape[0], : self.in_shape[1], :]

        grads.add("b", column_sums(dout.reshape(n, k), ones))
        if weights is not None:
            weights = self._weights(weights)
            grad.fill(0)
        dweights.fill(0)
        for first, last, lo, hi in self._tiles(m, step):
            remaining = _head(dpool, (k, hi - lo))
            np.copyto(remaining.reshape(k, last - first, ph, pw), dout[first:last].transpose(3, 0, 1, 2))
            # the gradient goes to the last block that won (block 0 if none did)
            dconv = _head(products, (blocks, k, hi - lo))
            for i in range(blocks - 1, 0, -1):
                np.multiply(remaining, wins[i - 1, :, lo:hi], out=dconv[i])
                np.subtract(remaining, dconv[i], out=dconv[0] if i == 1 else remaining)
            if blocks == 1:
                np.copyto(dconv[0], remaining)
            dconv = dconv.reshape(blocks * k, hi - lo)
            dweights += np.matmul(dconv, columns[:, lo:hi].T, out=dweights_tile)
            if grad is not None:
                self._add_window_grads(grad[first:last], weights, dconv, dcolumns)
        dweights = dweights.reshape(p, p, k, w, w, c)
        dw.fill(0)
        for dy, dx, (rows, cols) in self._blocks():
            dw += dweights[dy, dx, :, rows, cols, :].transpose(1, 2, 3, 0)
        grads.add("W", dw.reshape(self.W.shape))
        if grad is None:
            return None
        pad = self.conv.pad
        return grad[:, pad : grad.shape[1] - pad, pad : grad.shape[2] - pad, :]

    def _add_window_grads(self, grad, weights, dconv, dcolumns):
        """col2im for one tile: the gradients of its windows' values, added onto `grad`
        (the tile's images, padded), one window offset at a time: for a fixed offset no
        two windows share a value."""
        ph, pw, _ = self.out_shape
        w, c = self.window, self.in_shape[2]
        dcolumns = np.matmul(weights.T, dconv, out=_head(dcolumns, (self.rows, dconv.shape[1])))
        dcolumns = dcolumns.reshape(w, w, c, len(grad), ph, pw)
        for a, b, view in self._window_views(grad):
            view += dcolumns[a, b].transpose(1, 2, 3, 0)

    def _padded_shape(self):
        h, w, c = self.in_shape
        pad = self.conv.pad
        return (h + 2 * pad, w + 2 * pad, c)

    # --- parameters and reports: the convolution's, then the pooling's ---------------

    @property
    def W(self):
        return self.conv.W

    @W.setter
    def W(self, value):
        self.conv.W = value

    @property
    def b(self):
        return self.conv.b

    @b.setter
    def b(self, value):
        self.conv.b = value

    def initial(self, name, rng, weight_init, dtype):
        return self.conv.initial(name, rng, weight_init, dtype)

    def book_view(self, name, array):
        return self.conv.book_view(name, array)

    def book_shape(self, name):
        return self.conv.book_shape(name)

    def tile_size(self, m, tile_bytes, images, itemsize):
        return min(images, m)

    def onnx(self, graph, x):
        return self.pool.onnx(graph, self.conv.onnx(graph, x, holder=self))

    def book_columns_bytes(self, n) -> int:
        return self.conv.book_columns_bytes(n) + self.pool.book_columns_bytes(n)

    def profile_rows(self, recording, batch_size, tile):
        """Two rows, as the book has two layers: the columns are the convolution's."""
        return [profile_row(self.conv, self.conv.describe() + " (+pool)",
                             self.conv.book_columns_bytes(batch_size),
                             recording.bytes_of(self.column_arrays), recording.held_bytes(),
                             tile, self.tile_unit),
                profile_row(self.pool, self.pool.describe() + " (in conv)",
                             self.pool.book_columns_bytes(batch_size), 0, 0, None, None)]

    def describe(self):
        return f"{self.conv.describe()} + {self.pool.describe()}"


def _head(flat, shape):
    """The first values of a flat workspace array, as a contiguous array of `shape` (a
    tile smaller than the largest uses the head of its buffer)."""
    return flat[: math.prod(shape)].reshape(shape)
