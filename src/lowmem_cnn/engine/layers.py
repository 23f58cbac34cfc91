"""The layers of the book's networks, NHWC, each with forward and backward.

Shapes are per image: (H, W, C) for maps, (D,) for vectors. `forward(x, ctx)` returns
the output and what backward needs (None unless `ctx.train`); `backward(dout, saved,
grads, ctx)` writes or adds the parameter gradients into `grads` (a Gradients, which
allows nothing else) and returns the input gradient. `ctx` (workspace.Context) holds
the thread's Workspace, the plan's tile sizes, dropout's Generator and where batch
statistics go (a Statistics per layer that keeps them). A layer takes every array it uses from
`ctx.ws`, where it uses it; what it returns is then valid until the next micro-batch
on that thread. Once it has asked for its arrays, a layer returns if `ctx.dry`: that
is how the planner learns what it holds (see workspace.Recording), so no second table
of sizes is kept. A layer holds no per-batch state, so several micro-batches can run
through it at once on different threads. Layers may work in place on the array they
are given (ReLU) and on the gradient they are handed back, and a layer's input is not
read after its backward (layers keep what they need, such as masks, apart), so Affine
writes its input gradient over its input.

Products and the GIL: the products here are np.dot (but batch normalization's
per-channel sums of products, which are np.einsum). np.matmul keeps the GIL through
products of fewer than 500 output values (NumPy releases it above a size threshold
counted on the output), however long they take: a 15x32 product over 40,000 rows ran
1.10x as fast on two threads as on one, a 16x32 one 1.88x. np.dot always releases it.
With @, DeepConvNet's bias gradients (16 to 64 values, summed over up to 39,200 rows)
alone held the GIL in 5% of a two-thread run's samples (py-spy --gil --native), and the
other thread waited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowmem_cnn.engine.columns import ConvGeometry, add_columns, column_tiles, windows
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.workspace import Context

# The affine weight gradient is made in slices of about this size (see Affine.backward).
GRADIENT_SLICE_BYTES = 1 << 18


class Sums:
    """Arrays that a thread's micro-batches add into, by name. A layer can only write
    one whole or add to it: after `restart()` (a thread's first micro-batch of an
    update) the first write to each name overwrites the previous mini-batch's value,
    so the arrays need no zeroing, and a product can be written straight into one
    (`out`). There is no `sums[name] += value`: that would add onto the previous
    mini-batch's values. `value(name)` is read-only."""

    def __init__(self, arrays: dict):
        self._arrays = dict(arrays)
        self._stale = set()  # names whose array holds a previous mini-batch's values

    def restart(self):
        self._stale = set(self._arrays)

    def fresh(self, name) -> bool:
        """Whether the next write to `name` is its first of the update (it overwrites)."""
        return name in self._stale

    def out(self, name) -> np.ndarray:
        """`name`'s array, for a product to write whole (out=): its first write only."""
        if name not in self._stale:
            raise RuntimeError(f"{name} already holds this update's values: add to it")
        self._stale.discard(name)
        return self._arrays[name]

    def add(self, name, value, rows: tuple | None = None):
        """Add `value` (any shape of the same size) to `name`'s array, or write it there
        on the first write of the update; `rows` (lo, hi): add into those rows only,
        which cannot be a first write."""
        target = self._arrays[name]
        if rows is not None:
            if name in self._stale:
                raise RuntimeError(f"{name}: a first write must be whole, not rows {rows}")
            target[rows[0] : rows[1]] += value
            return
        target = target.reshape(np.shape(value))
        if name in self._stale:
            np.copyto(target, value)
            self._stale.discard(name)
        else:
            target += value

    def value(self, name) -> np.ndarray:
        view = self._arrays[name].view()
        view.flags.writeable = False
        return view

    def names(self):
        return self._arrays.keys()


class Gradients(Sums):
    """A layer's parameter gradients by name (W, b), for one thread."""


class Statistics(Sums):
    """What a layer measures of a mini-batch in training and keeps apart from the
    gradients (batch normalization's means and variances), for one thread."""


class NotExportable(LowmemError):
    """A layer that ONNX's operators cannot express (see Layer.onnx)."""


# A setting a config must give; a pooling's stride, which is its size unless given.
REQUIRED, SAME_AS_SIZE = object(), object()


@dataclass(frozen=True)
class Setting:
    """One setting that a config's [[network.layers]] table gives a layer: its default
    (REQUIRED: none) and what it takes: a number in [0, 1) if `fraction`, else a whole
    number from `least`."""

    default: object = REQUIRED
    fraction: bool = False
    least: int = 1

    def problem(self, value, most: int | None = None) -> str | None:
        """What is wrong with `value` for this setting (whole numbers up to `most`)."""
        if self.fraction:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                return "is not a number in [0, 1)"
        elif (not isinstance(value, int) or isinstance(value, bool) or value < self.least
              or (most is not None and value > most)):
            return (f"is not a {'non-negative' if self.least == 0 else 'positive'} whole number"
                    + (f" up to {most:,}" if most else ""))
        return None

    def taken(self, value):
        """`value` as the layer's constructor takes it."""
        return float(value) if self.fraction else int(value)
