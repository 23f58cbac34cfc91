"""The layers of the book's networks, NHWC, each with forward and backward.

Shapes are per image: (H, W, C) for maps, (D,) for vectors. `forward(x, train, ws,
dropout_rng)` returns the output and what backward needs (None unless `train`);
`dropout_rng` is the NumPy Generator dropout draws its masks from, as in training (None:
dropout scales, as at test time). `backward(dout, saved, grads)` adds the parameter
gradients into `grads` (a Gradients) and returns the input gradient. Both may take
their arrays from `ws`, the thread's Workspace: what they return is then valid until
the next micro-batch on that thread. A layer holds no per-batch state, so several
micro-batches can run through it at once on different threads. Layers may work in
place on the array they are given (ReLU) and on the gradient they are handed back,
and a layer's input is not read after its backward (layers keep what they need, such
as masks, apart), so Affine writes its input gradient over its input.

Products and the GIL: every product here is np.dot. np.matmul keeps the GIL through
products of fewer than 500 output values (NumPy releases it above a size threshold
counted on the output), however long they take: a 15x32 product over 40,000 rows ran
1.10x as fast on two threads as on one, a 16x32 one 1.88x. np.dot always releases it.
With @, DeepConvNet's bias gradients (16 to 64 values, summed over up to 39,200 rows)
alone held the GIL in 5% of a two-thread run's samples (py-spy --gil --native), and the
other thread waited.

`memory(m, itemsize, train)` states, for a micro-batch of m images, the bytes the
layer allocates, so that the planner can add them up (see planner.py).
"""

import math
from dataclasses import dataclass

import numpy as np

from lowmem_cnn.columns import add_columns, column_tiles, tile_rows, windows
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.workspace import Workspace


@dataclass
class LayerMemory:
    out: int = 0  # new output array (0 when the layer works in place)
    kept: int = 0  # kept from forward until backward (train only)
    forward_scratch: int = 0  # temporaries that live during forward only
    grad_in: int = 0  # new input-gradient array
    backward_scratch: int = 0  # temporaries that live during backward only
    keeps_input: bool = False  # the input array itself is kept until backward (train only)
    in_place: bool = False  # output and input gradient are the arrays the layer was given
    workspace: int = 0  # held in the thread's Workspace for the whole run (see workspace.py)


# The affine weight gradient is made in slices of about this size (see Affine.backward).
GRADIENT_SLICE_BYTES = 1 << 18


class Gradients(dict):
    """A layer's parameter gradients by name (W, b), for one thread.

    `add` adds into the array, except that after `restart()` the first add to each
    name overwrites it: the arrays then need no zeroing between mini-batches, and a
    product can be written straight into them.
    """

    def __init__(self, arrays=()):
        super().__init__(arrays)
        self._stale = set()  # names whose array holds a previous mini-batch's gradient

    def restart(self):
        self._stale = set(self)

    def overwrites(self, name) -> bool:
        return name in self._stale

    def written(self, name):
        """`name`'s array was written whole (e.g. a product with out=)."""
        self._stale.discard(name)

    def add(self, name, value):
        if name in self._stale:
            np.copyto(self[name], value)
            self._stale.discard(name)
        else:
            self[name] += value


def _size(shape) -> int:
    return int(np.prod(shape))


def column_sums(rows: np.ndarray, ws: Workspace, owner) -> np.ndarray:
    """rows.sum(axis=0) as a BLAS product with ones (`owner`'s "ones" in `ws`): 3x faster
    than sum(axis=0) over many rows, and np.dot releases the GIL (see above)."""
    ones = ws.array(owner, "ones", (len(rows),), rows.dtype)
    ones.fill(1)
    return np.dot(ones, rows)


# A product whose output has at most this many channels makes two neighbouring outputs
# of a line per column row: the window is size x (size + 1), and the weights hold the
# filter at both of its positions (zeros elsewhere). For 3x3 filters that is 4/3 of the
# multiply-adds, but the product is 32 wide instead of 16, which OpenBLAS runs much
# faster, and there are 2/3 of the column values to copy. DeepConvNet's 28x28x16 layer,
# 50 images, one thread: forward columns and products 3.75 -> 2.98 ms, weight gradient
# 4.02 -> 3.15 ms; no gain with 32 filters (14x14x16 input: 1.14 -> 1.16 ms).
GROUP_MAX_CHANNELS = 16
# The owner of the workspace arrays the convolutions of a thread share, and their names.
_CONVOLUTIONS = object()
_SHARED = frozenset({"columns", "ones", "dW", "dW_tile", "weights", "bias", "flipped",
                     "dout_padded"})


