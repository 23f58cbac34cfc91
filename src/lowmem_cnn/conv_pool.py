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
copying (see FUSE_MAX_CHANNELS in model.py). The bias is added after the max (adding
a constant commutes with it), on a quarter of the values.
"""

import numpy as np

from lowmem_cnn.layers import LayerMemory, _workspace


class ConvolutionPooling:
    kind = "conv+pool"

    def __init__(self, conv, pool):
        if conv.stride != 1 or pool.stride != pool.size:
            raise ValueError("needs a stride-1 convolution and non-overlapping pooling")
        self.conv, self.pool = conv, pool
        self.in_shape, self.out_shape = conv.in_shape, pool.out_shape
        self.param_shapes = conv.param_shapes
        self.need_input_grad = True
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

    def _weights(self, ws):
        """The (P, P, K, window, window, C) matrix: per pooling position, the filter at
        that offset in the window, zero elsewhere."""
        f, c, k, w = self.conv.size, self.in_shape[2], self.conv.filters, self.window
        p = self.pool.size
        big = ws.array(self, "weights", (p, p, k, w, w, c), self.W.dtype)
        big.fill(0)
        filters = self.W.reshape(f, f, c, k).transpose(3, 0, 1, 2)
        for dy, dx, (rows, cols) in self._blocks():
            big[dy, dx, :, rows, cols, :] = filters
        return big.reshape(p * p * k, self.rows)

    # --- forward and backward ---------------------------------------------------

    def forward(self, x, train, ws=None):
        ws = _workspace(ws)
        m = len(x)
        ph, pw, k = self.out_shape
        blocks = self.pool.size ** 2
        n = m * ph * pw  # pooled outputs
        padded = self._padded(x, ws)
        columns = ws.array(self, "columns", (self.window, self.window, self.in_shape[2], m, ph, pw),
                           x.dtype)
        for a, b, view in self._window_views(padded):
            np.copyto(columns[a, b], view.transpose(3, 0, 1, 2))
        columns = columns.reshape(self.rows, n)
        conv = ws.array(self, "conv", (blocks, k, n), x.dtype)
        np.matmul(self._weights(ws), columns, out=conv.reshape(blocks * k, n))
        # the max in place in block 0; a later block wins only if strictly greater, so
        # ties go to the first position, as the book's argmax
        best = conv[0]
        wins = ws.array(self, "wins", (blocks, k, n), bool) if train else None
        for i in range(1, blocks):
            if train:
                np.greater(conv[i], best, out=wins[i])
            np.maximum(best, conv[i], out=best)
        best += self.b[:, None]
        out = ws.array(self, "out", (m, ph, pw, k), x.dtype)
        np.copyto(out, best.reshape(k, m, ph, pw).transpose(1, 2, 3, 0))
        return out, ((columns, wins) if train else None)

    def backward(self, dout, saved, grads, ws=None):
        ws = _workspace(ws)
        columns, wins = saved
        m = len(dout)
        ph, pw, k = self.out_shape
        blocks = self.pool.size ** 2
        n = m * ph * pw
        grads["b"] += np.ones(n, dout.dtype) @ dout.reshape(n, k)
        remaining = ws.array(self, "dpool", (k, n), dout.dtype)
        np.copyto(remaining.reshape(k, m, ph, pw), dout.transpose(3, 0, 1, 2))
        # The gradient goes to the last block that won; the forward's values are dead,
        # so the convolution's gradient takes their array.
        dconv = ws.array(self, "conv", (blocks, k, n), dout.dtype)
        for i in range(blocks - 1, 0, -1):
            np.multiply(remaining, wins[i], out=dconv[i])
            np.subtract(remaining, dconv[i], out=dconv[0] if i == 1 else remaining)
        if blocks == 1:
            np.copyto(dconv[0], remaining)
        dconv = dconv.reshape(blocks * k, n)
        f, c, p, w = self.conv.size, self.in_shape[2], self.pool.size, self.window
        dweights = np.matmul(dconv, columns.T, out=ws.array(self, "dweights", (blocks * k, self.rows),
                                                           dout.dtype))
        dweights = dweights.reshape(p, p, k, w, w, c)
        dw = grads["W"].reshape(f, f, c, k)
        for dy, dx, (rows, cols) in self._blocks():
            dw += dweights[dy, dx, :, rows, cols, :].transpose(1, 2, 3, 0)
        if not self.need_input_grad:
            return None
        dcolumns = np.matmul(self._weights(ws).T, dconv,
                             out=ws.array(self, "dcolumns", (self.rows, n), dout.dtype))
        dcolumns = dcolumns.reshape(w, w, c, m, ph, pw)
        grad = ws.array(self, "grad", (m, *self._padded_shape()), dout.dtype)
        grad.fill(0)
        # one window offset at a time: for a fixed offset no two windows share a value
        for a, b, view in self._window_views(grad):
            view += dcolumns[a, b].transpose(1, 2, 3, 0)
        pad = self.conv.pad
        return grad[:, pad : grad.shape[1] - pad, pad : grad.shape[2] - pad, :]

    def _padded_shape(self):
        h, w, c = self.in_shape
        pad = self.conv.pad
        return (h + 2 * pad, w + 2 * pad, c)

    def _padded(self, x, ws):
        pad = self.conv.pad
        if not pad:
            return x
        padded = ws.array(self, "padded", (len(x), *self._padded_shape()), x.dtype)
        padded.fill(0)
        padded[:, pad:-pad, pad:-pad, :] = x
        return padded

    def memory(self, m, itemsize, train):
        ph, pw, k = self.out_shape
        n = m * ph * pw
        blocks = self.pool.size ** 2
        padded = m * int(np.prod(self._padded_shape())) * itemsize if self.conv.pad else 0
        weights = blocks * k * self.rows * itemsize
        held = (padded + self.rows * n * itemsize + blocks * k * n * itemsize + weights
                + n * k * itemsize)  # padded input, columns, products, weights, output
        if train:
            held += blocks * k * n  # wins (bool)
            held += k * n * itemsize + weights  # dpool, dweights
            if self.need_input_grad:
                held += self.rows * n * itemsize + m * int(np.prod(self._padded_shape())) * itemsize
        return LayerMemory(workspace=held)

    # --- parameters and reports, as the convolution's -----------------------------

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

    def from_book(self, name, array):
        return self.conv.from_book(name, array)

    def to_book(self, name, array):
        return self.conv.to_book(name, array)

    def book_shape(self, name):
        return self.conv.book_shape(name)

    def book_columns_bytes(self, n) -> int:
        return self.conv.book_columns_bytes(n) + self.pool.book_columns_bytes(n)

    def column_bytes(self, m, itemsize) -> int:
        ph, pw, _ = self.out_shape
        return self.rows * m * ph * pw * itemsize

    def describe(self):
        return f"{self.conv.describe()} + {self.pool.describe()}"