# Weights are drawn this many at a time (float64: 512 KiB of temporaries).
INIT_CHUNK = 1 << 16


class Layer:
    """What every layer is, and what it answers about itself.

    `param_shapes`: its trained parameters by name (set on the layer as attributes);
    `state_shapes`: values it keeps with them that are not trained (batch
    normalization's running statistics). Parameters are numbered as in the book's
    files (W1, b1, W2, ...); a layer that is not `numbered` takes the number of the
    layer before it (gamma2 belongs to W2). `initial` gives their first values,
    `book_view` and `book_shape` their layout in the book's files, `onnx` its nodes,
    `tile_unit` and `tile_size` its tiles, `profile_rows` its row of profile-memory.
    """

    kind = None  # its `type` in a config's [[network.layers]] (None: made by the engine)
    in_shape: tuple
    out_shape: tuple
    param_shapes: dict = {}
    state_shapes: dict = {}
    numbered = True
    need_input_grad = True  # the first layer's input gradient is never needed
    draws_noise = False  # uses ctx.dropout_rng in training
    # what a config's [[network.layers]] table gives it: the constructor's arguments by
    # name (Setting); config.py checks and describes them
    settings: dict = {}
    takes_map = False  # its input is a map (H, W, C), not a vector
    # an elementwise nondecreasing function (ReLU): a max over windows after it can go
    # first (max commutes with it), on fewer values
    monotone = False
    takes_max = False  # a max over windows (max-pooling)
    # what the plan gives it: None (no tiles), "rows" (column rows) or "images"
    tile_unit = None
    column_arrays = ()  # the names of its workspace arrays that hold columns (im2col's)

    @classmethod
    def from_spec(cls, spec: dict, in_shape):
        """The layer of one [[network.layers]] table (KeyError: a required setting is
        missing)."""
        arguments = {}
        for key, setting in cls.settings.items():
            value = spec.get(key, spec.get("size") if setting.default is SAME_AS_SIZE else setting.default)
            if value is REQUIRED or value is None:
                raise KeyError(key)
            arguments[key] = setting.taken(value)
        return cls(in_shape, **arguments)

    def forward(self, x, ctx: Context):
        raise NotImplementedError

    def backward(self, dout, saved, grads, ctx: Context):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    # --- its parameters -----------------------------------------------------------

    def initial(self, name: str, rng, weight_init, dtype) -> np.ndarray:
        """The first value of parameter or state `name`: zeros unless the layer says
        otherwise."""
        return np.zeros(self.shape_of(name), dtype)

    def shape_of(self, name: str) -> tuple:
        return tuple({**self.param_shapes, **self.state_shapes}[name])

    def book_view(self, name: str, array: np.ndarray) -> np.ndarray:
        """`array` (`name`, in the engine's layout) seen with the book's axes: a view, so
        writing into it writes the engine's array. The same unless the layer says so."""
        return array

    def book_shape(self, name: str) -> tuple:
        return self.shape_of(name)

    def to_book(self, name: str, array: np.ndarray) -> np.ndarray:
        """A contiguous copy of the engine's `array` in the book's layout."""
        return np.ascontiguousarray(self.book_view(name, array)).reshape(self.book_shape(name))

    def from_book(self, name: str, array: np.ndarray, dtype) -> np.ndarray:
        """A new engine array of `dtype` holding `array`, given in the book's layout."""
        engine = np.empty(self.shape_of(name), dtype)
        view = self.book_view(name, engine)
        np.copyto(view, np.reshape(array, view.shape), casting="unsafe")
        return engine

    # --- how the engine runs it ---------------------------------------------------

    def fused_with(self, following) -> Layer | None:
        """One layer that computes this one and `following` together, if there is one."""
        return None

    def tile_size(self, m: int, tile_bytes: int, images: int, itemsize: int) -> int | None:
        """Its tile for a micro-batch of m images: column rows of about `tile_bytes`, or
        `images` images at a time (see tile_unit)."""
        return None

    # --- what it tells the faces --------------------------------------------------

    def onnx(self, graph, x: str) -> str:
        """Add its ONNX nodes to `graph` (export.Graph) after the value named `x`; the
        name of its output."""
        try:
            named = f"{self.describe()!r} ({type(self).__name__})"
        except NotImplementedError:
            named = type(self).__name__
        raise NotExportable(f"its layer {named} has no ONNX export")

    def book_columns_bytes(self, n) -> int:
        """What the book's whole-batch im2col allocates for n images (float64)."""
        return 0

    def profile_rows(self, recording, batch_size: int, tile: int | None) -> list[dict]:
        """Its rows of profile-memory: the book's whole-batch columns for `batch_size`
        images, and what it asked of `recording` (a workspace it ran alone in)."""
        return [profile_row(self, self.describe(), self.book_columns_bytes(batch_size),
                             recording.bytes_of(self.column_arrays), recording.held_bytes(),
                             tile, self.tile_unit)]


