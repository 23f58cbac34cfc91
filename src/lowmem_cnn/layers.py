"""The layers of the book's networks, NHWC, each with forward and backward.

Shapes are per image: (H, W, C) for maps, (D,) for vectors. `forward(x, train)`
returns the output and what backward needs (None unless training; `train` is falsy
for inference, else True or a NumPy Generator, from which dropout draws its masks);
`backward(dout, saved, grads)` adds the parameter gradients into `grads` (a
Gradients) and returns the input gradient. Both may take their arrays from `ws`, the thread's Workspace: what
they return is then valid until the next micro-batch on that thread. A layer holds no
per-batch state, so several micro-batches can run through it at once on different
threads. Layers may work in place on the array
they are given (ReLU) and on the gradient they are handed back, and a layer's input
is not read after its backward (layers keep what they need, such as masks, apart), so
Affine writes its input gradient over its input.

`memory(m, itemsize, train)` states, for a micro-batch of m images, the bytes the
layer allocates, so that the planner can add them up (see planner.py).
"""

from dataclasses import dataclass

import numpy as np

from lowmem_cnn.columns import add_columns, column_tiles, windows
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


class Convolution:
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

    def _padded(self, x):
        if not self.pad:
            return x
        p = self.pad
        return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

    def forward(self, x, train, ws=None):
        x = self._padded(x)
        view = windows(x, self.size, self.stride)
        out = np.empty((x.shape[0] * self.rows_per_image, self.filters), x.dtype)
        for start, stop, columns in column_tiles(view, self.tile_rows):
            np.matmul(columns, self.W, out=out[start:stop])
        out += self.b
        return out.reshape(x.shape[0], *self.out_shape), (x if train else None)

    def backward(self, dout, x, grads, ws=None):
        dout = dout.reshape(-1, self.filters)
        # the column sums as a BLAS product: 3x faster than sum(axis=0) over many rows
        grads.add("b", np.ones(len(dout), dout.dtype) @ dout)
        grad = np.zeros_like(x) if self.need_input_grad else None
        grad_view = windows(grad, self.size, self.stride, writeable=True) if grad is not None else None
        for start, stop, columns in column_tiles(windows(x, self.size, self.stride), self.tile_rows):
            grads.add("W", columns.T @ dout[start:stop])
            if grad is not None:
                add_columns(grad_view, start, stop, dout[start:stop] @ self.W.T)
        if grad is None:
            return None
        p = self.pad
        return np.ascontiguousarray(grad[:, p:-p, p:-p, :]) if p else grad

    def memory(self, m, itemsize, train):
        h, w, c = self.in_shape
        padded = m * (h + 2 * self.pad) * (w + 2 * self.pad) * c * itemsize if self.pad else 0
        tile = min(self.tile_rows, m * self.rows_per_image) * self.width * itemsize
        return LayerMemory(
            out=m * _size(self.out_shape) * itemsize,
            # the padded copy is kept; without padding the input itself is kept (counted
            # as the previous layer's output)
            kept=padded if train else 0,
            forward_scratch=padded + tile,
            grad_in=(m * (h + 2 * self.pad) * (w + 2 * self.pad) * c * itemsize
                     if self.need_input_grad else 0),
            # the tile, its column gradients, a dW-sized product and the unpadded gradient
            backward_scratch=2 * tile + self.width * self.filters * itemsize
            + (m * h * w * c * itemsize if self.pad and self.need_input_grad else 0),
            keeps_input=not self.pad,
        )

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

    def forward(self, x, train, ws=None):
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
    the first position, as the book's argmax does.
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

    def forward(self, x, train, ws=None):
        views = self._views(x)
        out = np.maximum(views[0], views[1]) if len(views) > 1 else views[0].copy()
        for view in views[2:]:
            np.maximum(out, view, out=out)
        if train:
            # position of the first maximum = how many leading views miss it
            # (boolean arithmetic: masked writes are several times slower)
            argmax = np.zeros(out.shape, np.uint8)
            missed = np.ones(out.shape, bool)
            differs = np.empty(out.shape, bool)
            for view in views[:-1]:
                np.not_equal(view, out, out=differs)
                missed &= differs
                argmax += missed
            return out, (argmax, x.shape)
        return out, None

    def backward(self, dout, saved, grads, ws=None):
        argmax, in_shape = saved
        grad = np.zeros(in_shape, dout.dtype)
        chosen = np.empty(argmax.shape, bool)
        overlapping = self.stride < self.size
        for k, view in enumerate(self._views(grad)):
            np.equal(argmax, k, out=chosen)
            if overlapping:
                view += dout * chosen
            else:  # each input element is in one window at most
                np.multiply(dout, chosen, out=view)
        return grad

    def memory(self, m, itemsize, train):
        out = m * _size(self.out_shape)
        return LayerMemory(
            out=out * itemsize,
            kept=out if train else 0,
            forward_scratch=2 * out if train else 0,
            grad_in=m * _size(self.in_shape) * itemsize,
            backward_scratch=out + (out * itemsize if self.stride < self.size else 0),
        )

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

    def forward(self, x, train, ws=None):
        ws = _workspace(ws)
        x = x.reshape(x.shape[0], self.inputs)
        out = np.matmul(x, self.W, out=ws.array(self, "out", (len(x), self.units), x.dtype))
        out += self.b
        return out, (x if train else None)

    def backward(self, dout, x, grads, ws=None):
        ws = _workspace(ws)
        if grads.overwrites("W"):
            np.matmul(x.T, dout, out=grads["W"])
            grads.written("W")
        else:
            # x.T @ dout a slice of rows at a time: the product is added to the
            # gradient while in cache, and its buffer stays small
            rows = self._grad_rows(dout.dtype.itemsize)
            for lo in range(0, self.inputs, rows):
                part = ws.array(self, "dW", (min(rows, self.inputs - lo), self.units), dout.dtype)
                grads["W"][lo : lo + rows] += np.matmul(x[:, lo : lo + rows].T, dout, out=part)
        grads.add("b", dout.sum(axis=0))
        if not self.need_input_grad:
            return None
        # Nothing reads the input after this (see the module's docstring), so the input
        # gradient takes its array.
        grad = np.matmul(dout, self.W.T, out=x if x.flags.c_contiguous else
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

    def forward(self, x, train, ws=None):
        if not train:
            x *= 1.0 - self.ratio
            return x, None
        mask = train.random(x.shape) > self.ratio
        x *= mask
        return x, mask

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
