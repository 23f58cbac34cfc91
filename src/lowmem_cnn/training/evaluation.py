"""A network evaluated on a split: its confusion matrix, read a batch at a time; and
the check that a split's images are what the network takes. Nothing here prints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowmem_cnn.common.errors import LowmemError

# Evaluation reads at most this many images at a time (7.8 MB for MNIST), whatever
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


def evaluate(network, split, plan, batch_size: int, count: int | None = None,
             keep_wrong: int = 0) -> Evaluation:
    """Confusion matrix of the first `count` images (all by default), read `batch_size` at
    a time and run as `plan` says, and the first `keep_wrong` misclassified ones."""
    n = len(split) if count is None else min(count, len(split))
    batch_size = min(batch_size, MAX_READ_IMAGES)
    classes = network.classes
    confusion = np.zeros((classes, classes), np.int64)
    wrong = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        predicted = network.predict(split.images.read_range(start, stop), plan,
                                    split.images.pixels)
        true = split.labels[start:stop].astype(np.int64)
        confusion += np.bincount(true * classes + predicted,
                                 minlength=classes * classes).reshape(classes, classes)
        for i in np.flatnonzero(true != predicted)[: keep_wrong - len(wrong)]:
            wrong.append((start + int(i), int(true[i]), int(predicted[i])))
    return Evaluation(confusion, wrong)


def check_image_shape(network, *splits):
    """A one-line error unless the splits' images are the network's input shape and
    their labels among its scores."""
    def text(c, h, w):
        return f"{h}x{w}" + (f" with {c} channels" if c != 1 else "")

    expected = tuple(network.config.input_shape)
    for split in splits:
        images = split.images
        found = (images.channels, images.rows, images.cols)
        if found != expected:
            raise LowmemError(f"{images.path}: images are {text(*found)}, the network "
                              f"{network.config.name} takes {text(*expected)}")
        # a config's last affine layer gives the scores: as many as the data's classes
        # (MNIST-style data: 10; a folder's classes set it, see NetworkConfig.for_data)
        top = int(split.labels.max()) if len(split.labels) else -1
        if top >= network.classes:
            raise LowmemError(f"{network.config.name}: its last affine layer has units = "
                              f"{network.classes}, but {images.path} has labels up to {top}: "
                              f"the scores of {top + 1} classes need units = {top + 1}")
