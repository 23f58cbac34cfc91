"""im2col in tiles: the column matrix of a convolution, made a few rows at a time.

For NHWC input, the windows of a convolution are a strided view of shape
(N, OH, OW, FH, FW, C). Row r of the column matrix is the window of output pixel
r = (n * OH + oh) * OW + ow, flattened in (FH, FW, C) order. A tile is the rows
[start, stop): it is copied out of the view in at most five pieces (the rest of an
output line, the rest of an image, whole images, whole lines, the head of a line),
so no tile costs more than its own rows, whatever its size; a tile of whole images
(see `tile_rows`) is one piece, one strided copy. Every view here is writeable.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

# Columns of an input with at most this many channels are made transposed, (FH*FW*C,
# rows): each copy then moves whole output lines (OW values) instead of runs of FW*C
# values. DeepConvNet's first layer (50 images, 28x28x1, 16 3x3 filters, one thread):
# forward 1.26 -> 0.76 ms, weight gradient 1.14 -> 0.61 ms; 2 channels 1.34 -> 1.06
# and 1.23 -> 0.90; even at 3; worse from 4 on (8: 2.44 -> 3.08 ms forward).
TRANSPOSED_MAX_CHANNELS = 2


def windows(x: np.ndarray, size: int, stride: int, group: int = 1) -> np.ndarray:
    """The (N, OH, OW, size, size, C) view of the windows of NHWC `x` (already padded).

    With `group` > 1 (stride 1 only), each window covers `group` neighbouring outputs of
    a line: the view is (N, OH, OW // group, size, size + group - 1, C).
    """
    n, h, w, c = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    sn, sh, sw, sc = x.strides
    shape = (n, oh, ow // group, size, size + group - 1, c)
    strides = (sn, sh * stride, sw * stride * group, sh, sw, sc)
    if x.flags.c_contiguous:
        # 0.9 us against as_strided's 5.9: this runs some 60 times a micro-batch, with
        # the GIL held (see layers.py's docstring)
        return np.ndarray(shape, x.dtype, x, 0, strides)
    return as_strided(x, shape, strides)


def tile_rows(limit: int, per_image: int, per_line: int, total: int) -> int:
    """The rows of a tile of at most `limit` rows (of `total`): whole images when one
    fits, else whole lines when one fits, so that most tiles are a single copy."""
    if limit >= per_image:
        rows = limit // per_image * per_image
    elif limit >= per_line:
        rows = limit // per_line * per_line
    else:
        rows = max(1, limit)
    return min(rows, total)


def _pieces(start: int, stop: int, per_image: int, per_line: int):
    """Split rows [start, stop) into index tuples of the window view, with their row counts."""
    lines = per_image // per_line
    pos = start
    while pos < stop:
        n, rem = divmod(pos, per_image)
        oh, ow = divmod(rem, per_line)
        left = stop - pos
        if rem == 0 and left >= per_image:
            k = left // per_image
            index, rows = (slice(n, n + k),), k * per_image
        elif ow == 0 and left >= per_line:
            k = min(left // per_line, lines - oh)
            index, rows = (n, slice(oh, oh + k)), k * per_line
        else:
            k = min(left, per_line - ow)
            index, rows = (n, oh, slice(ow, ow + k)), k
        yield index, rows
        pos += rows


def _split_last(a: np.ndarray, shape) -> np.ndarray:
    """A view of `a` with its last axis split into `shape` (never a copy: reshape
    would copy silently where it cannot make a view, and the copy would be filled)."""
    step = a.strides[-1]
    strides = []
    for i in range(len(shape)):
        strides.append(step * math.prod(shape[i + 1 :]))
    return as_strided(a, a.shape[:-1] + tuple(shape), a.strides[:-1] + tuple(strides))


def transposed(channels: int) -> bool:
    return channels <= TRANSPOSED_MAX_CHANNELS


def column_tiles(view: np.ndarray, rows: int, buffer: np.ndarray):
    """Yield (start, stop, columns) for each tile of `rows` rows of the column matrix of
    `view`, a window view (see `windows`).

    `columns` is (stop - start, FH*FW*C), made in `buffer` (a flat array of at least
    rows * FH*FW*C values, reused for every tile: use it before asking for the next);
    for inputs of few channels it is the transpose of a contiguous array (see
    TRANSPOSED_MAX_CHANNELS), which BLAS takes as it is.
    """
    n, oh, ow, fh, fw, c = view.shape
    per_image, width = oh * ow, fh * fw * c
    total = n * per_image
    flip = transposed(c)
    for start in range(0, total, rows):
        stop = min(start + rows, total)
        size = stop - start
        pos = 0
        if flip:
            columns_t = buffer[: size * width].reshape(fh, fw, c, size)
            for index, count in _pieces(start, stop, per_image, ow):
                part = view[index]
                lead = part.shape[:-3]
                np.copyto(_split_last(columns_t[..., pos : pos + count], lead),
                          np.moveaxis(part, (-3, -2, -1), (0, 1, 2)))
                pos += count
            yield start, stop, columns_t.reshape(width, size).T
        else:
            columns = buffer[: size * width].reshape(size, width)
            for index, count in _pieces(start, stop, per_image, ow):
                part = view[index]
                np.copyto(columns[pos : pos + count].reshape(part.shape), part)
                pos += count
            yield start, stop, columns


def add_columns(grad_view: np.ndarray, start: int, stop: int, grad_columns: np.ndarray) -> None:
    """col2im for one tile: add the gradients of column rows [start, stop) onto the input.

    `grad_view` is the writeable window view of the input gradient. Windows overlap,
    so the add goes one filter offset at a time: for a fixed offset no two output
    pixels touch the same input element.
    """
    _n, oh, ow, fh, fw, _c = grad_view.shape
    pos = 0
    for index, rows in _pieces(start, stop, oh * ow, ow):
        target = grad_view[index]
        source = grad_columns[pos : pos + rows].reshape(target.shape)
        for i in range(fh):
            for j in range(fw):
                target[..., i, j, :] += source[..., i, j, :]
        pos += rows


# A product whose output has at most this many channels makes two neighbouring outputs
# of a line per column row: the window is size x (size + 1), and the weights hold the
# filter at both of its positions (zeros elsewhere). For 3x3 filters that is 4/3 of the
# multiply-adds, but the product is 32 wide instead of 16, which OpenBLAS runs much
# faster, and there are 2/3 of the column values to copy. DeepConvNet's 28x28x16 layer,
# 50 images, one thread: forward columns and products 3.75 -> 2.98 ms, weight gradient
# 4.02 -> 3.15 ms; no gain with 32 filters (14x14x16 input: 1.14 -> 1.16 ms).
GROUP_MAX_CHANNELS = 16


class ConvGeometry:
    """The shapes of a convolution's arrays and of its column tiles.

    A tile size (the plan's, per convolution) is column rows of the forward's columns;
    the weight gradient's tiles are the forward's, and the input gradient's (made as a
    convolution, see layers.Convolution) hold as many values.
    """

    def __init__(self, in_shape, filters: int, size: int, stride: int, pad: int):
        h, w, c = in_shape
        if size > h + 2 * pad or size > w + 2 * pad:
            raise ValueError(f"a {size}x{size} filter is larger than its {h}x{w} input (pad {pad})")
        self.in_shape, self.filters = (h, w, c), filters
        self.size, self.stride, self.pad = size, stride, pad
        oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        self.out_shape = (oh, ow, filters)
        self.width = size * size * c
        self.rows_per_image = oh * ow
        self.padded_shape = (h + 2 * pad, w + 2 * pad, c)
        q = size - 1 - pad  # the output gradient's padding for the transposed convolution
        self.grad_padded_shape = (oh + 2 * q, ow + 2 * q, filters)
        # the input gradient as a convolution of the output gradient
        self.transposed_grad = stride == 1 and pad <= size - 1
        # outputs per column row (see GROUP_MAX_CHANNELS): of the forward (and the
        # weight gradient), of the input gradient
        self.group = self._group(filters, ow)
        self.grad_group = self._group(c, w) if self.transposed_grad else 1

    def _group(self, channels, line):
        return 2 if self.stride == 1 and channels <= GROUP_MAX_CHANNELS and line % 2 == 0 else 1

    def grouped_shape(self, group, inputs, outputs):
        """The weights of `group` outputs a row (see layers._grouped)."""
        return (self.size, self.size + group - 1, inputs, group, outputs)

    def _tile(self, m, lines, line, channels, group, tile):
        """(rows, width) of the column tiles of a product with lines x line outputs an
        image, from `channels` input channels, `group` outputs a row: as many values as
        `tile` rows of the forward's columns would hold, in whole images (or lines) where
        one fits."""
        width = self.size * (self.size + group - 1) * channels
        per_line = line // group
        limit = max(1, tile * self.width // width)
        return tile_rows(limit, lines * per_line, per_line, m * lines * per_line), width

    def forward_tile(self, m, tile):
        oh, ow, _ = self.out_shape
        return self._tile(m, oh, ow, self.in_shape[2], self.group, tile)

    def grad_tile(self, m, tile):
        h, w, _ = self.in_shape
        return self._tile(m, h, w, self.filters, self.grad_group, tile)

    def columns_size(self, m, train, tile, need_input_grad):
        """One buffer serves the forward's, the weight gradient's and the input
        gradient's column tiles (they are made one after the other)."""
        size = math.prod(self.forward_tile(m, tile))
        if train and need_input_grad and self.transposed_grad:
            size = max(size, math.prod(self.grad_tile(m, tile)))
        return size

    def tiles(self, m, tile):
        """How many column tiles the forward (and the weight gradient) makes."""
        oh, ow, _ = self.out_shape
        return -(-m * oh * ow // self.group // self.forward_tile(m, tile)[0])

    def padded_images(self, m, tile):
        """Images of the output gradient padded at a time for the input gradient: a
        tile's when its tiles are whole images, else all."""
        h, w, _ = self.in_shape
        rows, _ = self.grad_tile(m, tile)
        per_image = h * w // self.grad_group
        if not self.size - 1 - self.pad or rows % per_image:
            return m
        return rows // per_image
