"""im2col in tiles: the column matrix of a convolution, made a few rows at a time.

For NHWC input, the windows of a convolution are a strided view of shape
(N, OH, OW, FH, FW, C). Row r of the column matrix is the window of output pixel
r = (n * OH + oh) * OW + ow, flattened in (FH, FW, C) order. A tile is the rows
[start, stop): it is copied out of the view in at most five pieces (the rest of an
output line, the rest of an image, whole images, whole lines, the head of a line),
so no tile costs more than its own rows, whatever its size.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided


def windows(x: np.ndarray, size: int, stride: int, writeable: bool = False) -> np.ndarray:
    """The (N, OH, OW, size, size, C) view of the windows of NHWC `x` (already padded)."""
    n, h, w, c = x.shape
    oh, ow = (h - size) // stride + 1, (w - size) // stride + 1
    sn, sh, sw, sc = x.strides
    return as_strided(
        x, (n, oh, ow, size, size, c), (sn, sh * stride, sw * stride, sh, sw, sc),
        writeable=writeable,
    )


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


def column_tiles(view: np.ndarray, tile_rows: int):
    """Yield (start, stop, columns) for each tile of the column matrix of `view`.

    `columns` is one buffer of tile_rows x (FH*FW*C) reused for every tile: use it
    before asking for the next one.
    """
    n, oh, ow, fh, fw, c = view.shape
    total, width = n * oh * ow, fh * fw * c
    buffer = np.empty((min(tile_rows, total), width), view.dtype)
    for start in range(0, total, tile_rows):
        stop = min(start + tile_rows, total)
        columns = buffer[: stop - start]
        pos = 0
        for index, rows in _pieces(start, stop, oh * ow, ow):
            part = view[index]
            columns[pos : pos + rows].reshape(part.shape)[...] = part
            pos += rows
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
