"""The epoch loop: the mini-batch updates of an epoch over a fresh permutation, which
can stop after any update and continue with the same arithmetic."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lowmem_cnn.data.augment import NO_AUGMENTATION, Augmentation
from lowmem_cnn.training.schedule import Schedule

class EpochLoop:
    """Mini-batch training over a fresh random permutation each epoch.

    The state between two updates (the epoch's permutation and the position in it,
    the RNG, the loss so far) is all in attributes, so that `state()` and `restore()`
    can stop a run after any update and continue it with the same arithmetic.
    """

    def __init__(self, network, optimizer, split, batch_size: int, rng: np.random.Generator,
                 count: int | None = None, seed: int = 0, indices: np.ndarray | None = None,
                 augmentation: Augmentation = NO_AUGMENTATION, schedule: Schedule | None = None):
        """`indices`: the images of `split` to train on (default: the first `count`);
        `schedule`: the rate of each update (default: the optimizer's)."""
        self.network, self.optimizer, self.split = network, optimizer, split
        self.rng = rng
        self.seed = seed  # with the epoch and update, seeds the dropout masks and augmentation
        self.indices = indices
        if indices is not None:
            self.count = len(indices)
        else:
            self.count = len(split) if count is None else min(count, len(split))
        self.augmentation, self.schedule = augmentation, schedule
        # a batch larger than the data is the whole data: one update an epoch
        self.batch_size = min(batch_size, self.count)
        # two batch buffers: the next batch is read while this one is computed
        self._buffers = [split.images.empty(self.batch_size) for _ in range(2)]
        self._reader = ThreadPoolExecutor(1)
        self.epochs_done = 0
        self.order = None  # permutation of the epoch under way, None between epochs
        self.position = 0  # updates done in the epoch under way
        self.loss_sum = 0.0
        self.seconds = 0.0  # spent on updates in the epoch under way

    @property
    def updates_per_epoch(self) -> int:
        return -(-self.count // self.batch_size)

    def _read(self, position: int):
        """The images and labels of update `position` of the epoch under way."""
        indices = self.order[position * self.batch_size : (position + 1) * self.batch_size]
        images = self.split.images.read(indices, self._buffers[position % 2])
        images_ = self.split.images
        self.augmentation.apply(images, (images_.channels, images_.rows, images_.cols),
                                (self.seed, self.epochs_done, position))
        return images, self.split.labels[indices]

    def _new_order(self) -> np.ndarray:
        if self.indices is None:
            return self.rng.permutation(self.count)
        return self.indices[self.rng.permutation(self.count)]

    def steps(self, plan):
        """Run the rest of the epoch under way (or a new one) as `plan` says, yielding
        (loss, images) after each update."""
        if self.order is None:
            self.order = self._new_order()
            self.position, self.loss_sum, self.seconds = 0, 0.0, 0.0
        updates = self.updates_per_epoch
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
                    images, labels, plan, (self.seed, self.epochs_done, self.position),
                    self.split.images.pixels)
                loss += self._decay_loss()
                lr = self.schedule.rate(self.epochs_done, self.position) if self.schedule else None
                self.optimizer.update(self.network.params(), self.network.thread_grads(plan),
                                      self.network.pool, plan.threads, lr)
                self.loss_sum += loss * len(labels)
                self.position += 1
                self.seconds += time.perf_counter() - began
                yield loss, len(labels)
        finally:
            if pending is not None:  # stopped early: let the read finish before the buffer is reused
                pending.result()

    def _decay_loss(self) -> float:
        """The book's weight-decay term of the loss: lambda/2 * the sum of W^2."""
        decay = self.optimizer.weight_decay
        if not decay:
            return 0.0
        params = self.network.params()
        return 0.5 * decay * sum(float(np.vdot(params[key], params[key]))
                                 for key in self.optimizer.decayed)

    def finish_epoch(self) -> tuple[float, float]:
        """(mean loss, seconds) of the epoch just run."""
        result = self.loss_sum / self.count, self.seconds
        self.order, self.position = None, 0
        self.epochs_done += 1
        return result

    def state(self) -> tuple[dict, dict]:
        """(metadata, arrays) that `restore` continues from exactly."""
        meta = {
            "epochs_done": self.epochs_done, "position": self.position, "loss_sum": self.loss_sum,
            "seconds": self.seconds, "rng": self.rng.bit_generator.state,
            "optimizer_steps": self.optimizer.steps,
        }
        from lowmem_cnn.files.checkpoint import network_arrays

        arrays = network_arrays(self.network)
        arrays.update({f"optimizer/{k}": v for k, v in self.optimizer.state.items()})
        if self.order is not None:
            arrays["order"] = self.order
        return meta, arrays

    def restore(self, meta: dict, arrays: dict):
        from lowmem_cnn.files.checkpoint import network_arrays

        for name, value in network_arrays(self.network).items():
            np.copyto(value, arrays[name])
        self.optimizer.state = {k.removeprefix("optimizer/"): v for k, v in arrays.items()
                                if k.startswith("optimizer/")}
        self.optimizer.steps = meta["optimizer_steps"]
        self.rng.bit_generator.state = meta["rng"]
        self.order = arrays.get("order")
        self.epochs_done, self.position = meta["epochs_done"], meta["position"]
        self.loss_sum, self.seconds = meta["loss_sum"], meta["seconds"]
