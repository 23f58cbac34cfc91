"""The book's optimizers (SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam), updating
parameters in place.

An update takes the gradients as one set per thread (see Network.thread_grads) and
adds them up in thread order, into the first set, whose arrays it then uses as
scratch: the next mini-batch's gradient is written over them. It allocates nothing
else but one chunk-sized scratch buffer per thread. Every step is elementwise, so it
runs on chunks that stay in the CPU's cache through all of a step's passes
(measured: Adam over the 435,000 parameters of the SimpleConvNet, 1.41 ms whole,
0.91 ms in chunks of 65,536), and the chunks are shared among the network's threads,
with the same result to the bit.
"""

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.executor import run_shared

CHUNK = 1 << 16
# State that decays (Adam's m and v, Momentum's v) of a weight whose gradient stays
# zero sinks into the subnormal numbers, which the CPU handles some 100 times slower:
# after 1,000 updates a sixth of SimpleConvNet's Adam m was subnormal and an update
# took 50% longer. Every FLUSH_EVERY steps they are set to zero, as a CPU's
# flush-to-zero mode would; they are below 1.2e-38 (float32), where they no longer
# change any update.
FLUSH_EVERY = 16


def _flush_subnormals(array, scratch):
    np.abs(array, out=scratch)
    np.copyto(array, 0, where=scratch < np.finfo(array.dtype).tiny)


class Optimizer:
    #: names of the per-parameter state arrays, each the parameter's shape
    slots: tuple = ()

    def __init__(self, lr: float, weight_decay: float = 0.0, decayed=()):
        self.lr = float(lr)  # a NumPy float64 would send float32 arithmetic through float64
        self._lr = self.lr  # the rate of the update under way (see update)
        # the book's L2 term: lambda/2 * sum of W^2 in the loss, lambda * W in the
        # gradient, for the parameters named in `decayed` (the weights)
        self.weight_decay, self.decayed = float(weight_decay), frozenset(decayed)
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0
        self._scratch = []  # one chunk-sized buffer per thread

    @property
    def state_copies(self) -> int:
        return len(self.slots)

    def update(self, params: dict, grads, pool=None, pieces: int = 1, lr: float | None = None):
        """`grads`: one dict of gradients like `params`, or a list of them (one per
        thread) to add up. `lr`: this update's rate (a schedule's), else the optimizer's."""
        grad_sets = [grads] if isinstance(grads, dict) else list(grads)
        self._lr = self.lr if lr is None else float(lr)
        self.steps += 1
        self._start_step()
        pieces = pieces if pool is not None else 1
        dtype = next(iter(params.values())).dtype
        if len(self._scratch) != pieces or self._scratch[0].dtype != dtype:
            self._scratch = [np.empty(CHUNK, dtype) for _ in range(pieces)]
        jobs = []
        for key, param in params.items():
            for name in self.slots:
                if name + key not in self.state:
                    self.state[name + key] = np.zeros_like(param)
            flat = [a.reshape(-1) for a in (param, *(self.state[name + key] for name in self.slots))]
            sums = [grads_[key].reshape(-1) for grads_ in grad_sets]
            decay = self.weight_decay if key in self.decayed else 0.0
            for lo in range(0, param.size, CHUNK):
                jobs.append(([a[lo : lo + CHUNK] for a in sums],
                             [a[lo : lo + CHUNK] for a in flat], decay))
        run_shared(pool, pieces, self._run, jobs)

    def _run(self, job, thread):
        sums, (param, *state), decay = job
        scratch = self._scratch[thread]
        grad = sums[0]
        for other in sums[1:]:
            grad += other
        if decay:
            np.multiply(param, decay, out=scratch[: param.size])
            grad += scratch[: param.size]
        self._step(param, grad, scratch[: param.size], *state)
        if self.steps % FLUSH_EVERY == 0:
            for array in state:
                _flush_subnormals(array, scratch[: array.size])

    def _start_step(self):
        pass

    def _step(self, param, grad, scratch, *state):
        """Update `param` from `grad`, which it may overwrite."""
        raise NotImplementedError


