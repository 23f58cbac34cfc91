"""Training epochs and evaluation, reading the data a batch at a time."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
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
    wrong: list  # (index, true, predicted) of the first misclassified images, if asked for

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
             keep_wrong: int = 0) -> Evaluation:
    """Confusion matrix of the first `count` images (all by default), read `batch_size` at
    a time, and the first `keep_wrong` misclassified ones."""
    n = len(split) if count is None else min(count, len(split))
    batch_size = min(batch_size, MAX_READ_IMAGES)
    classes = network.classes
    confusion = np.zeros((classes, classes), np.int64)
    wrong = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        predicted = network.predict(split.images.read_range(start, stop), micro_batch)
        true = split.labels[start:stop].astype(np.int64)
        confusion += np.bincount(true * classes + predicted,
                                 minlength=classes * classes).reshape(classes, classes)
        for i in np.flatnonzero(true != predicted)[: keep_wrong - len(wrong)]:
            wrong.append((start + int(i), int(true[i]), int(predicted[i])))
    return Evaluation(confusion, wrong)


class Trainer:
    """Mini-batch training over a fresh random permutation each epoch.

    The state between two updates (the epoch's permutation and the position in it,
    the RNG, the loss so far) is all in attributes, so that `state()` and `restore()`
    can stop a run after any update and continue it with the same arithmetic.
    """

    def __init__(self, network, optimizer, split, micro_batch: int, batch_size: int,
                 rng: np.random.Generator, count: int | None = None, seed: int = 0):
        self.network, self.optimizer, self.split = network, optimizer, split
        self.micro_batch, self.batch_size, self.rng = micro_batch, batch_size, rng
        self.seed = seed  # with the epoch and update, seeds the dropout masks
        self.count = len(split) if count is None else min(count, len(split))
        # two batch buffers: the next batch is read while this one is computed
        rows = min(batch_size, self.count)
        self._buffers = [np.empty((rows, split.images.row_bytes), np.uint8) for _ in range(2)]
        self._reader = ThreadPoolExecutor(1)
        self.epochs_done = 0
        self.order = None  # permutation of the epoch under way, None between epochs
        self.position = 0  # updates done in the epoch under way
        self.loss_sum = 0.0
        self.seconds = 0.0  # spent on updates in the epoch under way

    def _read(self, position: int):
        """The images and labels of update `position` of the epoch under way."""
        indices = self.order[position * self.batch_size : (position + 1) * self.batch_size]
        images = self.split.images.read(indices, self._buffers[position % 2])
        return images, self.split.labels[indices]

    def steps(self):
        """Run the rest of the epoch under way (or a new one), yielding (loss, images)
        after each update."""
        if self.order is None:
            self.order = self.rng.permutation(self.count)
            self.position, self.loss_sum, self.seconds = 0, 0.0, 0.0
        updates = -(-self.count // self.batch_size)
        pending = None
        try:
            while self.position < updates:
                began = time.perf_counter()
                images, labels = (pending.result() if pending is not None
                                  else self._read(self.position))
                # the next batch is read while this one is computed (it goes to the
                # other buffer): reads then cost no time, even from a cold disk cache
                following = self.position + 1
                pending = self._reader.submit(self._read, following) if following < updates else None
                loss = self.network.accumulate_gradient(
                    images, labels, self.micro_batch, (self.seed, self.epochs_done, self.position))
                self.optimizer.update(self.network.params(),
                                      self.network.thread_grads()[: self.network.threads],
                                      self.network.pool, self.network.threads)
                self.loss_sum += loss * len(labels)
                self.position += 1
                self.seconds += time.perf_counter() - began
                yield loss, len(labels)
        finally:
            if pending is not None:  # stopped early: let the read finish before the buffer is reused
                pending.result()

    def finish_epoch(self) -> tuple[float, float]:
        """(mean loss, seconds) of the epoch just run."""
        result = self.loss_sum / self.count, self.seconds
        self.order, self.position = None, 0
        self.epochs_done += 1
        return result

    def buffer_bytes(self) -> int:
        """The batch buffers and the epoch's permutation."""
        return sum(buffer.nbytes for buffer in self._buffers) + 8 * self.count

    def state(self) -> tuple[dict, dict]:
        """(metadata, arrays) that `restore` continues from exactly."""
        meta = {
            "epochs_done": self.epochs_done, "position": self.position, "loss_sum": self.loss_sum,
            "seconds": self.seconds, "rng": self.rng.bit_generator.state,
            "optimizer_steps": self.optimizer.steps,
        }
        arrays = {f"param/{k}": v for k, v in self.network.params().items()}
        arrays.update({f"optimizer/{k}": v for k, v in self.optimizer.state.items()})
        if self.order is not None:
            arrays["order"] = self.order
        return meta, arrays

    def restore(self, meta: dict, arrays: dict):
        for key, param in self.network.params().items():
            np.copyto(param, arrays[f"param/{key}"])
        self.optimizer.state = {k.removeprefix("optimizer/"): v for k, v in arrays.items()
                                if k.startswith("optimizer/")}
        self.optimizer.steps = meta["optimizer_steps"]
        self.rng.bit_generator.state = meta["rng"]
        self.order = arrays.get("order")
        self.epochs_done, self.position = meta["epochs_done"], meta["position"]
        self.loss_sum, self.seconds = meta["loss_sum"], meta["seconds"]