def profile_row(layer, name, book_bytes, column_bytes, workspace_bytes, tile, unit) -> dict:
    shape = layer.out_shape
    return {
        "layer": name,
        # the book's (C, H, W) order, for readers of the book
        "output_shape": [shape[2], shape[0], shape[1]] if len(shape) == 3 else list(shape),
        "book_im2col_bytes": book_bytes,
        "tiled_bytes": column_bytes,  # its column tiles here (pooling makes none)
        "workspace_bytes": workspace_bytes,
        "tile": tile if unit else None,
        "tile_unit": unit,
    }


def drawn_weights(shape, rng, weight_init, dtype) -> np.ndarray:
    """Weights from a normal distribution of std `weight_init`, or He's (weight_init
    "he": std sqrt(2 / the inputs of one output, shape[0]), as the book's DeepConvNet).
    Drawn in float64 a chunk at a time, so that the temporaries stay small (the draws
    are the same as one whole-array draw's)."""
    std = np.sqrt(2.0 / shape[0]) if weight_init == "he" else weight_init
    value = np.empty(shape, dtype)
    flat = value.reshape(-1)
    for lo in range(0, flat.size, INIT_CHUNK):
        part = rng.standard_normal(min(INIT_CHUNK, flat.size - lo))
        part *= std
        flat[lo : lo + len(part)] = part
    return value


