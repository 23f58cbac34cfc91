"""The book's optimizers (SGD, Momentum, AdaGrad, Adam), updating parameters in place.

An update allocates nothing: it works in the gradient's own array (the network
zeroes gradients before the next batch) and, where two are needed, in one scratch
array as large as the largest parameter.
"""

import numpy as np


class Optimizer:
    #: how many parameter-sized arrays of state the optimizer keeps
    state_copies = 0

    def __init__(self, lr: float):
        self.lr = lr
        self.state: dict[str, np.ndarray] = {}
        self.steps = 0

    def _scratch(self, like):
        """A scratch array shaped like `like`: a view of one buffer shared by all parameters."""
        buffer = getattr(self, "_buffer", None)
        if buffer is None or buffer.size < like.size or buffer.dtype != like.dtype:
            buffer = self._buffer = np.empty(like.size, like.dtype)
        return buffer[: like.size].reshape(like.shape)

    def _slot(self, key, like):
        if key not in self.state:
            self.state[key] = np.zeros_like(like)
        return self.state[key]

    def update(self, params: dict, grads: dict):
        self.steps += 1
        for key, param in params.items():
            self._update(key, param, grads[key])

    def _update(self, key, param, grad):
        raise NotImplementedError


class SGD(Optimizer):
    def _update(self, key, param, grad):
        grad *= self.lr
        param -= grad


class Momentum(Optimizer):
    state_copies = 1

    def __init__(self, lr, momentum=0.9):
        super().__init__(lr)
        self.momentum = momentum

    def _update(self, key, param, grad):
        v = self._slot("v" + key, param)
        v *= self.momentum
        grad *= self.lr
        v -= grad
        param += v


class AdaGrad(Optimizer):
    state_copies = 1

    def _update(self, key, param, grad):
        h = self._slot("h" + key, param)
        step = self._scratch(param)
        np.multiply(grad, grad, out=step)
        h += step
        np.sqrt(h, out=step)
        step += 1e-7
        np.divide(grad, step, out=step)
        step *= self.lr
        param -= step


class Adam(Optimizer):
    state_copies = 2

    def __init__(self, lr, beta1=0.9, beta2=0.999):
        super().__init__(lr)
        self.beta1, self.beta2 = beta1, beta2

    def update(self, params, grads):
        t = self.steps + 1
        self._lr_t = self.lr * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        super().update(params, grads)

    def _update(self, key, param, grad):
        m = self._slot("m" + key, param)
        v = self._slot("v" + key, param)
        # m += (1 - beta1) (g - m);  v += (1 - beta2) (g^2 - v)
        step = self._scratch(param)
        np.multiply(grad, 1 - self.beta1, out=step)
        m *= self.beta1
        m += step
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
