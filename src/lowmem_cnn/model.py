"""A network built from a config: its layers in order, its parameters, and micro-batches.

Parameters are named as in the book's files (W1, b1, W2, ...: the conv and affine
layers in order) and held in the layers' own layout; `book_params` and
`load_book_params` convert from and to the book's layout.

Micro-batches can run on several threads at once (`threads`): NumPy and BLAS release
the GIL, and each thread sums its gradients in its own buffers, which are added in
thread order at the end, so the result does not depend on timing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lowmem_cnn.config import NetworkConfig
from lowmem_cnn.conv_pool import ConvolutionPooling
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.executor import run_shared
from lowmem_cnn.layers import (Convolution, Gradients, MaxPooling, ReLU, build_layer,
                               softmax_cross_entropy)
from lowmem_cnn.workspace import Workspace

# A convolution with at most this many input channels is fused with the pooling after
# it (see conv_pool.py). With more channels im2col's columns are cheap to copy and the
# fused layer's extra multiply-adds cost more than it saves.
FUSE_MAX_CHANNELS = 4
# Weights are drawn this many at a time (float64: 512 KiB of temporaries).
INIT_CHUNK = 1 << 16


class Network:
    def __init__(self, config: NetworkConfig, dtype=np.float32, threads: int = 1):
        self.config = config
        self.threads = threads  # in use: a plan sets it, at most the threads built for
        # the calling thread is one of the threads (see _map)
        self.pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None
        self.workspaces = [Workspace() for _ in range(threads)]
        self._training = None  # what the workspaces are sized for
        self._grads = None
        self.dtype = np.dtype(dtype)
        c, h, w = config.input_shape
        self.input_shape = (h, w, c)
        self.input_size = c * h * w  # bytes of one uint8 image
        shape = self.input_shape
        layers = []
        for number, spec in enumerate(config.layers, start=1):
            layer = build_layer(spec, shape, number)
            layers.append(layer)
            shape = layer.out_shape
        if len(shape) != 1:
            raise LowmemError(f"{config.name}: the last layer must be affine (scores), not a map")
        self.classes = shape[0]
        self.layers = _fuse_conv_pool(_pool_before_relu(layers))
        self.param_layers = {}  # book index -> layer
        for layer in self.layers:
            if layer.param_shapes:
                self.param_layers[len(self.param_layers) + 1] = layer
        # The first layer's input gradient is never needed.
        first = self.layers[0]
        if hasattr(first, "need_input_grad"):
            first.need_input_grad = False

    # --- parameters -------------------------------------------------------------

    def param_names(self):
        for i, layer in self.param_layers.items():
            for name in layer.param_shapes:
                yield f"{name}{i}", layer, name

    def init_params(self, rng: np.random.Generator):
        init = self.config.weight_init
        for _, layer, name in self.param_names():
            shape = layer.param_shapes[name]
            value = np.zeros(shape, self.dtype)
            if name == "W":
                # He: std sqrt(2 / inputs of one output), as the book's DeepConvNet
                std = np.sqrt(2.0 / shape[0]) if init == "he" else init
                # drawn in float64 a chunk at a time, so that the temporaries stay small
                # (the draws are the same as one whole-array draw's)
                flat = value.reshape(-1)
                for lo in range(0, flat.size, INIT_CHUNK):
                    part = rng.standard_normal(min(INIT_CHUNK, flat.size - lo))
                    part *= std
                    flat[lo : lo + len(part)] = part
            setattr(layer, name, value)
        self._grads = None

    def thread_grads(self) -> list:
        """One set of gradient arrays per thread in use (name -> array), made on first
        use (evaluation needs none). Their sum is the gradient; see also `grads`."""
        return [flat for flat, _ in self._gradient_sets()[: self.threads]]

    def _gradient_sets(self) -> list:
        """Per thread: (name -> array, the same arrays as one Gradients per layer).

        One set for every thread built, whatever the plan uses now: a later plan may use
        more, and the baseline (measure_baseline's warm-up) holds them all."""
        if self._grads is None:
            self._grads = []
            for _ in self.workspaces:
                flat = {key: np.zeros_like(getattr(layer, name))
                        for key, layer, name in self.param_names()}
                per_layer = {id(layer): Gradients() for layer in self.layers}
                for key, layer, name in self.param_names():
                    per_layer[id(layer)][name] = flat[key]
                self._grads.append((flat, [per_layer[id(layer)] for layer in self.layers]))
        return self._grads

    def params(self) -> dict:
        """Name -> the array the layer uses (updated in place by the optimizer)."""
        return {key: getattr(layer, name) for key, layer, name in self.param_names()}

    def grads(self) -> dict:
        """The gradient: the other threads' sets added into the first's, and zeroed."""
        first, *others = self.thread_grads()
        for grads in others:
            for key, grad in first.items():
                grad += grads[key]
                grads[key].fill(0)
        return first

    def expected_book_shapes(self) -> dict:
        return {key: layer.book_shape(name) for key, layer, name in self.param_names()}

    def load_book_params(self, params: dict):
        """Take checked arrays in the book's layout (see params.check_params)."""
        for key, layer, name in self.param_names():
            array = np.asarray(params[key], dtype=self.dtype)
            setattr(layer, name, np.ascontiguousarray(layer.from_book(name, array)))
        self._grads = None

    def book_params(self) -> dict:
        return {key: np.ascontiguousarray(layer.to_book(name, getattr(layer, name)))
                for key, layer, name in self.param_names()}

    def param_bytes(self) -> int:
        return sum(int(np.prod(layer.param_shapes[name])) for _, layer, name in self.param_names()
                   ) * self.dtype.itemsize

    # --- running ----------------------------------------------------------------

    def to_input(self, images: np.ndarray, ws: Workspace | None = None,
                 pixels: bool = True) -> np.ndarray:
        """m images, as rows (m, C*H*W) or NCHW (m, C, H, W), -> NHWC floats.

        pixels=True: the values are pixels 0..255 (the data's uint8 rows), made [0, 1]
        as the book does: float32 / 255. pixels=False: the values are the network's
        input as they are (the book's classes take floats that way, and uint8 too).
        """
        c = self.config.input_shape[0]
        h, w, _ = self.input_shape
        shape = (len(images), h, w, c)
        x = np.empty(shape, self.dtype) if ws is None else ws.array(self, "input", shape, self.dtype)
        nhwc = images.reshape(len(images), c, h, w).transpose(0, 2, 3, 1)
        if pixels:
            np.divide(nhwc, np.float32(255), out=x, dtype=np.float32)
        else:
            np.copyto(x, nhwc, casting="unsafe")  # the caller checked the dtype is real numbers
        return x

    def scores(self, x: np.ndarray, ws: Workspace | None = None,
               dropout_rng: np.random.Generator | None = None) -> np.ndarray:
        """The last layer's output; from `ws` if given, so valid until its next use.
        `dropout_rng`: run dropout as in training, its masks drawn from it."""
        ws = Workspace() if ws is None else ws
        for layer in self.layers:
            x, _ = layer.forward(x, False, ws, dropout_rng)
        return x

    def _gradient(self, images, labels, total, layer_grads, dropout_rng, ws, pixels=True) -> float:
        """Forward and backward of one micro-batch, adding into `layer_grads` (one
        Gradients per layer); its summed loss. `dropout_rng`: the Generator dropout
        draws its masks from (None for a network without dropout)."""
        x = self.to_input(images, ws, pixels)
        saved = []
        for layer in self.layers:
            x, keep = layer.forward(x, True, ws, dropout_rng)
            saved.append(keep)
        loss, grad = softmax_cross_entropy(x, labels, total)
        for layer, grads in zip(reversed(self.layers), reversed(layer_grads), strict=True):
            # popped, so that what a layer kept is freed once its backward is done, as
            # the planner counts (kept to the end, it was 27% over DeepConvNet's plan)
            grad = layer.backward(grad, saved.pop(), grads, ws)
        return loss

    def held_bytes(self) -> int:
        """Bytes of what release_memory gives back: the workspaces' arrays and the
        gradient sets (so that a caller can tell its own memory from the network's)."""
        held = sum(array.nbytes for ws in self.workspaces for array in ws._arrays.values())
        if self._grads is not None:
            held += sum(grad.nbytes for flat, _ in self._grads for grad in flat.values())
        return held

    def release_memory(self):
        """Give back the workspaces and gradient arrays (the run is over)."""
        self._use_workspaces(None)
        self._grads = None

    def _use_workspaces(self, training: bool | None):
        """Training and evaluation size their arrays differently; the planner counts
        the larger set, not both, so empty the workspaces when switching."""
        if self._training != training:
            for ws in self.workspaces:
                ws.clear()
            self._training = training

    def _map(self, work, parts):
        """work(part, thread index) for each part, on the network's threads."""
        return run_shared(self.pool, self.threads, work, parts)

    def predict(self, images: np.ndarray, micro_batch: int, pixels: bool = True) -> np.ndarray:
        """Predicted labels of images (see to_input for `pixels`), `micro_batch` images
        through the network at once on each thread."""
        starts = list(range(0, len(images), micro_batch))
        self._use_workspaces(False)

        def work(start, t):
            ws = self.workspaces[t]
            return self.scores(self.to_input(images[start : start + micro_batch], ws, pixels), ws
                               ).argmax(axis=1)

        parts = self._map(work, starts)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def predict_scores(self, images: np.ndarray, micro_batch: int, pixels: bool = True,
                       out: np.ndarray | None = None, noise_key=None) -> np.ndarray:
        """The last layer's output for every image, written into `out` (n, classes) in
        micro-batches. With `noise_key`, dropout runs as in training, its masks drawn as
        accumulate_gradient's (and the arrays are those of training)."""
        n = len(images)
        out = np.empty((n, self.classes), self.dtype) if out is None else out
        starts = list(range(0, n, micro_batch))
        self._use_workspaces(noise_key is not None)

        def work(start, t):
            ws = self.workspaces[t]
            noise = None if noise_key is None else np.random.default_rng([*noise_key, start])
            x = self.to_input(images[start : start + micro_batch], ws, pixels)
            out[start : start + len(x)] = self.scores(x, ws, noise)

        self._map(work, starts)
        return out

    def accumulate_gradient(self, images, labels, micro_batch: int, noise_key=(0,),
                            pixels: bool = True) -> float:
        """Set the threads' gradient sets so that their sum is d(mean loss)/d(params) of
        this mini-batch; return the mean loss.

        The mini-batch runs as micro-batches, dealt to the threads in turn; each thread
        writes its first micro-batch's gradient over its set and adds the others, so
        the result is the whole mini-batch's gradient, whatever the micro-batch size.
        Dropout masks come from a Generator seeded by `noise_key` and the micro-batch's
        position, so they do not depend on which thread runs it, nor on a run being
        resumed.
        """
        total = len(images)
        starts = list(range(0, total, micro_batch))
        sets = self._gradient_sets()
        uses_noise = any(layer.kind == "dropout" for layer in self.layers)
        self._use_workspaces(True)

        def work(start, t):
            if start == starts[t]:  # the thread's first micro-batch
                for grads in sets[t][1]:
                    grads.restart()
            noise = np.random.default_rng([*noise_key, start]) if uses_noise else None
            return self._gradient(images[start : start + micro_batch],
                                  labels[start : start + micro_batch], total, sets[t][1], noise,
                                  self.workspaces[t], pixels)

        losses = self._map(work, starts)
        for flat, _ in sets[len(starts) : self.threads]:  # threads that had no micro-batch
            for grad in flat.values():
                grad.fill(0)
        return float(sum(losses)) / total


def _pool_before_relu(layers):
    """ReLU then max-pooling equals max-pooling then ReLU (max commutes with a
    monotone function), and the gradient is the same; the ReLU then touches a
    quarter of the values. Swap every such pair."""
    layers = list(layers)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], ReLU) and isinstance(layers[i + 1], MaxPooling):
            pool = layers[i + 1]
            layers[i], layers[i + 1] = pool, ReLU(pool.out_shape)
    return layers


def _fuse_conv_pool(layers):
    """Replace each convolution with few input channels that is followed by a
    non-overlapping pooling by one ConvolutionPooling layer."""
    fused = []
    for layer in layers:
        previous = fused[-1] if fused else None
        if (isinstance(layer, MaxPooling) and isinstance(previous, Convolution)
                and layer.stride == layer.size and previous.stride == 1
                and previous.in_shape[2] <= FUSE_MAX_CHANNELS):
            fused[-1] = ConvolutionPooling(previous, layer)
        else:
            fused.append(layer)
    return fused