def column_sums(rows: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """rows.sum(axis=0) as a BLAS product with `ones` (len(rows) values): 3x faster than
    sum(axis=0) over many rows, and np.dot releases the GIL (see above)."""
    ones.fill(1)
    return np.dot(ones, rows)


# The owner of the workspace arrays the convolutions of a thread share (scratch arrays,
# dead when a call returns), and their names.
_CONVOLUTIONS = object()
_SHARED = frozenset({"columns", "ones", "dW", "dW_tile", "weights", "bias", "flipped",
                     "dout_padded"})


class Convolution(Layer):
    """im2col in tiles of whole images (see columns.py), every array from the thread's
    Workspace. Its tile (ctx.tile) is column rows; the tiles' shapes are the geometry's
    (columns.ConvGeometry).

    The input gradient of a stride-1 convolution is computed as a convolution itself
    (of the output gradient, padded by size - 1 - pad, with the filters turned by 180
    degrees and their channels swapped): its columns are made the same way as the
    forward's and one product per tile writes the gradient, with nothing to add up.
    col2im instead (a product per tile, then size * size strided adds) took 11.2 ms
    against 3.7 ms for DeepConvNet's 28x28x16 layer (4.4 ms without the pairs of
    columns.GROUP_MAX_CHANNELS), 6.8 against 2.3 ms for its 14x14x32 layer of pad 2 (50
    images, one thread, min of 60 on a busy machine); it stays for strides above 1 and
    pads above size - 1.
    """

    kind = "conv"
    settings = {"filters": Setting(), "size": Setting(), "stride": Setting(1), "pad": Setting(0, least=0)}
    takes_map = True
    tile_unit = "rows"
    column_arrays = ("columns", "grad_columns")
    # A convolution with at most this many input channels is fused with the max-pooling
    # after it (see conv_pool.py). With more channels im2col's columns are cheap to copy
    # and the fused layer's extra multiply-adds cost more than it saves.
    FUSE_MAX_CHANNELS = 4

    def __init__(self, in_shape, filters: int, size: int, stride: int = 1, pad: int = 0):
        self.geometry = g = ConvGeometry(tuple(in_shape), filters, size, stride, pad)
        self.in_shape, self.out_shape = g.in_shape, g.out_shape
        self.size, self.stride, self.pad, self.filters = size, stride, pad, filters
        self.width = g.width  # columns of the column matrix
        self.rows_per_image = g.rows_per_image
        self.param_shapes = {"W": (self.width, filters), "b": (filters,)}

    def _array(self, ws, name, shape, dtype, train=True):
        """Scratch arrays are shared by all the convolutions of a thread (see _SHARED);
        the others, and the padded input kept for backward, are the layer's own."""
        shared = name in _SHARED or (name == "padded" and not train)
        return ws.array(_CONVOLUTIONS if shared else self, name, shape, dtype)

    def forward(self, x, ctx):
        ws, train, geo = ctx.ws, ctx.train, self.geometry
        m = len(x)
        oh, ow, f = self.out_shape
        g = geo.group
        tile = geo.forward_tile(m, ctx.tile(self))
        padded = x
        if self.pad:  # kept until backward when training
            padded = self._array(ws, "padded", (m, *geo.padded_shape), x.dtype, train)
        out = self._array(ws, "out", (m * oh * ow // g, g * f), x.dtype)
        size = geo.columns_size(m, train, ctx.tile(self), self.need_input_grad)
        columns = self._array(ws, "columns", (size,), x.dtype)
        weights = bias = None
        if g > 1:
            weights = self._array(ws, "weights", geo.grouped_shape(g, self.in_shape[2], f), x.dtype)
            bias = self._array(ws, "bias", (g, f), x.dtype)
        if ctx.dry:
            return out.reshape(m, oh, ow, f), (padded if train else None)
        _pad_into(padded, x, self.pad)
        weights = _grouped(self.W.reshape(self.size, self.size, -1, f), g, weights)
        if g > 1:
            bias[:] = self.b
            bias = bias.reshape(g * f)
        else:
            bias = self.b
        _convolve(padded, self.size, self.stride, weights, g, tile, out, columns, bias)
        # the padded input is kept (in the workspace); without padding, the input itself
        return out.reshape(m, oh, ow, f), (padded if train else None)

    def backward(self, dout, padded, grads, ctx):
        ws, geo = ctx.ws, self.geometry
        m = len(dout)
        k, c, f, g = self.size, self.in_shape[2], self.filters, geo.group
        tile = ctx.tile(self)
        rows, width = geo.forward_tile(m, tile)
        ones = self._array(ws, "ones", (m * geo.rows_per_image,), dout.dtype)
        size = geo.columns_size(m, True, tile, self.need_input_grad)
        columns = self._array(ws, "columns", (size,), dout.dtype)
        dw = self._array(ws, "dW", (width, g * f), dout.dtype)
        dw_tile = None
        if geo.tiles(m, tile) > 1:
            dw_tile = self._array(ws, "dW_tile", (width, g * f), dout.dtype)
        by_convolution = self.need_input_grad and geo.transposed_grad
        if by_convolution:
            gg, q = geo.grad_group, k - 1 - self.pad
            flipped = self._array(ws, "flipped", geo.grouped_shape(gg, f, c), dout.dtype)
            images = geo.padded_images(m, tile)
            dout_padded = None
            if q:
                dout_padded = self._array(ws, "dout_padded", (images, *geo.grad_padded_shape), dout.dtype)
        elif self.need_input_grad:
            grad_padded = self._array(ws, "grad_padded", (m, *geo.padded_shape), dout.dtype)
            grad_columns = self._array(ws, "grad_columns", (rows, self.width), dout.dtype)
            grad = self._array(ws, "grad", (m, *self.in_shape), dout.dtype) if self.pad else None
        if ctx.dry:
            return (np.broadcast_to(np.zeros((), dout.dtype), (m, *self.in_shape))
                    if self.need_input_grad else None)

        dout = dout.reshape(-1, f)
        grads.add("b", column_sums(dout, ones))
        self._weight_grad(dout.reshape(-1, g * f), padded, (rows, width), columns, dw, dw_tile, grads)
        if by_convolution:
            return self._input_grad(dout.reshape(m, *self.out_shape), padded, tile, flipped,
                                    dout_padded, images, columns)
        if self.need_input_grad:
            return self._input_grad_col2im(dout, tile, grad_padded, grad_columns, grad)
        return None

    def _weight_grad(self, dout, padded, tile, buffer, total, part, grads):
        """dW = columns.T @ dout (a row per column row), a tile at a time: the columns are
        made again from the kept (padded) input, as in the forward."""
        k, c, f, g = self.size, self.in_shape[2], self.filters, self.geometry.group
        view = windows(padded, k, self.stride, group=g)
        for start, stop, columns in column_tiles(view, tile[0], buffer):
            if start == 0:
                np.dot(columns.T, dout[start:stop], out=total)
            else:
                total += np.dot(columns.T, dout[start:stop], out=part)
        if g == 1:
            grads.add("W", total)
            return
        # each position of the group holds part of the filter's gradient
        total = total.reshape(k, k + g - 1, c, g, f)
        for t in range(g):
            grads.add("W", total[:, t : t + k, :, t, :])

    def _input_grad(self, dout, kept, tile, flipped, padded, images, buffer):
        """Stride 1: the input gradient is the convolution of the output gradient, padded
        by size - 1 - pad, with the filters turned by 180 degrees and each filter's
        input and output channels swapped. It is written over the kept input (padded, or
        the input itself), which the weight gradient was the last to read."""
        geo = self.geometry
        k, c, f, g = self.size, self.in_shape[2], self.filters, geo.grad_group
        h, w, _ = self.in_shape
        m = len(dout)
        weights = _grouped(self.W.reshape(k, k, c, f)[::-1, ::-1].transpose(0, 1, 3, 2), g, flipped)
        grad = kept.reshape(-1)[: m * h * w * c].reshape(m * h * w // g, g * c)
        columns_tile = geo.grad_tile(m, tile)
        q = k - 1 - self.pad
        if images == m:
            source = _pad_into(padded, dout, q) if q else dout
            _convolve(source, k, 1, weights, g, columns_tile, grad, buffer)
            return grad.reshape(m, h, w, c)
        # A tile's images padded at a time, in the same buffer: its border is zeroed once
        _pad_into(padded[:images], dout[:images], q)
        oh, ow, _ = self.out_shape
        per_image = h * w // g
        for first in range(0, m, images):
            last = min(first + images, m)
            part = padded[: last - first]
            if first:
                part[:, q : q + oh, q : q + ow] = dout[first:last]
            _convolve(part, k, 1, weights, g, columns_tile, grad[first * per_image : last * per_image],
                      buffer)
        return grad.reshape(m, h, w, c)

    def _input_grad_col2im(self, dout, tile, grad, columns, inner):
        """Strides above 1: each tile's column gradients (dout @ W.T) added onto the
        windows they came from, one filter offset at a time."""
        h, w, _ = self.in_shape
        p = self.pad
        grad.fill(0)
        grad_view = windows(grad, self.size, self.stride)
        rows, _ = self.geometry.forward_tile(len(grad), tile)
        for start in range(0, len(dout), rows):
            stop = min(start + rows, len(dout))
            part = np.dot(dout[start:stop], self.W.T, out=columns[: stop - start])
            add_columns(grad_view, start, stop, part)
        if not p:
            return grad
        # contiguous, as the other path's: the layer before may reshape it
        np.copyto(inner, grad[:, p : p + h, p : p + w, :])
        return inner

    # --- what it answers about itself -------------------------------------------

    def initial(self, name, rng, weight_init, dtype):
        if name == "W":
            return drawn_weights(self.param_shapes["W"], rng, weight_init, dtype)
        return super().initial(name, rng, weight_init, dtype)

    def book_view(self, name, array):
        """The book's W is (F, C, FH, FW); the engine's columns are in (FH, FW, C) order,
        so its W is (FH*FW*C, F)."""
        if name != "W":
            return array
        return array.reshape(self.size, self.size, self.in_shape[2], self.filters).transpose(3, 2, 0, 1)

    def book_shape(self, name):
        if name != "W":
            return self.shape_of(name)
        return (self.filters, self.in_shape[2], self.size, self.size)

    def fused_with(self, following):
        """A stride-1 convolution with few input channels and the non-overlapping
        max-pooling after it: one ConvolutionPooling."""
        if (following.takes_max and following.stride == following.size and self.stride == 1
                and self.in_shape[2] <= self.FUSE_MAX_CHANNELS):
            from lowmem_cnn.engine.conv_pool import ConvolutionPooling  # it builds on this module

            return ConvolutionPooling(self, following)
        return None

    def tile_size(self, m, tile_bytes, images, itemsize):
        return min(max(1, tile_bytes // (self.width * itemsize)), m * self.rows_per_image)

    def onnx(self, graph, x, holder=None):
        """Conv-1: explicit kernel, strides and pads mean the same in every version (W in
        the book's (F, C, FH, FW), which is ONNX's OIHW). `holder`: the layer whose
        parameters these are (a fused one's)."""
        holder = holder or self
        k, s, p = self.size, self.stride, self.pad
        return graph.node("Conv", 1, [x, graph.param(holder, "W"), graph.param(holder, "b")],
                          kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def book_columns_bytes(self, n) -> int:
        return n * self.rows_per_image * self.width * 8

    def describe(self):
        return f"conv {self.filters}x{self.size}x{self.size} stride {self.stride} pad {self.pad}"


def _pad_into(padded, x, pad):
    """`x` copied into `padded`, with a border of `pad` zeros (only the border is zeroed):
    0.25 ms against np.pad's 1.29 ms in a fresh mapping, 50 images of 28x28x16."""
    if not pad:
        return x
    m, h, w, c = x.shape
    padded[:, :pad] = 0
    padded[:, pad + h :] = 0
    padded[:, pad : pad + h, :pad] = 0
    padded[:, pad : pad + h, pad + w :] = 0
    padded[:, pad : pad + h, pad : pad + w] = x
    return padded


def _grouped(filters, group, weights):
    """The (size * (size + group - 1) * C, group * F) weights of `filters`, a
    (size, size, C, F) array: the filter at each of the group's positions, written into
    `weights` (unless the filters themselves will do)."""
    k, _, c, f = filters.shape
    if group == 1 and filters.flags.c_contiguous:
        return filters.reshape(k * k * c, f)
    if group > 1:
        weights.fill(0)
    for t in range(group):
        weights[:, t : t + k, :, t, :] = filters
    return weights.reshape(k * (k + group - 1) * c, group * f)


def _convolve(padded, size, stride, weights, group, tile, out, buffer, bias=None):
    """out = the columns of `padded` (windows of `group` outputs) @ weights (+ bias),
    a tile at a time; `out` has a row per column row."""
    rows, _ = tile
    view = windows(padded, size, stride, group=group)
    for start, stop, columns in column_tiles(view, rows, buffer):
        part = np.dot(columns, weights, out=out[start:stop])
        if bias is not None:
            part += bias  # while the tile is in cache


class ReLU(Layer):
    kind = "relu"
    monotone = True

    def __init__(self, in_shape):
        self.in_shape = self.out_shape = tuple(in_shape)

    def forward(self, x, ctx):
        mask = ctx.ws.array(self, "mask", x.shape, bool) if ctx.train else None
        if ctx.dry:
            return x, mask
        if mask is not None:
            np.greater(x, 0, out=mask)
        return np.maximum(x, 0, out=x), mask

    def backward(self, dout, mask, grads, ctx):
        if not ctx.dry:
            dout *= mask
        return dout

    def onnx(self, graph, x):
        return graph.node("Relu", 6, [x])  # Relu-6: Relu-1's consumed_inputs gone, the same max(0, x)

    def describe(self):
        return "relu"


class Pooling(Layer):
    """What the poolings share: size x size windows every `stride` values of each
    channel, taken as strided views (no column matrix at all)."""

    settings = {"size": Setting(), "stride": Setting(SAME_AS_SIZE)}
    takes_map = True

    def __init__(self, in_shape, size: int, stride: int):
        h, w, c = in_shape
        if size > h or size > w:
            raise ValueError(f"a {size}x{size} pool is larger than its {h}x{w} input")
        if stride < 1:
            raise ValueError(f"stride {stride} is not a whole number above 0")
        self.in_shape = (h, w, c)
        self.size, self.stride = size, stride
        self.out_shape = ((h - size) // stride + 1, (w - size) // stride + 1, c)

    def _views(self, x):
        """One strided view per position in the window, each shaped like the output."""
        oh, ow, _ = self.out_shape
        s = self.stride
        return [x[:, i : i + s * (oh - 1) + 1 : s, j : j + s * (ow - 1) + 1 : s, :]
                for i in range(self.size) for j in range(self.size)]

    def book_columns_bytes(self, n) -> int:
        """The book's pooling makes a column of size^2 values per output (its
        max-pooling; an average written the same way would make the same)."""
        oh, ow, c = self.out_shape
        return n * oh * ow * c * self.size * self.size * 8


class MaxPooling(Pooling):
    """Max over windows. Training keeps the position of the maximum (0..size*size-1) as
    uint8; ties go to the first position, as the book's argmax does. Every array comes
    from the thread's Workspace: fresh ones were faulted in on every micro-batch
    (DeepConvNet's three poolings, forward and backward, 50 images, one thread: 6.25 ->
    4.61 ms).
    """

    kind = "pool"
    takes_max = True

    def forward(self, x, ctx):
        ws = ctx.ws
        shape = (len(x), *self.out_shape)
        out = ws.array(self, "out", shape, x.dtype)
        if ctx.train:
            argmax = ws.array(self, "argmax", shape, np.uint8)
            missed = ws.array(self, "missed", shape, bool)
            differs = ws.array(self, "differs", shape, bool)
        if ctx.dry:
            return out, (argmax if ctx.train else None)
        views = self._views(x)
        if len(views) == 1:
            np.copyto(out, views[0])
        else:
            np.maximum(views[0], views[1], out=out)
        for view in views[2:]:
            np.maximum(out, view, out=out)
        if not ctx.train:
            return out, None
        # position of the first maximum = how many leading views miss it
        # (boolean arithmetic: masked writes are several times slower)
        argmax.fill(0)
        missed.fill(True)
        for view in views[:-1]:
            np.not_equal(view, out, out=differs)
            missed &= differs
            argmax += missed
        return out, argmax

    def backward(self, dout, argmax, grads, ctx):
        ws = ctx.ws
        grad = ws.array(self, "grad", (len(dout), *self.in_shape), dout.dtype)
        chosen = ws.array(self, "differs", argmax.shape, bool)  # forward's scratch
        overlapping = self.stride < self.size
        if overlapping:
            part = ws.array(self, "part", dout.shape, dout.dtype)
        if ctx.dry:
            return grad
        if self.stride == self.size:  # the windows tile the input: zero only the rest
            oh, ow, _ = self.out_shape
            grad[:, oh * self.stride :] = 0
            grad[:, :, ow * self.stride :] = 0
        else:
            grad.fill(0)
        for k, view in enumerate(self._views(grad)):
            np.equal(argmax, k, out=chosen)
            if overlapping:
                view += np.multiply(dout, chosen, out=part)
            else:
                np.multiply(dout, chosen, out=view)
        return grad

    def onnx(self, graph, x):
        k, s = self.size, self.stride
        # MaxPool-1: no pads, the output size rounded down (ceil_mode, from 10, is 0)
        return graph.node("MaxPool", 1, [x], kernel_shape=[k, k], strides=[s, s])

    def describe(self):
        return f"pool {self.size}x{self.size} stride {self.stride}"


class Affine(Layer):
    kind = "affine"
    settings = {"units": Setting()}

    def __init__(self, in_shape, units: int):
        self.in_shape = tuple(in_shape)
        self.units = units
        self.out_shape = (units,)
        self.inputs = math.prod(self.in_shape)
        self.param_shapes = {"W": (self.inputs, units), "b": (units,)}

    def forward(self, x, ctx):
        x = x.reshape(x.shape[0], self.inputs)
        out = ctx.ws.array(self, "out", (len(x), self.units), x.dtype)
        if not ctx.dry:
            np.dot(x, self.W, out=out)
            out += self.b
        return out, (x if ctx.train else None)

    def backward(self, dout, x, grads, ctx):
        # x.T @ dout a slice of rows at a time, unless written straight into the
        # gradient: the product is added to the gradient while in cache, and its buffer
        # stays small
        rows = max(1, GRADIENT_SLICE_BYTES // (self.units * dout.dtype.itemsize))
        fresh = not ctx.dry and grads.fresh("W")
        if not fresh:  # (a thread's first micro-batch of an update needs no slices)
            part = ctx.ws.array(self, "dW", (min(rows, self.inputs), self.units), dout.dtype)
        if ctx.dry:
            return x.reshape(dout.shape[0], *self.in_shape) if self.need_input_grad else None
        if fresh:
            np.dot(x.T, dout, out=grads.out("W"))
        else:
            for lo in range(0, self.inputs, rows):
                hi = min(lo + rows, self.inputs)
                grads.add("W", np.dot(x[:, lo:hi].T, dout, out=part[: hi - lo]), rows=(lo, hi))
        grads.add("b", dout.sum(axis=0))
        if not self.need_input_grad:
            return None
        # Nothing reads the input after this (see the module's docstring), so the input
        # gradient takes its array (the layers before hand over contiguous outputs).
        grad = np.dot(dout, self.W.T, out=x if x.flags.c_contiguous else None)
        return grad.reshape(dout.shape[0], *self.in_shape)

    def initial(self, name, rng, weight_init, dtype):
        if name == "W":
            return drawn_weights(self.param_shapes["W"], rng, weight_init, dtype)
        return super().initial(name, rng, weight_init, dtype)

    def book_view(self, name, array):
        """The book flattens a map in (C, H, W) order, the engine in (H, W, C): after a
        map, its W is seen as (C, H, W, units) where the book has (C*H*W, units)."""
        if name != "W" or len(self.in_shape) != 3:
            return array
        h, w, c = self.in_shape
        return array.reshape(h, w, c, self.units).transpose(2, 0, 1, 3)

    def onnx(self, graph, x):
        if len(self.in_shape) == 3:  # a map: C, then H, then W, as the book's rows
            x = graph.node("Flatten", 1, [x], axis=1)  # Flatten-1 has axis
        # Gemm-7: the bias [units] broadcast over the rows (Gemm-6 needed broadcast=1)
        return graph.node("Gemm", 7, [x, graph.param(self, "W"), graph.param(self, "b")])

    def describe(self):
        return f"affine {self.inputs}->{self.units}"


class Dropout(Layer):
    """The book's dropout: training keeps each value with probability 1 - ratio;
    inference scales by 1 - ratio instead, so the book's parameter files mean the same."""

    kind = "dropout"
    draws_noise = True
    settings = {"ratio": Setting(fraction=True)}

    def __init__(self, in_shape, ratio: float):
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio {ratio} is not in [0, 1)")
        self.in_shape = self.out_shape = tuple(in_shape)
        self.ratio = ratio

    def forward(self, x, ctx):
        rng = ctx.dropout_rng
        if rng is None and not ctx.train:  # test time: the book's scaling
            if not ctx.dry:
                x *= 1.0 - self.ratio
            return x, None
        if rng is None and not ctx.dry:
            raise ValueError("dropout in training needs the Generator its masks come from")
        # the mask, from float64 random numbers (as Generator.random(shape) draws them)
        noise = ctx.ws.array(self, "noise", x.shape, np.float64)
        mask = ctx.ws.array(self, "mask", x.shape, bool)
        if ctx.dry:
            return x, mask
        rng.random(out=noise)
        np.greater(noise, self.ratio, out=mask)
        x *= mask
        return x, (mask if ctx.train else None)

    def backward(self, dout, mask, grads, ctx):
        if not ctx.dry:
            dout *= mask
        return dout

    def onnx(self, graph, x):
        # Mul-7: a scalar broadcast (Mul-6 needed broadcast=1); the book's dropout scales
        # at inference, so the parameter files mean the same
        return graph.node("Mul", 7, [x, graph.constant("keep", 1.0 - self.ratio)])

    def describe(self):
        return f"dropout {self.ratio}"


class BatchNormalization(Layer):
    """The book's batch normalization (chapter 6): per channel after a convolution, per
    unit after an affine layer. Training normalizes with the statistics of the
    micro-batch (the batch whose images run together on a thread: as many images as
    the plan gives it) and records them; the network then moves the running mean and
    variance, which evaluation and predict use, once per update (see
    Network.update_statistics). gamma and beta are trained.

        mean = E[x], var = E[(x - mean)^2], xn = (x - mean) / sqrt(var + eps),
        out = gamma xn + beta
        dx = gamma / sqrt(var + eps) * (dout - E[dout] - xn E[dout xn])

    Sums over the rows are products with ones (column_sums: 0.10 ms against sum(axis=0)'s
    0.76 ms for 28x28x16 maps of 50 images), and the backward takes 4 passes over the
    values besides its two sums (it took 9 before: BN was a third of a micro-batch of
    configs/photos.toml).
    """

    kind = "batchnorm"
    numbered = False
    EPS = 1e-6  # the book's 10e-7
    settings = {"momentum": Setting(0.9, fraction=True)}

    def __init__(self, in_shape, momentum: float = 0.9):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum {momentum} is not in [0, 1)")
        self.in_shape = self.out_shape = tuple(in_shape)
        self.momentum = momentum
        channels = self.in_shape[-1]
        self.param_shapes = {"gamma": (channels,), "beta": (channels,)}
        self.state_shapes = {"running_mean": (channels,), "running_var": (channels,)}

    def forward(self, x, ctx):
        channels = self.in_shape[-1]
        rows = x.reshape(-1, channels)
        if not ctx.train:
            if not ctx.dry:
                scale = self.gamma / np.sqrt(self.running_var + self.EPS)
                rows *= scale
                rows += self.beta - self.running_mean * scale
            return rows.reshape(x.shape), None
        xc = ctx.ws.array(self, "xc", rows.shape, x.dtype)  # x - mean, kept for backward
        ones = ctx.ws.array(self, "ones", (len(rows),), x.dtype)
        if ctx.dry:
            return x, (xc, None)
        n = len(rows)
        mean = column_sums(rows, ones) / n
        np.subtract(rows, mean, out=xc)
        var = np.einsum("ij,ij->j", xc, xc) / n
        std = np.sqrt(var + self.EPS)
        np.multiply(xc, self.gamma / std, out=rows)  # the output takes the input's array
        rows += self.beta
        statistics = ctx.statistics.get(id(self)) if ctx.statistics else None
        if statistics is not None:
            # weighted by the micro-batch's share of the mini-batch
            share = (len(x) / ctx.batch_images) if ctx.batch_images else 1.0
            statistics.add("running_mean", mean * share)
            statistics.add("running_var", var * share)
        return rows.reshape(x.shape), (xc, std)

    def backward(self, dout, saved, grads, ctx):
        xc, std = saved
        ones = ctx.ws.array(self, "ones", (len(xc),), xc.dtype)
        if ctx.dry:
            return dout
        rows = dout.reshape(xc.shape)
        n = len(rows)
        dbeta = column_sums(rows, ones)
        dgamma = np.einsum("ij,ij->j", xc, rows) / std  # sum of dout * xn
        grads.add("beta", dbeta)
        grads.add("gamma", dgamma)
        # dx = gamma / std * (dout - E[dout] - xn E[dout xn]), xn = xc / std; in the
        # gradient's array, with the kept xc (not read again) as scratch
        xc *= dgamma / (n * std)
        xc += dbeta / n
        rows -= xc
        rows *= self.gamma / std
        return rows.reshape(dout.shape)

    def update_state(self, statistics: dict):
        """Move the running mean and variance towards the mini-batch's `statistics`
        (the micro-batches' means and variances, weighted by their images)."""
        for name in self.state_shapes:
            running = getattr(self, name)
            running *= self.momentum
            running += (1 - self.momentum) * statistics[name]

    def initial(self, name, rng, weight_init, dtype):
        # scales and variances start at one, shifts and means at zero
        if name in ("gamma", "running_var"):
            return np.ones(self.shape_of(name), dtype)
        return super().initial(name, rng, weight_init, dtype)

    def onnx(self, graph, x):
        # BatchNormalization-9: per channel C of (N, C, ...) at any rank, running
        # statistics (before 9, `spatial` chose); from 14 training_mode, here 0
        return graph.node("BatchNormalization", 9,
                          [x, *(graph.param(self, name)
                                for name in ("gamma", "beta", "running_mean", "running_var"))],
                          epsilon=self.EPS)

    def describe(self):
        return f"batchnorm {self.in_shape[-1]}"


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in place."""
    scores -= scores.max(axis=1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1, keepdims=True)
    return scores


def softmax_cross_entropy(scores: np.ndarray, labels: np.ndarray, batch_total: int):
    """Summed loss of this micro-batch and d(mean loss over batch_total images)/d scores.

    The book's cross-entropy: -log(p[label] + 1e-7). Works in place on `scores`.
    """
    softmax(scores)
    rows = np.arange(len(labels))
    loss = -np.log(scores[rows, labels] + 1e-7).sum()
    scores[rows, labels] -= 1
    scores /= batch_total
    return float(loss), scores


def build_layer(spec: dict, in_shape, types: dict, number: int = 1) -> Layer:
    """A layer from one [[network.layers]] table of a config (the `number`-th), of one
    of `types` (kind -> class)."""
    kind = spec.get("type")
    name = f"layer {number} ({kind})"
    cls = types.get(kind)
    if cls is None:
        raise LowmemError(f"{name}: unknown layer type ({', '.join(types)})")
    try:
        if cls.takes_map and len(in_shape) != 3:
            raise ValueError(f"needs a map, but its input is a vector of {in_shape[0]}")
        return cls.from_spec(spec, tuple(in_shape))
    except KeyError as err:
        raise LowmemError(f"{name}: missing {err.args[0]!r}") from None
    except ValueError as err:
        raise LowmemError(f"{name}: {err}") from None
