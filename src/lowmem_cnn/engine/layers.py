"""The layers of the book's networks, NHWC, each with forward and backward.

Shapes are per image: (H, W, C) for maps, (D,) for vectors. `forward(x, ctx)` returns
the output and what backward needs (None unless `ctx.train`); `backward(dout, saved,
grads, ctx)` adds the parameter gradients into `grads` (a Gradients) and returns the
input gradient. `ctx` (workspace.Context) holds the thread's Workspace, the plan's
tile sizes and dropout's Generator. A layer takes every array it uses from
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

import math

import numpy as np

from lowmem_cnn.engine.columns import ConvGeometry, add_columns, column_tiles, windows
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.workspace import Context

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


# A setting a config must give; a pooling's stride, which is its size unless given.
REQUIRED, SAME_AS_SIZE = object(), object()
# Settings that are numbers in [0, 1); every other setting is a whole number.
FRACTIONS = ("ratio", "momentum")


class Layer:
    """What every layer is. `param_shapes`: its trained parameters by name (set on the
    layer as attributes); `state_shapes`: values it keeps with them that are not
    trained (batch normalization's running statistics). Parameters are numbered as in
    the book's files (W1, b1, W2, ...); a layer that is not `numbered` takes the number
    of the layer before it (gamma2 belongs to W2)."""

    in_shape: tuple
    out_shape: tuple
    param_shapes: dict = {}
    state_shapes: dict = {}
    numbered = True
    need_input_grad = True  # the first layer's input gradient is never needed
    draws_noise = False  # uses ctx.dropout_rng in training
    # what a config's [[network.layers]] table gives it: the constructor's arguments by
    # name, with their defaults (REQUIRED: none); config.py checks and describes them
    settings: dict = {}

    @classmethod
    def from_spec(cls, spec: dict, in_shape):
        """The layer of one [[network.layers]] table (KeyError: a required setting is
        missing)."""
        arguments = {}
        for key, default in cls.settings.items():
            value = spec.get(key, spec.get("size") if default is SAME_AS_SIZE else default)
            if value is REQUIRED or value is None:
                raise KeyError(key)
            arguments[key] = float(value) if key in FRACTIONS else int(value)
        return cls(in_shape, **arguments)

    def forward(self, x, ctx: Context):
        raise NotImplementedError

    def backward(self, dout, saved, grads, ctx: Context):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def book_columns_bytes(self, n) -> int:
        """What the book's whole-batch im2col allocates for n images (float64)."""
        return 0


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

    settings = {"filters": REQUIRED, "size": REQUIRED, "stride": 1, "pad": 0}

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
        target = grads["W"].reshape(k, k, c, f)
        for t in range(g):
            if grads.overwrites("W"):
                np.copyto(target, total[:, t : t + k, :, t, :])
                grads.written("W")
            else:
                target += total[:, t : t + k, :, t, :]

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

    def describe(self):
        return "relu"


class MaxPooling(Layer):
    """Max over windows, taken over strided views: no column matrix at all.

    Training keeps the position of the maximum (0..size*size-1) as uint8; ties go to
    the first position, as the book's argmax does. Every array comes from the thread's
    Workspace: fresh ones were faulted in on every micro-batch (DeepConvNet's three
    poolings, forward and backward, 50 images, one thread: 6.25 -> 4.61 ms).
    """

    settings = {"size": REQUIRED, "stride": SAME_AS_SIZE}

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

    def book_columns_bytes(self, n) -> int:
        oh, ow, c = self.out_shape
        return n * oh * ow * c * self.size * self.size * 8

    def describe(self):
        return f"pool {self.size}x{self.size} stride {self.stride}"


class Affine(Layer):
    settings = {"units": REQUIRED}

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
        overwrites = not ctx.dry and grads.overwrites("W")
        if not overwrites:  # (a thread's first micro-batch of an update needs no slices)
            part = ctx.ws.array(self, "dW", (min(rows, self.inputs), self.units), dout.dtype)
        if ctx.dry:
            return x.reshape(dout.shape[0], *self.in_shape) if self.need_input_grad else None
        if overwrites:
            np.dot(x.T, dout, out=grads["W"])
            grads.written("W")
        else:
            for lo in range(0, self.inputs, rows):
                hi = min(lo + rows, self.inputs)
                grads["W"][lo:hi] += np.dot(x[:, lo:hi].T, dout, out=part[: hi - lo])
        grads.add("b", dout.sum(axis=0))
        if not self.need_input_grad:
            return None
        # Nothing reads the input after this (see the module's docstring), so the input
        # gradient takes its array (the layers before hand over contiguous outputs).
        grad = np.dot(dout, self.W.T, out=x if x.flags.c_contiguous else None)
        return grad.reshape(dout.shape[0], *self.in_shape)

    def describe(self):
        return f"affine {self.inputs}->{self.units}"


class Dropout(Layer):
    """The book's dropout: training keeps each value with probability 1 - ratio;
    inference scales by 1 - ratio instead, so the book's parameter files mean the same."""

    draws_noise = True

    settings = {"ratio": REQUIRED}

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

    numbered = False
    EPS = 1e-6  # the book's 10e-7

    settings = {"momentum": 0.9}

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
            return x, (xc, None, None, None)
        n = len(rows)
        mean = column_sums(rows, ones) / n
        np.subtract(rows, mean, out=xc)
        var = np.einsum("ij,ij->j", xc, xc) / n
        std = np.sqrt(var + self.EPS)
        np.multiply(xc, self.gamma / std, out=rows)  # the output takes the input's array
        rows += self.beta
        return rows.reshape(x.shape), (xc, std, mean, var)

    def backward(self, dout, saved, grads, ctx):
        xc, std, mean, var = saved
        ones = ctx.ws.array(self, "ones", (len(xc),), xc.dtype)
        if ctx.dry:
            return dout
        rows = dout.reshape(xc.shape)
        n = len(rows)
        # the statistics, weighted by the micro-batch's share of the mini-batch
        share = (len(dout) / ctx.batch_images) if ctx.batch_images else 1.0
        grads.add("running_mean", mean * share)
        grads.add("running_var", var * share)
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


# The layer types a config can name ([[network.layers]] type = ...).
LAYER_TYPES = {"conv": Convolution, "relu": ReLU, "pool": MaxPooling, "affine": Affine,
               "dropout": Dropout, "batchnorm": BatchNormalization}
# Layers that take a map (H, W, C), not a vector.
_MAP_LAYERS = (Convolution, MaxPooling)


def build_layer(spec: dict, in_shape, number: int = 1) -> Layer:
    """A layer from one [[network.layers]] table of a config (the `number`-th)."""
    kind = spec.get("type")
    name = f"layer {number} ({kind})"
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise LowmemError(f"{name}: unknown layer type ({', '.join(LAYER_TYPES)})")
    try:
        if issubclass(cls, _MAP_LAYERS) and len(in_shape) != 3:
            raise ValueError(f"needs a map, but its input is a vector of {in_shape[0]}")
        return cls.from_spec(spec, tuple(in_shape))
    except KeyError as err:
        raise LowmemError(f"{name}: missing {err.args[0]!r}") from None
    except ValueError as err:
        raise LowmemError(f"{name}: {err}") from None
