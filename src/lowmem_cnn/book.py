"""The book's interfaces on lowmem-cnn's engine: `load_mnist`, `SimpleConvNet` and
`DeepConvNet` of "Deep Learning from Scratch" (Saitoh), so that a script written for
the book needs only its import line changed:

    from lowmem_cnn.book import load_mnist, SimpleConvNet, DeepConvNet

The classes take the book's arguments, draw their weights from NumPy's global RNG as
the book does (so np.random.seed gives the book's initial weights), and have its
methods: params, predict, loss, accuracy, gradient, save_params and load_params, and
SimpleConvNet has the book's numerical_gradient too. They run on the engine (`Network`): images go through in
micro-batches planned against a RAM budget (`max_ram`, the CLI's sizes), so predicting
on 60,000 images in one call allocates the 60,000 x 10 scores and little else.

`params` is the source of truth: a plain dict of arrays in the book's shapes and
layout (float64, as the book's). Before each computation it is copied into the
engine's arrays (their own layout and dtype, see layers.py); so changing an array in
place, or putting a new array in the dict, changes the network, as code written for
the book expects.

Where the book's code has a quirk, these follow its intent:
  - accuracy counts every image (the book's leaves out a last partial batch, and
    gives 0 for fewer images than batch_size);
  - labels of shape (N, 1) are the labels (the book's is right only for N = 1);
  - the weights of SimpleConvNet's first affine layer have as many rows as the pooled
    map has values (the book's formula is wrong for an odd convolution output).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowmem_cnn.memory.budget import check_threads, current_rss, map_large_arrays, resolve_budget
from lowmem_cnn.engine.network_config import NetworkConfig
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.layers import softmax
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import BudgetError, Work, check_book_parameters_fit

__all__ = ["load_mnist", "SimpleConvNet", "DeepConvNet", "Trainer"]

# The book's one-hot labels are 10 wide.
MNIST_CLASSES = 10
# load_mnist converts this many images at a time (3.1 MiB of uint8 for MNIST).
READ_IMAGES = 4000
# loss and accuracy go through this many images at a time; only their scores and
# labels are held, whatever the number of images.
CHUNK_IMAGES = 1000
# The user's new arrays are found by the process's resident memory growing: by more
# than this since the plan was made, and the plan is made again.
REPLAN_GROWTH = 1 << 20
# The book's numerical gradient: central differences with this step.
NUMERICAL_STEP = 1e-4
# How the book's classes name the budget in a refusal (planner.BudgetError).
BUDGET_OPTION = "max_ram="


# --- data -----------------------------------------------------------------------


def load_mnist(normalize=True, flatten=True, one_hot_label=False):
    """((x_train, t_train), (x_test, t_test)) as the book's dataset.mnist.load_mnist.

    Images: (N, 784), or (N, 1, 28, 28) with flatten=False; float32 pixel / 255 with
    normalize=True, else uint8. Labels: uint8 (N,), or float64 one-hot (N, 10).
    The files are found (and MNIST downloaded and verified) as the CLI does:
    $LOWMEM_CNN_DATA, else the user cache.
    """
    from lowmem_cnn.data.idx import open_data

    data = open_data()
    result = []
    for split in (data.train, data.test):
        images = _read_images(split.images, normalize)
        if not flatten:
            images = images.reshape(-1, 1, split.images.rows, split.images.cols)
        labels = split.labels
        if one_hot_label:
            labels = np.zeros((len(split.labels), MNIST_CLASSES))
            labels[np.arange(len(split.labels)), split.labels] = 1
        result.append((images, labels))
        split.images.close()  # the data is read; free its file
    return tuple(result)


def _read_images(image_file, normalize: bool) -> np.ndarray:
    n = len(image_file)
    if not normalize:
        return image_file.read_range(0, n)
    # the float32 result is filled a few thousand images at a time: no whole-set
    # temporary (the book's astype + /= made the float array from a uint8 one)
    images = np.empty((n, image_file.row_bytes), np.float32)
    for lo in range(0, n, READ_IMAGES):
        hi = min(lo + READ_IMAGES, n)
        # the same float32 division as the book's (and the engine's, Network.to_input)
        np.divide(image_file.read_range(lo, hi), np.float32(255), out=images[lo:hi],
                  dtype=np.float32)
    return images


# --- the engine's side ------------------------------------------------------------


def engine_views(network: Network, arrays: dict) -> dict:
    """key -> a view of arrays[key] (in the engine's layout, like network.params() or a
    gradient set) with the book's axes (Layer.book_view): writing into the view writes
    the engine's array; np.reshape of the book's array fits it."""
    return {key: layer.book_view(name, arrays[key]) for key, layer, name in network.param_names()}


class Engine:
    """A Network, its budget, and memory plans for the computations asked of it.

    The plans start from one state of rest, measured once: the process with the
    network's parameters and gradient sets (so a forward-only plan and a training plan
    may follow one another with nothing released), and the caller's arrays. A plan is
    made for each kind of computation (forward only or with backward, the number of
    images, the bytes the caller allocates besides the network's) and kept. All are
    dropped, and the state of rest measured again, when the process holds more than
    the network's arrays explain: the caller's new arrays (the training set loaded
    after the network was made) belong in the baseline.
    """

    def __init__(self, network: Network, budget: int):
        self.network, self.budget = network, budget
        self.plan = None
        self.reset()

    def reset(self):
        """Forget the plans and give back the network's arrays, e.g. after something
        else (a trainer) has run the network with plans of its own."""
        self.network.release_memory()
        self._plans = {}
        self._baseline = None
        self._others = 0  # resident bytes besides the network's workspaces and gradients

    def _others_now(self) -> int:
        return current_rss() - self.network.held_bytes()

    def use_plan(self, work: Work):
        """The plan of `work` (made now, or the one made before for the same work)."""
        from lowmem_cnn.memory.planner import measure_baseline, plan_work

        if self._baseline is not None and self._others_now() > self._others + REPLAN_GROWTH:
            self.reset()
        if self._baseline is None:
            # gradient sets for every thread: training and forward-only plans alike count them
            self._baseline = measure_baseline(self.network, True)
            self._others = self._baseline - self.network.held_bytes()
        plan = self._plans.get(work)
        if plan is None:
            try:
                plan = plan_work(self.network, work, self.budget, self._baseline)
            except BudgetError as err:
                raise err.worded(BUDGET_OPTION) from None
            if len(self._plans) >= 8:  # callers alternate between a few kinds
                self._plans.clear()
            self._plans[work] = plan
        self.plan = plan
        return plan


def check_images(network: Network, x) -> np.ndarray:
    """x as the book's networks take it: (N, C, H, W) or (N, C*H*W), real numbers.
    Only a list or the like is made an array; an array is used as it is (a memory
    map stays one: its pages are counted, see _outside)."""
    if not isinstance(x, np.memmap):
        x = np.asarray(x)
    c, h, w = network.config.input_shape
    if not ((x.ndim == 4 and x.shape[1:] == (c, h, w)) or (x.ndim == 2 and x.shape[1] == c * h * w)):
        raise ValueError(f"x has shape {x.shape}: {network.config.name} takes images of shape "
                         f"(N, {c}, {h}, {w}) or (N, {c * h * w})")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x has dtype {x.dtype}: {network.config.name} takes real numbers "
                         "(floats, or integers such as uint8 pixels)")
    return x


def check_labels(network: Network, t, n: int) -> np.ndarray:
    """t as the book takes it, checked: labels (N,) or (N, 1), or one-hot rows (N, classes)
    (taken as their argmax, as the book's loss does). Returns (N,) labels, or the
    (N, classes) rows; see label_slice."""
    t = np.asarray(t)
    classes = network.classes
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if not ((t.ndim == 1) or (t.ndim == 2 and t.shape[1] == classes)):
        raise ValueError(f"t has shape {t.shape}: give labels (N,) or (N, 1), or one-hot rows "
                         f"(N, {classes})")
    if len(t) != n:
        raise ValueError(f"t has {len(t)} labels for {n} images")
    if t.ndim == 1 and t.dtype.kind not in "iu":
        raise ValueError(f"t has dtype {t.dtype}: labels are whole numbers 0..{classes - 1}")
    if t.ndim == 2 and t.dtype.kind not in "biuf":
        raise ValueError(f"t has dtype {t.dtype}: one-hot rows hold numbers")
    return t


def label_slice(network: Network, t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Labels lo..hi of what check_labels returned, checked to be classes."""
    part = t[lo:hi]
    if part.ndim == 2:
        part = part.argmax(axis=1)
    if len(part) and (part.min() < 0 or part.max() >= network.classes):
        raise ValueError(f"t holds label {part.min() if part.min() < 0 else part.max()}: "
                         f"labels are 0..{network.classes - 1}")
    return part


def _cross_entropy_sum(scores: np.ndarray, labels: np.ndarray) -> float:
    """The book's softmax cross-entropy, summed: -log(p[label] + 1e-7), in float64."""
    p = softmax(scores.astype(np.float64))[np.arange(len(labels)), labels]
    return float(-np.log(p + 1e-7).sum())


# --- the book's networks ------------------------------------------------------------


class _BookNetwork:
    """What SimpleConvNet and DeepConvNet share; see the module's docstring."""

    def __init__(self, config: NetworkConfig, init_scales, max_ram, dtype, threads):
        from lowmem_cnn import default_threads

        map_large_arrays()  # freed arrays go back to the OS: RSS is what the plan counts
        threads = default_threads() if threads is None else check_threads(threads, "threads=")
        self.budget = resolve_budget(max_ram, threads)
        self.network = Network(config, np.dtype(dtype), threads)
        try:  # before any of them exists
            check_book_parameters_fit(self.network, self.budget)
        except BudgetError as err:
            raise err.worded(BUDGET_OPTION) from None
        self.params = {}
        scales = iter(init_scales)
        for key, shape in self.network.expected_book_shapes().items():
            if key.startswith("W"):
                # the book's draw, in its order: scale * randn from the global RNG
                value = np.random.randn(*shape)
                value *= next(scales)
            else:
                value = np.zeros(shape)
            self.params[key] = value
        self.network.load_book_params(self.params)
        self.engine = Engine(self.network, self.budget)
        self.engine.use_plan(Work("predict", 1))  # a budget too small is refused now

    # --- parameters -----------------------------------------------------------------

    def sync_to_engine(self):
        """Copy `params` (the book's layout, any float dtype) into the engine's arrays.
        Done before every computation; a trainer that runs the engine itself calls it
        before it starts."""
        views = engine_views(self.network, self.network.params())
        for key, view in views.items():
            np.copyto(view, np.reshape(self._param(key), view.shape), casting="unsafe")

    def sync_from_engine(self):
        """Copy the engine's parameters into the arrays of `params`, in place and in their
        dtype (after the engine has changed them, e.g. trained them)."""
        expected = self.network.expected_book_shapes()
        for key, view in engine_views(self.network, self.network.params()).items():
            target = self.params.get(key)
            if (isinstance(target, np.ndarray) and target.shape == tuple(expected[key])
                    and target.dtype.kind == "f" and target.flags.writeable):
                np.copyto(target, np.reshape(np.ascontiguousarray(view), target.shape))
            else:
                self.params[key] = np.reshape(view.astype(np.float64), expected[key])

    def _param(self, key) -> np.ndarray:
        shape = tuple(self.network.expected_book_shapes()[key])
        if key not in self.params:
            raise ValueError(f"params has no {key!r} ({self.network.config.name} needs "
                             f"{', '.join(self.network.expected_book_shapes())})")
        value = np.asarray(self.params[key])
        if value.shape != shape:
            raise ValueError(f"params[{key!r}] has shape {value.shape}, "
                             f"{self.network.config.name} needs {shape}")
        if value.dtype.kind not in "biuf":
            raise ValueError(f"params[{key!r}] has dtype {value.dtype}, not numbers")
        return value

    def _book_grads(self, engine_grads: dict) -> dict:
        """New float64 arrays in the book's shapes, from arrays in the engine's layout."""
        expected = self.network.expected_book_shapes()
        grads = {}
        for key, view in engine_views(self.network, engine_grads).items():
            grads[key] = np.empty(expected[key])
            np.copyto(grads[key].reshape(view.shape), view)
        return grads

    # --- computing --------------------------------------------------------------------

    def _noise_key(self, train: bool):
        """Dropout masks in training mode come from the engine's Generators, seeded from
        NumPy's global RNG, so that np.random.seed makes them repeat."""
        if train and self.network.draws_noise:
            return tuple(int(v) for v in np.random.randint(0, 2**31 - 1, size=2))
        return None

    @staticmethod
    def _outside(x) -> int:
        """Bytes of x that may not be resident yet: a memory-mapped file's pages count
        in RSS once read."""
        return x.nbytes if isinstance(x, np.memmap) else 0

    def _scores(self, x, train: bool) -> np.ndarray:
        x = check_images(self.network, x)
        self.sync_to_engine()
        n, classes = len(x), self.network.classes
        out = np.empty((n, classes), self.network.dtype)
        if n == 0:
            return out
        plan = self.engine.use_plan(Work("train" if train else "predict", n, outputs=n,
                                         outside=self._outside(x)))
        return self.network.predict_scores(x, plan, pixels=False, out=out,
                                           noise_key=self._noise_key(train))

    def _loss(self, engine: Engine, x, t, train: bool) -> float:
        """The book's loss (mean cross-entropy) on `engine`, whose parameters are set."""
        network = engine.network
        n = len(x)
        if n == 0:
            raise ValueError("x holds no images: the loss of nothing is not a number")
        chunk = min(n, CHUNK_IMAGES)
        scores = np.empty((chunk, network.classes), network.dtype)
        plan = engine.use_plan(Work("train" if train else "evaluate", chunk, outputs=chunk, loss=chunk,
                                    outside=self._outside(x)))
        noise_key = self._noise_key(train)
        total = 0.0
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            labels = label_slice(network, t, lo, hi)
            part = network.predict_scores(x[lo:hi], plan, pixels=False, out=scores[: hi - lo],
                                          noise_key=None if noise_key is None else (*noise_key, lo))
            total += _cross_entropy_sum(part, labels)
        return total / n

    def loss(self, x, t) -> float:
        """Mean cross-entropy of the softmax of the scores, as the book's loss."""
        x = check_images(self.network, x)
        t = check_labels(self.network, t, len(x))
        self.sync_to_engine()
        return self._loss(self.engine, x, t, self._loss_trains)

    def accuracy(self, x, t, batch_size=100) -> float:
        """The share of images whose highest score is their label. `batch_size` is
        accepted for the book's scripts; the budget decides how many images go through
        at once, and every image counts."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r} is not a positive whole number")
        x = check_images(self.network, x)
        t = check_labels(self.network, t, len(x))
        n = len(x)
        if n == 0:
            raise ValueError("x holds no images: the accuracy of nothing is not a number")
        self.sync_to_engine()
        chunk = min(n, CHUNK_IMAGES)
        plan = self.engine.use_plan(Work("evaluate", chunk, compared=chunk, outside=self._outside(x)))
        correct = 0
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            predicted = self.network.predict(x[lo:hi], plan, pixels=False)
            correct += int(np.count_nonzero(predicted == label_slice(self.network, t, lo, hi)))
        return correct / n

    def gradient(self, x, t) -> dict:
        """d loss / d params by backpropagation: a dict of new float64 arrays in the
        book's shapes."""
        x = check_images(self.network, x)
        t = check_labels(self.network, t, len(x))
        n = len(x)
        if n == 0:
            raise ValueError("x holds no images: the gradient of nothing is not a number")
        labels = label_slice(self.network, t, 0, n)
        self.sync_to_engine()
        plan = self.engine.use_plan(Work("train", n, float64_grads=True, outside=self._outside(x)))
        self.network.accumulate_gradient(x, labels, plan, self._noise_key(True) or (0,),
                                         pixels=False)
        return self._book_grads(self.network.grads(plan))

    def save_params(self, file_name="params.pkl"):
        """Write `params` as the book does (a pickled dict of arrays), atomically, and
        beside it FILE.json, the network's description, as `lowmem-cnn train` does: the
        command line then evaluates the file without being told the network."""
        from lowmem_cnn.files.params import write_params

        params = {key: np.ascontiguousarray(self._param(key))
                  for key in self.network.expected_book_shapes()}
        write_params(Path(file_name), params, self.network.config, self.network.dtype)

    def load_params(self, file_name="params.pkl"):
        """Read a parameter file (the book's or ours) into `params`. Read with
        lowmem_cnn.files.pickles' restricted unpickler, and its description, if any, as the
        command line reads it: a file that asks to run anything, whose keys, shapes or
        values do not fit, or whose description is not its own, is refused with
        LowmemError."""
        from lowmem_cnn.files.params import param_file_limit, read_checked

        expected = self.network.expected_book_shapes()
        loaded = read_checked(Path(file_name), expected, param_file_limit(self.network))
        for key in expected:  # the book puts the file's arrays in params
            self.params[key] = loaded[key]
        self.sync_to_engine()

    def save_onnx(self, file_name="model.onnx", softmax=False, opset=None):
        """Write the network, with `params` as they are now, as an ONNX model (float32;
        input [N, C, H, W] as `predict` takes it; `softmax`: probabilities, not scores),
        atomically, stamped with `opset` (None: the oldest that expresses the network;
        see docs/onnx.md). Needs the onnx extra (pip install 'lowmem-cnn[onnx]')."""
        from lowmem_cnn.files.export import save_onnx

        self.sync_to_engine()
        save_onnx(self.network, Path(file_name), softmax=softmax, opset=opset)


class SimpleConvNet(_BookNetwork):
    """The book's SimpleConvNet (chapter 7): conv - relu - pool - affine - relu -
    affine, with its arguments and defaults, and:

    max_ram: the RAM budget (e.g. "512M", "2G"; None: half of the RAM available);
    dtype: the engine's arithmetic (float32; float64 is the book's);
    threads: micro-batches run at once (None: one per CPU core; more than the cores is
    refused).
    """

    _loss_trains = False

    def __init__(self, input_dim=(1, 28, 28),
                 conv_param={'filter_num': 30, 'filter_size': 5, 'pad': 0, 'stride': 1},  # noqa: B006 (the book's signature; never changed)
                 hidden_size=100, output_size=10, weight_init_std=0.01, *, max_ram=None,
                 dtype=np.float32, threads=None):
        if isinstance(weight_init_std, bool) or not isinstance(weight_init_std, (int, float, np.number)):
            raise ValueError(f"weight_init_std {weight_init_std!r} is not a number")
        layers = (_conv_layer(conv_param, "conv_param"), {"type": "relu"},
                  {"type": "pool", "size": 2, "stride": 2},
                  {"type": "affine", "units": _count(hidden_size, "hidden_size")}, {"type": "relu"},
                  {"type": "affine", "units": _count(output_size, "output_size")})
        config = NetworkConfig("SimpleConvNet", _input_dim(input_dim), layers, float(weight_init_std))
        super().__init__(config, [weight_init_std] * 3, max_ram, dtype, threads)

    def predict(self, x) -> np.ndarray:
        """The last affine layer's scores, (N, output_size), in the engine's dtype."""
        return self._scores(x, False)

    def numerical_gradient(self, x, t) -> dict:
        """d loss / d params by central differences, one parameter value at a time, as
        the book's numerical_gradient (h = 1e-4). Computed in float64 whatever the
        engine's dtype: in float32 the differences would be mostly rounding."""
        x = check_images(self.network, x)
        t = check_labels(self.network, t, len(x))
        grads = {key: np.zeros(shape) for key, shape in self.network.expected_book_shapes().items()}
        if self.network.dtype == np.float64:
            engine = self.engine
            self.sync_to_engine()
        else:
            # a float64 twin for the duration: its parameters and arrays are planned
            network = Network(self.network.config, np.float64, 1)
            network.load_book_params({key: self._param(key) for key in grads})
            engine = Engine(network, self.budget)
        views = engine_views(engine.network, engine.network.params())
        for key, view in views.items():
            grad = grads[key].reshape(view.shape)
            for index in np.ndindex(view.shape):
                kept = float(view[index])
                view[index] = kept + NUMERICAL_STEP
                up = self._loss(engine, x, t, False)
                view[index] = kept - NUMERICAL_STEP
                down = self._loss(engine, x, t, False)
                view[index] = kept
                grad[index] = (up - down) / (2 * NUMERICAL_STEP)
        return grads


# DeepConvNet's initial weights: the book's std sqrt(2 / inputs of a unit), with the
# book's list of inputs (written for its default arguments, used whatever they are).
def _deep_fan_in(hidden_size):
    return [1 * 3 * 3, 16 * 3 * 3, 16 * 3 * 3, 32 * 3 * 3, 32 * 3 * 3, 64 * 3 * 3, 64 * 4 * 4,
            hidden_size]


class DeepConvNet(_BookNetwork):
    """The book's DeepConvNet (chapter 8): six 3x3 convolutions with ReLU, max-pooling
    after the 2nd, 4th and 6th, affine - relu - dropout - affine - dropout, with its
    arguments and defaults (He initial weights), and the keywords max_ram, dtype and
    threads of SimpleConvNet. Dropout draws its masks from Generators seeded from
    NumPy's global RNG."""

    _loss_trains = True  # the book's loss runs dropout as in training

    def __init__(self, input_dim=(1, 28, 28),
                 conv_param_1={'filter_num': 16, 'filter_size': 3, 'pad': 1, 'stride': 1},  # noqa: B006
                 conv_param_2={'filter_num': 16, 'filter_size': 3, 'pad': 1, 'stride': 1},  # noqa: B006
                 conv_param_3={'filter_num': 32, 'filter_size': 3, 'pad': 1, 'stride': 1},  # noqa: B006
                 conv_param_4={'filter_num': 32, 'filter_size': 3, 'pad': 2, 'stride': 1},  # noqa: B006
                 conv_param_5={'filter_num': 64, 'filter_size': 3, 'pad': 1, 'stride': 1},  # noqa: B006
                 conv_param_6={'filter_num': 64, 'filter_size': 3, 'pad': 1, 'stride': 1},  # noqa: B006
                 hidden_size=50, output_size=10, *, max_ram=None, dtype=np.float32, threads=None):
        convs = (conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5, conv_param_6)
        layers = []
        for number, conv in enumerate(convs, start=1):
            layers += [_conv_layer(conv, f"conv_param_{number}"), {"type": "relu"}]
            if number % 2 == 0:
                layers.append({"type": "pool", "size": 2, "stride": 2})
        layers += [{"type": "affine", "units": _count(hidden_size, "hidden_size")}, {"type": "relu"},
                   {"type": "dropout", "ratio": 0.5},
                   {"type": "affine", "units": _count(output_size, "output_size")},
                   {"type": "dropout", "ratio": 0.5}]
        config = NetworkConfig("DeepConvNet", _input_dim(input_dim), tuple(layers), "he")
        scales = np.sqrt(2.0 / np.array(_deep_fan_in(_count(hidden_size, "hidden_size"))))
        super().__init__(config, scales, max_ram, dtype, threads)

    def predict(self, x, train_flg=False) -> np.ndarray:
        """The last layer's scores, (N, output_size), in the engine's dtype; train_flg
        runs dropout as in training (else it scales, as the book's)."""
        return self._scores(x, bool(train_flg))


# --- training ----------------------------------------------------------------------


class Trainer:
    """The book's common.trainer.Trainer: mini-batch training of a SimpleConvNet or
    DeepConvNet on arrays in memory, on the same training run as `lowmem-cnn train`
    (training.TrainingRun: the plan, micro-batches on threads, the epoch loop).

    `optimizer` is one of the book's names (SGD, Momentum, Nesterov, AdaGrad, RMSprop,
    Adam, any case) and `optimizer_param` its settings ({'lr': 0.01} and the like).
    After `train()`: train_loss_list (each update's loss, from the forward pass of its
    gradient), train_acc_list and test_acc_list (one accuracy per epoch, on the first
    `evaluate_sample_num_per_epoch` images, or all), epoch_seconds; the network's
    `params` hold the trained weights. Each epoch takes a fresh permutation of the
    training images (the book draws batches with replacement), seeded from NumPy's
    global RNG, so that np.random.seed repeats a run. `max_ram` (the CLI's sizes)
    bounds what training adds to the arrays the script holds; default: the network's.
    """

    def __init__(self, network, x_train, t_train, x_test, t_test, epochs=20, mini_batch_size=100,
                 optimizer="SGD", optimizer_param={"lr": 0.01},  # noqa: B006 (the book's default)
                 evaluate_sample_num_per_epoch=None, verbose=True, *, max_ram=None):
        from lowmem_cnn.engine.optimizers import make_optimizer

        if not isinstance(network, _BookNetwork):
            raise ValueError(f"network is a {type(network).__name__}: give a SimpleConvNet or "
                             "DeepConvNet of lowmem_cnn.book")
        engine = network.network
        self.network = network
        self.x_train, self.x_test = check_images(engine, x_train), check_images(engine, x_test)
        self.t_train = label_slice(engine, check_labels(engine, t_train, len(self.x_train)), 0, None)
        self.t_test = label_slice(engine, check_labels(engine, t_test, len(self.x_test)), 0, None)
        self.epochs = _count(epochs, "epochs")
        self.batch_size = _count(mini_batch_size, "mini_batch_size")
        settings = dict(optimizer_param)
        self._optimizer = (optimizer, settings.pop("lr", 0.01), settings)
        try:  # checked now; training.run.training_run makes the run's own
            self.optimizer = make_optimizer(*self._optimizer[:2], **settings)
        except LowmemError as err:
            raise ValueError(f"{err} (optimizer={optimizer!r}, optimizer_param={optimizer_param!r})"
                             ) from None
        sample = evaluate_sample_num_per_epoch
        if sample is not None:
            sample = _count(sample, "evaluate_sample_num_per_epoch")
        self.evaluate_sample_num_per_epoch = sample
        self.verbose = verbose
        self.budget = network.budget if max_ram is None else resolve_budget(max_ram)
        self.train_loss_list, self.train_acc_list, self.test_acc_list = [], [], []
        self.epoch_seconds = []

    def train(self):
        from tqdm.auto import tqdm

        from lowmem_cnn.data.idx import ArrayImages, Split
        from lowmem_cnn.training.run import training_run

        engine = self.network.network
        sample = self.evaluate_sample_num_per_epoch
        name, lr, settings = self._optimizer
        run = training_run(engine, name, lr, self.budget, self.epochs, self.batch_size, settings,
                           seed=int(np.random.randint(0, 2**31 - 1)), test_count=sample,
                           train_sample=len(self.x_train) if sample is None else sample)
        self.optimizer = run.optimizer
        shape = engine.config.input_shape
        self.network.sync_to_engine()
        try:
            run.use_data(Split(ArrayImages(self.x_train, shape, "x_train"), self.t_train),
                         Split(ArrayImages(self.x_test, shape, "x_test"), self.t_test))
        except BudgetError as err:
            raise err.worded(BUDGET_OPTION) from None
        bar = tqdm(total=self.epochs * run.loop.updates_per_epoch, unit="batch",
                   disable=not self.verbose, leave=False)

        def updated(loss, n):
            self.train_loss_list.append(loss)
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

        def epoch_ends(record):
            self.train_acc_list.append(record["train_accuracy"])
            self.test_acc_list.append(record["test_accuracy"])
            self.epoch_seconds.append(record["seconds"])
            if self.verbose:
                bar.write(f"=== epoch:{record['epoch']}, train acc:{record['train_accuracy']:.4f}, "
                          f"test acc:{record['test_accuracy']:.4f} ===")

        try:
            run.run(updated, epoch_ends)
        finally:
            bar.close()
            self.network.sync_from_engine()  # the trained weights into the user's arrays
            run.release_memory()
        if self.verbose:
            accuracy = self.network.accuracy(self.x_test, self.t_test)
            print(f"=============== Final Test Accuracy ===============\ntest acc:{accuracy}")


# --- arguments -----------------------------------------------------------------------


def _count(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} {value!r} is not a positive whole number")
    return int(value)


def _input_dim(input_dim) -> tuple:
    try:
        dims = tuple(_count(v, "input_dim") for v in input_dim)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3:
        raise ValueError(f"input_dim {input_dim!r} is not (channels, height, width)")
    return dims


def _conv_layer(conv_param, name) -> dict:
    try:
        spec = {"type": "conv", "filters": conv_param["filter_num"],
                "size": conv_param["filter_size"], "pad": conv_param["pad"],
                "stride": conv_param["stride"]}
    except (KeyError, TypeError):
        raise ValueError(f"{name} {conv_param!r} needs 'filter_num', 'filter_size', 'pad' and "
                         "'stride'") from None
    for key, book_key in (("filters", "filter_num"), ("size", "filter_size"), ("stride", "stride")):
        _count(spec[key], f"{name}'s {book_key}")
    if isinstance(spec["pad"], bool) or not isinstance(spec["pad"], (int, np.integer)) or spec["pad"] < 0:
        raise ValueError(f"{name}'s pad {spec['pad']!r} is not a whole number >= 0")
    return {k: (int(v) if k != "type" else v) for k, v in spec.items()}
