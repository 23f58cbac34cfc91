"""Training epochs and evaluation, reading the data a batch at a time."""

import time
from dataclasses import dataclass

import numpy as np

# Train accuracy after each epoch is measured on this many training images (the first ones).
TRAIN_SAMPLE = 10_000
# Evaluation reads at most this many uint8 images at a time (7.8 MB for MNIST), whatever
# the batch size asked for: a larger read would only cost memory.
MAX_READ_IMAGES = 10_000


@dataclass
class Evaluation:
    confusion: np.ndarray  # rows: true label, columns: predicted

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def per_class(self) -> np.ndarray:
        totals = self.confusion.sum(axis=1)
        return np.divide(np.diag(self.confusion), totals, out=np.zeros(len(totals)),
                         where=totals > 0)


def evaluate(network, split, micro_batch: int, batch_size: int, count: int | None = None,
             on_batch=None) -> Evaluation:
    """Confusion matrix of the first `count` images (all by default), read `batch_size` at a time."""
    n = len(split) if count is None else min(count, len(split))
    batch_size = min(batch_size, MAX_READ_IMAGES)
    classes = network.classes
    confusion = np.zeros((classes, classes), np.int64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        predicted = network.predict(split.images.read_range(start, stop), micro_batch)
        pairs = split.labels[start:stop].astype(np.int64) * classes + predicted
        confusion += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
        if on_batch:
            on_batch(stop - start)
    return Evaluation(confusion)


class Trainer:
    """Mini-batch training over a fresh random permutation each epoch."""

    def __init__(self, network, optimizer, split, micro_batch: int, batch_size: int,
                 rng: np.random.Generator, count: int | None = None):
        self.network, self.optimizer, self.split = network, optimizer, split
        self.micro_batch, self.batch_size, self.rng = micro_batch, batch_size, rng
        self.count = len(split) if count is None else min(count, len(split))
        self._buffer = np.empty((batch_size, split.images.row_bytes), np.uint8)

    def epoch(self, on_batch=None) -> tuple[float, float]:
        """One pass over the data; returns (mean loss, seconds)."""
        began = time.perf_counter()
        order = self.rng.permutation(self.count)
        loss_sum = 0.0
        for start in range(0, self.count, self.batch_size):
            indices = order[start : start + self.batch_size]
            images = self.split.images.read(indices, self._buffer)
            labels = self.split.labels[indices]
            self.network.zero_grads()
            loss = self.network.accumulate_gradient(images, labels, self.micro_batch)
            self.optimizer.update(self.network.params(), self.network.grads())
            loss_sum += loss * len(indices)
            if on_batch:
                on_batch(loss, len(indices))
        return loss_sum / self.count, time.perf_counter() - began

    def buffer_bytes(self) -> int:
        """The batch buffer and the epoch's permutation."""
        return self._buffer.nbytes + 8 * self.count
