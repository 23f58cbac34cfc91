"""A network built from a config: its layers in order, its parameters, and micro-batches.

Parameters are named as in the book's files (W1, b1, W2, ...: the conv and affine
layers in order) and held in the layers' own layout; `book_params` and
`load_book_params` convert from and to the book's layout.

Micro-batches can run on several threads at once (`threads`): NumPy and BLAS release
the GIL, and each thread sums its gradients in its own buffers, which are added in
thread order at the end, so the result does not depend on timing.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.executor import run_shared
from lowmem_cnn.engine.layer_types import LAYER_TYPES
from lowmem_cnn.engine.layers import Gradients, Statistics, build_layer, softmax_cross_entropy
from lowmem_cnn.engine.network_config import NetworkConfig
from lowmem_cnn.engine.workspace import Context, Recording, Workspace


class Network:
    """`threads`: the threads built (a workspace and a gradient set each); a plan may
    use fewer (see planner.Plan)."""

    def __init__(self, config: NetworkConfig, dtype=np.float32, threads: int = 1):
        self.config = config
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
            layer = build_layer(spec, shape, LAYER_TYPES, number)
            layers.append(layer)
            shape = layer.out_shape
        if len(shape) != 1:
            raise LowmemError(f"{config.name}: the last layer must be affine (scores), not a map")
        self.classes = shape[0]
        self.layers = _fused(_max_before_monotone(layers))
        # the layers that work in tiles, in order: a plan has a tile size for each (in
        # the layer's tile_unit)
        self.tiled = [layer for layer in self.layers if layer.tile_unit]
        # The first layer's input gradient is never needed.
        self.layers[0].need_input_grad = False
        self.draws_noise = any(layer.draws_noise for layer in self.layers)

    @property
    def max_threads(self) -> int:
        return len(self.workspaces)

    # --- parameters -------------------------------------------------------------

    def _numbered(self):
        """(number, layer) of the layers with parameters or statistics, numbered as the
        book's files: a layer that is not `numbered` takes the number before it."""
        count = 0
        for layer in self.layers:
            if layer.param_shapes or layer.state_shapes:
                count += layer.numbered
                yield max(count, 1), layer

    def param_names(self):
        """(key, layer, name) of each trained parameter: W1, b1, ..."""
        for i, layer in self._numbered():
            for name in layer.param_shapes:
                yield f"{name}{i}", layer, name

    def state_names(self):
        """(key, layer, name) of each value kept with the parameters but not trained
        (running_mean2, ...)."""
        for i, layer in self._numbered():
            for name in layer.state_shapes:
                yield f"{name}{i}", layer, name

    def _all_names(self):
        yield from self.param_names()
        yield from self.state_names()

    def init_params(self, rng: np.random.Generator):
        for _, layer, name in self._all_names():
            setattr(layer, name, layer.initial(name, rng, self.config.weight_init, self.dtype))
        self._grads = None

    def thread_grads(self, plan) -> list:
        """One set of gradient arrays per thread the plan uses (key -> array), made on
        first use (evaluation needs none). Their sum is the gradient; see also `grads`."""
        return [sums.grads for sums in self._gradient_sets()[: plan.threads]]

    def _gradient_sets(self) -> list[ThreadSums]:
        """Per thread, what its micro-batches add into (see ThreadSums).

        One set for every thread built, whatever the plan uses now: a later plan may use
        more, and the baseline (measure_baseline's warm-up) holds them all."""
        if self._grads is None:
            self._grads = [ThreadSums.of(self) for _ in self.workspaces]
        return self._grads

    def params(self) -> dict:
        """Key -> the array the layer uses (updated in place by the optimizer)."""
        return {key: getattr(layer, name) for key, layer, name in self.param_names()}

    def state(self) -> dict:
        """Key -> the layers' kept statistics (saved with the parameters, not trained)."""
        return {key: getattr(layer, name) for key, layer, name in self.state_names()}

    def grads(self, plan) -> dict:
        """The gradient: the other threads' sets added into the first's, and zeroed."""
        first, *others = self.thread_grads(plan)
        for grads in others:
            for key, grad in first.items():
                grad += grads[key]
                grads[key].fill(0)
        return first

    def expected_book_shapes(self) -> dict:
        return {key: layer.book_shape(name) for key, layer, name in self._all_names()}

    def load_book_params(self, params: dict):
        """Take checked arrays in the book's layout (see params.check_params)."""
        for key, layer, name in self._all_names():
            setattr(layer, name, layer.from_book(name, params[key], self.dtype))
        self._grads = None

    def book_params(self) -> dict:
        return {key: layer.to_book(name, getattr(layer, name)) for key, layer, name in self._all_names()}

    def param_bytes(self) -> int:
        """Bytes of the parameters and the kept statistics."""
        return sum(math.prod(layer.shape_of(name)) for _, layer, name in self._all_names()
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
        if ws is not None and ws.dry:
            return x
        nhwc = images.reshape(len(images), c, h, w).transpose(0, 2, 3, 1)
        if pixels:
            np.divide(nhwc, np.float32(255), out=x, dtype=np.float32)
        else:
            np.copyto(x, nhwc, casting="unsafe")  # the caller checked the dtype is real numbers
        return x

    def tile_map(self, tiles) -> dict:
        """id(layer) -> its tile, from a plan's tiles (one per tiled layer, in order)."""
        return dict(zip(map(id, self.tiled), tiles, strict=True))

    def scores(self, x: np.ndarray, ctx: Context | None = None) -> np.ndarray:
        """The last layer's output; from ctx's workspace if given, so valid until its next
        use (without ctx: forward only, whole, in fresh arrays)."""
        ctx = Context() if ctx is None else ctx
        for layer in self.layers:
            x, _ = layer.forward(x, ctx)
        return x

    def _gradient(self, images, labels, ctx: Context, layer_grads, pixels=True) -> float:
        """Forward and backward of one micro-batch, adding into `layer_grads` (one
        Gradients per layer); its summed loss."""
        x = self.to_input(images, ctx.ws, pixels)
        saved = []
        for layer in self.layers:
            x, keep = layer.forward(x, ctx)
            saved.append(keep)
        loss, grad = (0.0, x) if ctx.dry else softmax_cross_entropy(x, labels, ctx.batch_images)
        for layer, grads in zip(reversed(self.layers), reversed(layer_grads), strict=True):
            # popped, so that what a layer kept is freed once its backward is done
            grad = layer.backward(grad, saved.pop(), grads, ctx)
        return loss

    def micro_batch_bytes(self, m: int, train: bool, tiles: tuple) -> int:
        """What a thread's workspace holds once it has run a micro-batch of m images
        (forward only, or forward and backward) with `tiles` (one per tiled layer): the
        same calls as a real pass, against a Recording workspace."""
        ws = Recording()
        ctx = Context(ws, train, self.tile_map(tiles), None, m)
        images = np.broadcast_to(np.zeros((), np.uint8), (m, self.input_size))
        if train:
            self._gradient(images, None, ctx, [None] * len(self.layers))
        else:
            self.scores(self.to_input(images, ws), ctx)
        return ws.held_bytes()

    def layer_recordings(self, m: int, train: bool, tiles: tuple) -> list[Recording]:
        """Per layer, what it asks of a workspace for a micro-batch of m images (forward
        only, or forward and backward) with `tiles`, run alone: its own figures, the
        arrays it shares with other layers included."""
        recordings = []
        tile_map = self.tile_map(tiles)
        for layer in self.layers:
            ctx = Context(Recording(), train, tile_map, None, m)
            x = np.broadcast_to(np.zeros((), self.dtype), (m, *layer.in_shape))
            out, saved = layer.forward(x, ctx)
            if train:
                layer.backward(out, saved, None, ctx)
            recordings.append(ctx.ws)
        return recordings

    def held_bytes(self) -> int:
        """Bytes of what release_memory gives back: the workspaces' arrays and the
        gradient sets (so that a caller can tell its own memory from the network's)."""
        held = sum(ws.held_bytes() for ws in self.workspaces)
        if self._grads is not None:
            held += sum(sums.nbytes() for sums in self._grads)
        return held

    def release_memory(self):
        """Give back the workspaces and gradient arrays (the run is over)."""
        for ws in self.workspaces:
            ws.clear()
        self._training = None
        self._grads = None

    def _use_workspaces(self, plan, training: bool):
        """Training and evaluation size their arrays differently; the planner counts
        the larger set, not both, so empty the workspaces when switching. The threads the
        plan leaves idle give theirs back: it counts only its own threads'."""
        if self._training != training:
            for ws in self.workspaces:
                ws.clear()
            self._training = training
        for ws in self.workspaces[plan.threads :]:
            ws.clear()

    def _map(self, plan, work, parts):
        """work(part, thread index) for each part, on the plan's threads."""
        return run_shared(self.pool, plan.threads, work, parts)

    def predict(self, images: np.ndarray, plan, pixels: bool = True) -> np.ndarray:
        """Predicted labels of images (see to_input for `pixels`), run as `plan` says:
        plan.eval_micro_batch images through the network at once on each thread."""
        micro_batch = plan.eval_micro_batch
        starts = list(range(0, len(images), micro_batch))
        self._use_workspaces(plan, False)
        tiles = self.tile_map(plan.tiles)

        def work(start, t):
            ctx = Context(self.workspaces[t], False, tiles)
            x = self.to_input(images[start : start + micro_batch], ctx.ws, pixels)
            return self.scores(x, ctx).argmax(axis=1)

        parts = self._map(plan, work, starts)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def predict_scores(self, images: np.ndarray, plan, pixels: bool = True,
                       out: np.ndarray | None = None, noise_key=None) -> np.ndarray:
        """The last layer's output for every image, written into `out` (n, classes), run
        as `plan` says. With `noise_key`, dropout runs as in training, its masks drawn as
        accumulate_gradient's (and the arrays and micro-batches are those of training)."""
        n = len(images)
        out = np.empty((n, self.classes), self.dtype) if out is None else out
        noisy = noise_key is not None
        micro_batch = plan.micro_batch if noisy else plan.eval_micro_batch
        starts = list(range(0, n, micro_batch))
        self._use_workspaces(plan, noisy)
        tiles = self.tile_map(plan.tiles)

        def work(start, t):
            noise = np.random.default_rng([*noise_key, start]) if noisy else None
            ctx = Context(self.workspaces[t], False, tiles, noise)
            x = self.to_input(images[start : start + micro_batch], ctx.ws, pixels)
            out[start : start + len(x)] = self.scores(x, ctx)

        self._map(plan, work, starts)
        return out

    def accumulate_gradient(self, images, labels, plan, noise_key=(0,),
                            pixels: bool = True) -> float:
        """Set the plan's threads' gradient sets so that their sum is d(mean loss)/d(params)
        of this mini-batch, move the kept statistics (batch normalization's) by it;
        return the mean loss.

        The mini-batch runs as micro-batches of plan.micro_batch images, dealt to the
        threads in turn; each thread writes its first micro-batch's gradient over its
        set and adds the others, so the result is the whole mini-batch's gradient,
        whatever the micro-batch size. Dropout masks come from a Generator seeded by
        `noise_key` and the micro-batch's position, so they do not depend on which
        thread runs it, nor on a run being resumed.
        """
        total = len(images)
        micro_batch = plan.micro_batch
        starts = list(range(0, total, micro_batch))
        sets = self._gradient_sets()
        self._use_workspaces(plan, True)
        tiles = self.tile_map(plan.tiles)

        def work(start, t):
            if start == starts[t]:  # the thread's first micro-batch
                sets[t].restart()
            noise = np.random.default_rng([*noise_key, start]) if self.draws_noise else None
            ctx = Context(self.workspaces[t], True, tiles, noise, total, sets[t].statistics)
            return self._gradient(images[start : start + micro_batch],
                                  labels[start : start + micro_batch], ctx, sets[t].layer_grads, pixels)

        losses = self._map(plan, work, starts)
        for sums in sets[len(starts) : plan.threads]:  # threads that had no micro-batch
            sums.zero()
        self._update_statistics(sets[: plan.threads])
        return float(sum(losses)) / total

    def _update_statistics(self, sets):
        """The layers that keep statistics move them by this mini-batch's, which the
        threads' sets hold (added in thread order: the result does not depend on timing)."""
        for layer in self.layers:
            if layer.state_shapes:
                statistics = {name: sum(sums.statistics[id(layer)].value(name) for sums in sets)
                              for name in layer.state_shapes}
                layer.update_state(statistics)


@dataclass
class ThreadSums:
    """What one thread's micro-batches add into: the gradients (key -> array, and the
    same arrays as one layers.Gradients per layer) and, apart, the batch statistics of
    the layers that keep them (id(layer) -> layers.Statistics, under their state names)."""

    grads: dict
    layer_grads: list
    statistics: dict
    statistic_arrays: list

    @classmethod
    def of(cls, network: Network) -> ThreadSums:
        grads = {key: np.zeros_like(getattr(layer, name)) for key, layer, name in network.param_names()}
        layer_grads = [Gradients({name: grads[key] for key, owner, name in network.param_names()
                                  if owner is layer}) for layer in network.layers]
        arrays, statistics = [], {}
        for layer in network.layers:
            if layer.state_shapes:
                named = {name: np.zeros_like(getattr(layer, name)) for name in layer.state_shapes}
                arrays += named.values()
                statistics[id(layer)] = Statistics(named)
        return cls(grads, layer_grads, statistics, arrays)

    def restart(self):
        for sums in (*self.layer_grads, *self.statistics.values()):
            sums.restart()

    def zero(self):
        for array in (*self.grads.values(), *self.statistic_arrays):
            array.fill(0)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.grads.values(), *self.statistic_arrays))


def _max_before_monotone(layers):
    """A monotone layer (ReLU) then a max over windows equals the max then the
    monotone layer (max commutes with a nondecreasing function), and the gradient is the
    same; the monotone layer then touches a quarter of the values. Swap every such pair."""
    layers = list(layers)
    for i in range(len(layers) - 1):
        if layers[i].monotone and layers[i + 1].takes_max:
            pool = layers[i + 1]
            layers[i], layers[i + 1] = pool, type(layers[i])(pool.out_shape)
    return layers


def _fused(layers):
    """Each pair of layers that one layer computes together (see Layer.fused_with),
    replaced by it."""
    fused = []
    for layer in layers:
        together = fused[-1].fused_with(layer) if fused else None
        if together is not None:
            fused[-1] = together
        else:
            fused.append(layer)
    return fused