class SGD(Optimizer):
    def _step(self, param, grad, scratch):
        grad *= self._lr
        param -= grad


class Momentum(Optimizer):
    slots = ("v",)

    def __init__(self, lr, momentum=0.9, **common):
        super().__init__(lr, **common)
        self.momentum = float(momentum)

    def _step(self, param, grad, scratch, v):
        v *= self.momentum
        grad *= self._lr
        v -= grad
        param += v


class Nesterov(Momentum):
    """The book's Nesterov momentum: v = m v - lr g; param += m^2 v - (1 + m) lr g."""

    def _step(self, param, grad, scratch, v):
        v *= self.momentum
        grad *= self._lr
        v -= grad
        np.multiply(v, self.momentum * self.momentum, out=scratch)
        param += scratch
        grad *= 1 + self.momentum
        param -= grad


class AdaGrad(Optimizer):
    slots = ("h",)

    def _step(self, param, grad, scratch, h):
        np.multiply(grad, grad, out=scratch)
        h += scratch
        self._scaled_step(param, grad, scratch, h)

    def _scaled_step(self, param, grad, scratch, h):
        """param -= lr g / (sqrt(h) + 1e-7)"""
        np.sqrt(h, out=scratch)
        scratch += 1e-7
        np.divide(grad, scratch, out=scratch)
        scratch *= self._lr
        param -= scratch


class RMSprop(AdaGrad):
    """AdaGrad with a decaying sum: h = d h + (1 - d) g^2."""

    def __init__(self, lr, decay_rate=0.99, **common):
        super().__init__(lr, **common)
        self.decay_rate = float(decay_rate)

    def _step(self, param, grad, scratch, h):
        h *= self.decay_rate
        np.multiply(grad, grad, out=scratch)
        scratch *= 1 - self.decay_rate
        h += scratch
        self._scaled_step(param, grad, scratch, h)


class Adam(Optimizer):
    slots = ("m", "v")

    def __init__(self, lr, beta1=0.9, beta2=0.999, **common):
        super().__init__(lr, **common)
        self.beta1, self.beta2 = float(beta1), float(beta2)

    def _start_step(self):
        t = self.steps
        # a Python float: a NumPy float64 would make float32 arithmetic go through float64
        self._lr_t = float(self._lr * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t))

    def _step(self, param, grad, scratch, m, v):
        # m += (1 - beta1) (g - m);  v += (1 - beta2) (g^2 - v)
        np.multiply(grad, 1 - self.beta1, out=scratch)
        m *= self.beta1
        m += scratch
        v *= self.beta2
        grad *= grad
        grad *= 1 - self.beta2
        v += grad
        # param -= lr_t m / (sqrt(v) + eps), the gradient's array reused as scratch
        np.sqrt(v, out=grad)
        grad += 1e-7
        np.divide(m, grad, out=grad)
        grad *= self._lr_t
        param -= grad


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adagrad": AdaGrad,
              "rmsprop": RMSprop, "adam": Adam}


def make_optimizer(name: str, lr: float, weight_decay: float = 0.0, decayed=(),
                   **options) -> Optimizer:
    """The optimizer called `name` (the book's names, any case: SGD, Adam, ...), checked:
    LowmemError for an unknown name, a learning rate that is not a positive finite
    number, a negative weight decay, or `options` it does not take (its own settings, by
    the book's names: momentum, decay_rate, beta1, beta2). `weight_decay` applies to
    the parameters named in `decayed`."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise LowmemError(f"optimizer {name!r} is not one of "
                          f"{', '.join(c.__name__ for c in OPTIMIZERS.values())}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.number)) or not np.isfinite(lr) \
            or lr <= 0:
        raise LowmemError(f"learning rate {lr!r} is not a positive finite number")
    if not np.isfinite(weight_decay) or weight_decay < 0:
        raise LowmemError(f"weight decay {weight_decay!r} is not a finite number >= 0")
    try:
        return cls(lr, weight_decay=weight_decay, decayed=decayed, **options)
    except TypeError:
        raise LowmemError(f"the settings {options!r} do not fit {cls.__name__}") from None
