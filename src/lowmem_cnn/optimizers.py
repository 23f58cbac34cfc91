"""The book's optimizers (SGD, Momentum, AdaGrad, Adam), updating parameters in place.

An update allocates nothing: it works in the gradient's own array (the network zeroes
gradients before the next batch) and in one scratch buffer the size of all the
parameters. Every step is elementwise, so large parameters are cut into pieces that
the network's threads update at once, with the same result to the bit.
"""

import numpy as np

# Parameters smaller than this are not worth cutting into pieces for the threads.
_MIN_PIECE = 1 << 16


class Optimizer:
    #: names of the per-parameter state arrays, each the parameter's shape
    slots: tuple = ()

    def __init__(self, lr: float):
        self.lr = lr
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0
        self._scratch = None

    @property
    def state_copies(self) -> int:
        return len(self.slots)

    def update(self, params: dict, grads: dict, pool=None, pieces: int = 1):
        self.steps += 1
        self._start_step()
        total = sum(p.size for p in params.values())
        if self._scratch is None or self._scratch.size != total:
            self._scratch = np.empty(total, next(iter(params.values())).dtype)
        jobs, offset = [], 0
        for key, param in params.items():
            state = [self.state.setdefault(name + key, np.zeros_like(param)) for name in self.slots]
            scratch = self._scratch[offset : offset + param.size]
            offset += param.size
            flat = [a.reshape(-1) for a in (param, grads[key], scratch, *state)]
            cuts = pieces if param.size >= _MIN_PIECE * pieces else 1
            bounds = [param.size * i // cuts for i in range(cuts + 1)]
            jobs += [[a[lo:hi] for a in flat] for lo, hi in zip(bounds, bounds[1:], strict=False)]
        if pool is None:
            for job in jobs:
                self._step(*job)
        else:
            for future in [pool.submit(self._step, *job) for job in jobs]:
                future.result()

    def _start_step(self):
        pass

    def _step(self, param, grad, scratch, *state):
        raise NotImplementedError


class SGD(Optimizer):
    def _step(self, param, grad, scratch):
        grad *= self.lr
        param -= grad


class Momentum(Optimizer):
    slots = ("v",)

    def __init__(self, lr, momentum=0.9):
        super().__init__(lr)
        self.momentum = momentum

    def _step(self, param, grad, scratch, v):
        v *= self.momentum
        grad *= self.lr
        v -= grad
        param += v


class AdaGrad(Optimizer):
    slots = ("h",)

    def _step(self, param, grad, scratch, h):
        np.multiply(grad, grad, out=scratch)
        h += scratch
        np.sqrt(h, out=scratch)
        scratch += 1e-7
        np.divide(grad, scratch, out=scratch)
        scratch *= self.lr
        param -= scratch


class Adam(Optimizer):
    slots = ("m", "v")

    def __init__(self, lr, beta1=0.9, beta2=0.999):
        super().__init__(lr)
        self.beta1, self.beta2 = beta1, beta2

    def _start_step(self):
        t = self.steps
        self._lr_t = self.lr * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)

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


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam}


def make_optimizer(name: str, lr: float) -> Optimizer:
    return OPTIMIZERS[name](lr)