class Convolution:
    """im2col in tiles of whole images (see columns.py), every array from the thread's
    Workspace.

    The input gradient of a stride-1 convolution is computed as a convolution itself
    (of the output gradient, padded by size - 1 - pad, with the filters turned by 180
    degrees and their channels swapped): its columns are made the same way as the
    forward's and one product per tile writes the gradient, with nothing to add up.
    col2im instead (a product per tile, then size * size strided adds) took 11.2 ms
    against 3.7 ms for DeepConvNet's 28x28x16 layer (4.4 ms without the pairs of
    GROUP_MAX_CHANNELS), 6.8 against 2.3 ms for its 14x14x32 layer of pad 2 (50 images,
    one thread, min of 60 on a busy machine); it stays for strides above 1 and pads
    above size - 1.
    """

    kind = "conv"

    def __init__(self, in_shape, filters: int, size: int, stride: int = 1, pad: int = 0):
        h, w, c = in_shape
        if size > h + 2 * pad or size > w + 2 * pad:
            raise ValueError(f"a {size}x{size} filter is larger than its {h}x{w} input (pad {pad})")
        self.in_shape = (h, w, c)
        self.size, self.stride, self.pad, self.filters = size, stride, pad, filters
        oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        self.out_shape = (oh, ow, filters)
        self.width = size * size * c  # columns of the column matrix
        self.rows_per_image = oh * ow
        self.param_shapes = {"W": (self.width, filters), "b": (filters,)}
        self.tile_rows = 1 << 30  # set by the planner
        self.need_input_grad = True
        # the input gradient as a convolution of the output gradient (see above)
        self.transposed_grad = stride == 1 and pad <= size - 1
        # outputs per column row (see GROUP_MAX_CHANNELS): of the forward (and the
        # weight gradient), of the input gradient
        self.group = self._group(filters, ow)
        self.grad_group = self._group(c, w) if self.transposed_grad else 1

    def _group(self, channels, line):
        return 2 if self.stride == 1 and channels <= GROUP_MAX_CHANNELS and line % 2 == 0 else 1

    @staticmethod
    def _owner(name, train, layer):
        """Scratch arrays, dead when a call returns, are shared by all the convolutions
        of a thread (see shared_workspace); the others are the layer's own."""
        return _CONVOLUTIONS if name in _SHARED or (name == "padded" and not train) else layer

    # --- shapes and tiles -----------------------------------------------------------

    def _padded_shape(self):
        h, w, c = self.in_shape
        return (h + 2 * self.pad, w + 2 * self.pad, c)

    def _grad_padded_shape(self):
        """The output gradient's shape padded for the transposed convolution."""
        oh, ow, f = self.out_shape
        q = self.size - 1 - self.pad
        return (oh + 2 * q, ow + 2 * q, f)

    def _tile(self, m, lines, line, channels, group, tile):
        """(rows, width) of the column tiles of a product with lines x line outputs an
        image, from `channels` input channels, `group` outputs a row: as many values as
        `tile` rows of the forward's columns would hold (the planner's tile_rows), in
        whole images (or lines) where one fits."""
        width = self.size * (self.size + group - 1) * channels
        per_line = line // group
        limit = max(1, tile * self.width // width)
        return tile_rows(limit, lines * per_line, per_line, m * lines * per_line), width

    def _forward_tile(self, m, tile):
        oh, ow, _ = self.out_shape
        return self._tile(m, oh, ow, self.in_shape[2], self.group, tile)

    def _grad_tile(self, m, tile):
        h, w, _ = self.in_shape
        return self._tile(m, h, w, self.filters, self.grad_group, tile)

    def _grad_by_convolution(self):
        return self.need_input_grad and self.transposed_grad

    def _columns_size(self, m, train, tile):
        """One buffer serves the forward's, the weight gradient's and the input
        gradient's column tiles (they are made one after the other)."""
        size = math.prod(self._forward_tile(m, tile))
        if train and self._grad_by_convolution():
            size = max(size, math.prod(self._grad_tile(m, tile)))
        return size

    def _tiles(self, m, tile):
        """How many column tiles the forward (and the weight gradient) makes."""
        oh, ow, _ = self.out_shape
        return -(-m * oh * ow // self.group // self._forward_tile(m, tile)[0])

    # --- forward and backward ---------------------------------------------------------

    def _pad(self, x, ws, name, pad, train=True):
        """`x` in a workspace array with a border of `pad` zeros (only the border is
        zeroed): 0.25 ms against np.pad's 1.29 ms in a fresh mapping, 50 images of
        28x28x16."""
        if not pad:
            return x
        m, h, w, c = x.shape
        padded = ws.array(self._owner(name, train, self), name, (m, h + 2 * pad, w + 2 * pad, c),
                          x.dtype)
        padded[:, :pad] = 0
        padded[:, pad + h :] = 0
        padded[:, pad : pad + h, :pad] = 0
        padded[:, pad : pad + h, pad + w :] = 0
        padded[:, pad : pad + h, pad : pad + w] = x
        return padded

    def _grouped(self, filters, group, ws, name):
        """The (size * (size + group - 1) * C, group * F) weights of `filters`, a
        (size, size, C, F) array: the filter at each of the group's positions."""
        k, _, c, f = filters.shape
        if group == 1 and filters.flags.c_contiguous:
            return filters.reshape(k * k * c, f)
        weights = ws.array(_CONVOLUTIONS, name, (k, k + group - 1, c, group, f), filters.dtype)
        if group > 1:
            weights.fill(0)
        for t in range(group):
            weights[:, t : t + k, :, t, :] = filters
        return weights.reshape(k * (k + group - 1) * c, group * f)

    def _convolve(self, padded, stride, weights, group, tile, out, ws, train, bias=None):
        """out = the columns of `padded` (windows of `group` outputs) @ weights (+ bias),
        a tile at a time; `out` has a row per column row."""
        rows, _ = tile
        buffer = ws.array(_CONVOLUTIONS, "columns", (self._columns_size(len(padded), train, self.tile_rows),),
                          padded.dtype)
        view = windows(padded, self.size, stride, group=group)
        for start, stop, columns in column_tiles(view, rows, buffer):
            part = np.dot(columns, weights, out=out[start:stop])
            if bias is not None:
                part += bias  # while the tile is in cache

    def forward(self, x, train: bool, ws=None, dropout_rng=None):
        ws = _workspace(ws)
        m = len(x)
        oh, ow, f = self.out_shape
        g = self.group
        padded = self._pad(x, ws, "padded", self.pad, train)
        out = ws.array(self, "out", (m * oh * ow // g, g * f), x.dtype)
        weights = self._grouped(self.W.reshape(self.size, self.size, -1, f), g, ws, "weights")
        bias = self.b
        if g > 1:
            bias = ws.array(_CONVOLUTIONS, "bias", (g, f), x.dtype)
            bias[:] = self.b
            bias = bias.reshape(g * f)
        self._convolve(padded, self.stride, weights, g, self._forward_tile(m, self.tile_rows), out, ws,
                       bool(train), bias)
        # the padded input is kept (in the workspace); without padding, the input itself
        return out.reshape(m, oh, ow, f), (padded if train else None)

    def backward(self, dout, padded, grads, ws=None):
        ws = _workspace(ws)
        m = len(dout)
        dout = dout.reshape(-1, self.filters)
        grads.add("b", column_sums(dout, ws, _CONVOLUTIONS))
        self._weight_grad(dout, padded, grads, ws)
        if not self.need_input_grad:
            return None
        if self.transposed_grad:
            return self._input_grad(dout.reshape(m, *self.out_shape), padded, ws)
        return self._input_grad_col2im(dout, ws)

    def _weight_grad(self, dout, padded, grads, ws):
        """dW = columns.T @ dout, a tile at a time: the columns are made again from the
        kept (padded) input, as in the forward."""
        k, c, f, g = self.size, self.in_shape[2], self.filters, self.group
        m = len(padded)
        rows, width = self._forward_tile(m, self.tile_rows)
        buffer = ws.array(_CONVOLUTIONS, "columns", (self._columns_size(m, True, self.tile_rows),),
                          dout.dtype)
        dout = dout.reshape(-1, g * f)  # a row per column row
        total = ws.array(_CONVOLUTIONS, "dW", (width, g * f), dout.dtype)
        view = windows(padded, k, self.stride, group=g)
        for start, stop, columns in column_tiles(view, rows, buffer):
            if start == 0:
                np.dot(columns.T, dout[start:stop], out=total)
            else:
                total += np.dot(columns.T, dout[start:stop],
                                out=ws.array(_CONVOLUTIONS, "dW_tile", total.shape, dout.dtype))
        if g == 1:
            grads.add("W", total)
            return
        # each position of the group holds part of the filter's gradient
        total = total.reshape(k, k + g - 1, c, g, f)
        target = grads["W"].reshape(k, k, c, f)
        for t in range(g):
            if grads.overwrites("W"):
                np.copyto(target, total[:, t : t + k, :, t, :])
                grads.written("W")
            else:
                target += total[:, t : t + k, :, t, :]

    def _input_grad(self, dout, kept, ws):
        """Stride 1: the input gradient is the convolution of the output gradient, padded
        by size - 1 - pad, with the filters turned by 180 degrees and each filter's
        input and output channels swapped. It is written over the kept input (padded, or
        the input itself), which the weight gradient was the last to read."""
        k, c, f, g = self.size, self.in_shape[2], self.filters, self.grad_group
        h, w, _ = self.in_shape
        m = len(dout)
        flipped = self.W.reshape(k, k, c, f)[::-1, ::-1].transpose(0, 1, 3, 2)
        weights = self._grouped(flipped, g, ws, "flipped")
        shape = (m * h * w // g, g * c)
        if kept.flags.c_contiguous and kept.dtype == dout.dtype:
            grad = kept.reshape(-1)[: m * h * w * c].reshape(shape)
        else:  # not with the layers here: their outputs are contiguous
            grad = ws.array(self, "grad", shape, dout.dtype)
        tile = self._grad_tile(m, self.tile_rows)
        images = self._padded_images(m, self.tile_rows)
        if images == m:
            padded = self._pad(dout, ws, "dout_padded", k - 1 - self.pad)
            self._convolve(padded, 1, weights, g, tile, grad, ws, True)
            return grad.reshape(m, h, w, c)
        # A tile's images padded at a time, in the same buffer: its border is zeroed once
        padded = self._pad(dout[:images], ws, "dout_padded", k - 1 - self.pad)
        q, (oh, ow, _) = k - 1 - self.pad, self.out_shape
        per_image = h * w // g
        for first in range(0, m, images):
            last = min(first + images, m)
            part = padded[: last - first]
            if first:
                part[:, q : q + oh, q : q + ow] = dout[first:last]
            self._convolve(part, 1, weights, g, tile, grad[first * per_image : last * per_image],
                           ws, True)
        return grad.reshape(m, h, w, c)

    def _padded_images(self, m, tile):
        """Images of the output gradient padded at a time for the input gradient: a
        tile's when its tiles are whole images, else all."""
        h, w, _ = self.in_shape
        rows, _ = self._grad_tile(m, tile)
        per_image = h * w // self.grad_group
        if not self.size - 1 - self.pad or rows % per_image:
            return m
        return rows // per_image

    def _input_grad_col2im(self, dout, ws):
        """Strides above 1: each tile's column gradients (dout @ W.T) added onto the
        windows they came from, one filter offset at a time."""
        m = len(dout) // self.rows_per_image
        h, w, _ = self.in_shape
        p = self.pad
        grad = ws.array(self, "grad_padded", (m, *self._padded_shape()), dout.dtype)
        grad.fill(0)
        grad_view = windows(grad, self.size, self.stride)
        rows, _ = self._forward_tile(m, self.tile_rows)
        columns = ws.array(self, "grad_columns", (rows, self.width), dout.dtype)
        for start in range(0, len(dout), rows):
            stop = min(start + rows, len(dout))
            part = np.dot(dout[start:stop], self.W.T, out=columns[: stop - start])
            add_columns(grad_view, start, stop, part)
        if not p:
            return grad
        # contiguous, as the other path's: the layer before may reshape it
        inner = ws.array(self, "grad", (m, h, w, grad.shape[3]), dout.dtype)
        np.copyto(inner, grad[:, p : p + h, p : p + w, :])
        return inner

    def _arrays(self, m, train, tile):
        """The values of each workspace array the layer uses, by name, with column tiles
        of `tile` rows."""
        h, w, c = self.in_shape
        oh, ow, f = self.out_shape
        k, g, gg = self.size, self.group, self.grad_group
        arrays = {"out": m * oh * ow * f, "columns": self._columns_size(m, train, tile)}
        if g > 1:
            arrays.update(weights=k * (k + g - 1) * c * g * f, bias=g * f)
        if self.pad:  # kept until backward when training
            arrays["padded"] = m * math.prod(self._padded_shape())
        if train:
            rows, width = self._forward_tile(m, tile)
            arrays.update(ones=m * oh * ow, dW=width * g * f)
            if self._tiles(m, tile) > 1:
                arrays["dW_tile"] = width * g * f
            if self._grad_by_convolution():  # the gradient is written over the kept input
                if k - 1 - self.pad:
                    arrays["dout_padded"] = (self._padded_images(m, tile)
                                             * math.prod(self._grad_padded_shape()))
                arrays["flipped"] = k * (k + gg - 1) * f * gg * c
            elif self.need_input_grad:
                arrays.update(grad_padded=m * math.prod(self._padded_shape()),
                              grad_columns=rows * self.width)
                if self.pad:
                    arrays["grad"] = m * h * w * c
        return arrays

    def memory(self, m, itemsize, train, tile=None):
        """`tile`: column rows a tile (default: the layer's tile_rows)."""
        tile = self.tile_rows if tile is None else tile
        # without padding, the input itself is kept until backward
        return LayerMemory(workspace=sum(self._arrays(m, train, tile).values()) * itemsize,
                           keeps_input=not self.pad)

    def shared_workspace(self, m, itemsize, train, tile=None) -> dict:
        """The part of memory().workspace in arrays that all the convolutions of a
        thread share, by name: a network holds the largest of each once."""
        tile = self.tile_rows if tile is None else tile
        return {name: values * itemsize for name, values in self._arrays(m, train, tile).items()
                if self._owner(name, train, self) is _CONVOLUTIONS}

    def book_columns_bytes(self, n) -> int:
        """What the book's whole-batch im2col allocates for n images (float64)."""
        return n * self.rows_per_image * self.width * 8

    # The book stores W as (F, C, FH, FW); columns here are in (FH, FW, C) order.
    def from_book(self, name, array):
        if name == "W":
            return array.transpose(2, 3, 1, 0).reshape(self.width, self.filters)
        return array

    def to_book(self, name, array):
        if name == "W":
            c = self.in_shape[2]
            return array.reshape(self.size, self.size, c, self.filters).transpose(3, 2, 0, 1)
        return array

    def book_shape(self, name):
        c = self.in_shape[2]
        return (self.filters, c, self.size, self.size) if name == "W" else (self.filters,)

    def describe(self):
        return f"conv {self.filters}x{self.size}x{self.size} stride {self.stride} pad {self.pad}"


class ReLU:
    kind = "relu"
    param_shapes: dict = {}

    def __init__(self, in_shape):
        self.in_shape = self.out_shape = tuple(in_shape)

    def forward(self, x, train: bool, ws=None, dropout_rng=None):
        mask = None
        if train:
            mask = _workspace(ws).array(self, "mask", x.shape, bool)
            np.greater(x, 0, out=mask)
        return np.maximum(x, 0, out=x), mask

    def backward(self, dout, mask, grads, ws=None):
        dout *= mask
        return dout

    def memory(self, m, itemsize, train):
        return LayerMemory(in_place=True, workspace=m * _size(self.in_shape) if train else 0)

    def describe(self):
        return "relu"


class MaxPooling:
    """Max over windows, taken over strided views: no column matrix at all.

    Training keeps the position of the maximum (0..size*size-1) as uint8; ties go to
    the first position, as the book's argmax does. Every array comes from the thread's
    Workspace: fresh ones were faulted in on every micro-batch (DeepConvNet's three
    poolings, forward and backward, 50 images, one thread: 6.25 -> 4.61 ms).
    """

    kind = "pool"
    param_shapes: dict = {}

    def __init__(self, in_shape, size: int, stride: int):
        h, w, c = in_shape
        if size > h or size > w:
            raise ValueError(f"a {size}x{size} pool is larger than its {h}x{w} input")
        self.in_shape = (h, w, c)
        self.size, self.stride = size, stride
        self.out_shape = ((h - size) // stride + 1, (w - size) // stride + 1, c)

    def _views(self, x):
        """One strided view per position in the window, each shaped like the output."""
        oh, ow, _ = self.out_shape
        s = self.stride
        return [x[:, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :]
                for i in range(self.size) for j in range(self.size)]

    def forward(self, x, train: bool, ws=None, dropout_rng=None):
        ws = _workspace(ws)
        views = self._views(x)
        shape = (len(x), *self.out_shape)
        out = ws.array(self, "out", shape, x.dtype)
        if len(views) == 1:
            np.copyto(out, views[0])
        else:
            np.maximum(views[0], views[1], out=out)
        for view in views[2:]:
            np.maximum(out, view, out=out)
        if not train:
            return out, None
        # position of the first maximum = how many leading views miss it
        # (boolean arithmetic: masked writes are several times slower)
        argmax = ws.array(self, "argmax", shape, np.uint8)
        argmax.fill(0)
        missed = ws.array(self, "missed", shape, bool)
        missed.fill(True)
        differs = ws.array(self, "differs", shape, bool)
        for view in views[:-1]:
            np.not_equal(view, out, out=differs)
            missed &= differs
            argmax += missed
        return out, argmax

    def backward(self, dout, argmax, grads, ws=None):
        ws = _workspace(ws)
        grad = ws.array(self, "grad", (len(dout), *self.in_shape), dout.dtype)
        chosen = ws.array(self, "differs", argmax.shape, bool)  # forward's scratch
        overlapping = self.stride < self.size
        if self.stride == self.size:  # the windows tile the input: zero only the rest
            oh, ow, _ = self.out_shape
            grad[:, oh * self.stride :] = 0
            grad[:, :, ow * self.stride :] = 0
        else:
            grad.fill(0)
        if overlapping:
            part = ws.array(self, "part", dout.shape, dout.dtype)
        for k, view in enumerate(self._views(grad)):
            np.equal(argmax, k, out=chosen)
            if overlapping:
                view += np.multiply(dout, chosen, out=part)
            else:
                np.multiply(dout, chosen, out=view)
        return grad

    def memory(self, m, itemsize, train):
        out = m * _size(self.out_shape)
        held = out * itemsize
        if train:  # argmax, missed and differs (a byte a value), the input gradient
            held += 3 * out + m * _size(self.in_shape) * itemsize
            if self.stride < self.size:
                held += out * itemsize
        return LayerMemory(workspace=held)

    def book_columns_bytes(self, n) -> int:
        oh, ow, c = self.out_shape
        return n * oh * ow * c * self.size * self.size * 8

    def describe(self):
        return f"pool {self.size}x{self.size} stride {self.stride}"


class Affine:
    kind = "affine"

    def __init__(self, in_shape, units: int):
        self.in_shape = tuple(in_shape)
        self.units = units
        self.out_shape = (units,)
        self.inputs = _size(self.in_shape)
        self.param_shapes = {"W": (self.inputs, units), "b": (units,)}
        self.need_input_grad = True

    def forward(self, x, train: bool, ws=None, dropout_rng=None):
        ws = _workspace(ws)
        x = x.reshape(x.shape[0], self.inputs)
        out = np.dot(x, self.W, out=ws.array(self, "out", (len(x), self.units), x.dtype))
        out += self.b
        return out, (x if train else None)

    def backward(self, dout, x, grads, ws=None):
        ws = _workspace(ws)
        if grads.overwrites("W"):
            np.dot(x.T, dout, out=grads["W"])
            grads.written("W")
        else:
            # x.T @ dout a slice of rows at a time: the product is added to the
            # gradient while in cache, and its buffer stays small
            rows = self._grad_rows(dout.dtype.itemsize)
            for lo in range(0, self.inputs, rows):
                part = ws.array(self, "dW", (min(rows, self.inputs - lo), self.units), dout.dtype)
                grads["W"][lo : lo + rows] += np.dot(x[:, lo : lo + rows].T, dout, out=part)
        grads.add("b", dout.sum(axis=0))
        if not self.need_input_grad:
            return None
        # Nothing reads the input after this (see the module's docstring), so the input
        # gradient takes its array.
        grad = np.dot(dout, self.W.T, out=x if x.flags.c_contiguous else
                      ws.array(self, "grad", x.shape, dout.dtype))
        return grad.reshape(dout.shape[0], *self.in_shape)

    def _grad_rows(self, itemsize):
        return max(1, GRADIENT_SLICE_BYTES // (self.units * itemsize))

    def memory(self, m, itemsize, train):
        out = m * self.units * itemsize
        if not train:
            return LayerMemory(workspace=out)
        part = min(self._grad_rows(itemsize), self.inputs) * self.units * itemsize
        # the input gradient overwrites the input, which is kept
        return LayerMemory(workspace=out + part, keeps_input=True)

    # The book flattens maps in (C, H, W) order; they are (H, W, C) here.
    def _book_order(self):
        if len(self.in_shape) == 3:
            h, w, c = self.in_shape
            return np.arange(self.inputs).reshape(c, h, w).transpose(1, 2, 0).ravel()
        return None

    def from_book(self, name, array):
        order = self._book_order()
        return array[order] if name == "W" and order is not None else array

    def to_book(self, name, array):
        order = self._book_order()
        if name == "W" and order is not None:
            book = np.empty_like(array)
            book[order] = array
            return book
        return array

    def book_shape(self, name):
        return self.param_shapes[name]

    def describe(self):
        return f"affine {self.inputs}->{self.units}"


class Dropout:
    """The book's dropout: training keeps each value with probability 1 - ratio;
    inference scales by 1 - ratio instead, so the book's parameter files mean the same."""

    kind = "dropout"
    param_shapes: dict = {}

    def __init__(self, in_shape, ratio: float):
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio {ratio} is not in [0, 1)")
        self.in_shape = self.out_shape = tuple(in_shape)
        self.ratio = ratio

    def forward(self, x, train: bool, ws=None, dropout_rng=None):
        if dropout_rng is None:
            if train:
                raise ValueError("dropout in training needs the Generator its masks come from")
            x *= 1.0 - self.ratio
            return x, None
        mask = dropout_rng.random(x.shape) > self.ratio
        x *= mask
        return x, (mask if train else None)

    def backward(self, dout, mask, grads, ws=None):
        dout *= mask
        return dout

    def memory(self, m, itemsize, train):
        n = m * _size(self.in_shape)
        # the mask, and the float64 random numbers it is drawn from
        return LayerMemory(kept=n if train else 0, forward_scratch=8 * n if train else 0,
                           in_place=True)

    def describe(self):
        return f"dropout {self.ratio}"


def _workspace(ws):
    return Workspace() if ws is None else ws


def softmax_cross_entropy(scores: np.ndarray, labels: np.ndarray, batch_total: int):
    """Summed loss of this micro-batch and d(mean loss over batch_total images)/d scores.

    The book's cross-entropy: -log(p[label] + 1e-7). Works in place on `scores`.
    """
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = -np.log(scores[rows, labels] + 1e-7).sum()
    scores[rows, labels] -= 1
    scores /= batch_total
    return float(loss), scores


def build_layer(spec: dict, in_shape, number: int = 1):
    """A layer from one [[network.layers]] table of a config (the `number`-th)."""
    kind = spec.get("type")
    name = f"layer {number} ({kind})"
    try:
        if kind in ("conv", "pool") and len(in_shape) != 3:
            raise ValueError(f"needs a map, but its input is a vector of {in_shape[0]}")
        if kind == "conv":
            return Convolution(in_shape, int(spec["filters"]), int(spec["size"]),
                               int(spec.get("stride", 1)), int(spec.get("pad", 0)))
        if kind == "relu":
            return ReLU(in_shape)
        if kind == "pool":
            return MaxPooling(in_shape, int(spec["size"]), int(spec.get("stride", spec["size"])))
        if kind == "affine":
            return Affine(in_shape, int(spec["units"]))
        if kind == "dropout":
            return Dropout(in_shape, float(spec["ratio"]))
    except KeyError as err:
        raise LowmemError(f"{name}: missing {err.args[0]!r}") from None
    except ValueError as err:
        raise LowmemError(f"{name}: {err}") from None
    raise LowmemError(f"{name}: unknown layer type (conv, relu, pool, affine, dropout)")
