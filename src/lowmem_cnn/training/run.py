"""Training runs and evaluation, reading the data a batch at a time.

`EpochLoop` makes the mini-batch updates of an epoch over a fresh permutation, and
can stop after any update and continue with the same arithmetic. `TrainingRun` is a
whole run: the memory plan, the epoch loop, the evaluations after each epoch, the
history, and (when given a checkpoint file) checkpoints, resume and the run lock.
The CLI's `train` and `lowmem_cnn.book.Trainer` both run one. Nothing here prints:
a face passes callbacks and reads the results.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lowmem_cnn.data.augment import NO_AUGMENTATION, Augmentation
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.memory.planner import EVAL_READ, MNIST_TRAIN_IMAGES, Work
from lowmem_cnn.training.run_options import OPTIONS
from lowmem_cnn.training.schedule import Schedule

# Train accuracy after each epoch is measured on this many training images (the first ones).
TRAIN_SAMPLE = 10_000
# Evaluation reads at most this many images at a time (7.8 MB for MNIST), whatever
# the batch size asked for: a larger read would only cost memory.
MAX_READ_IMAGES = 10_000
# Without `checkpoint_every`, the checkpoint is written after this much training time.
CHECKPOINT_SECONDS = 60


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


def data_identity(split) -> str:
    """A short fingerprint of a training split: its labels, its image shape and a few of
    its rows, so that a run is not resumed on other data of the same size."""
    images = split.images
    digest = hashlib.sha256(np.ascontiguousarray(split.labels).tobytes())
    digest.update(repr((len(split), images.channels, images.rows, images.cols)).encode())
    for index in np.linspace(0, len(split) - 1, num=min(16, len(split)), dtype=np.int64):
        digest.update(images.read(np.array([index])).tobytes())
    return digest.hexdigest()[:16]


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
        arrays = {f"param/{k}": v for k, v in self.network.params().items()}
        arrays.update({f"state/{k}": v for k, v in self.network.state().items()})
        arrays.update({f"optimizer/{k}": v for k, v in self.optimizer.state.items()})
        if self.order is not None:
            arrays["order"] = self.order
        return meta, arrays

    def restore(self, meta: dict, arrays: dict):
        for key, param in self.network.params().items():
            np.copyto(param, arrays[f"param/{key}"])
        for key, value in self.network.state().items():
            np.copyto(value, arrays[f"state/{key}"])
        self.optimizer.state = {k.removeprefix("optimizer/"): v for k, v in arrays.items()
                                if k.startswith("optimizer/")}
        self.optimizer.steps = meta["optimizer_steps"]
        self.rng.bit_generator.state = meta["rng"]
        self.order = arrays.get("order")
        self.epochs_done, self.position = meta["epochs_done"], meta["position"]
        self.loss_sum, self.seconds = meta["loss_sum"], meta["seconds"]


@dataclass
class Settings:
    """What a run is: recorded in its checkpoint, so that a resumed run is the same run."""

    config: str
    dtype: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    seed: int = 0
    limit: int | None = None
    out: str = "params.pkl"
    max_ram: int = 0  # the budget in bytes
    threads: int = 1
    train_images: int | None = None  # known once the data is open
    data: str | None = None  # data_identity of the training split
    # an image folder: the network's input (C, H, W), the class names, the split
    input_shape: list | None = None
    classes: list | None = None
    test_fraction: float | None = None
    split_seed: int | None = None  # a drawn split (folders.py): its seed; else None
    strict: bool = False
    # what helps photos learn (none of it by default: today's arithmetic)
    augment: str = "none"  # augment.Augmentation, as text: "flip,crop:4"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # schedule.SCHEDULES
    warmup: float = 0.0  # epochs
    val_split: float = 0.0  # the share of the training images held out for validation
    keep: str = "last"  # or "best": the parameters of the best validation accuracy
    patience: int | None = None  # stop after this many epochs without a better one
    # the network trained, as its parameter file's description says it
    # (config.describe_network): a resumed run is this network whatever its config says now
    network: dict | None = None


class Subset:
    """Some images of a split, by index: read as a split is (see evaluate)."""

    def __init__(self, split, indices: np.ndarray):
        self.images = _SubsetImages(split.images, indices)
        self.labels = split.labels[indices]

    def __len__(self):
        return len(self.labels)


class _SubsetImages:
    def __init__(self, images, indices):
        self._images, self._indices = images, indices
        self.pixels, self.path = images.pixels, images.path
        self.channels, self.rows, self.cols = images.channels, images.rows, images.cols

    def __len__(self):
        return len(self._indices)

    def read(self, indices, out=None):
        return self._images.read(self._indices[indices], out)

    def read_range(self, start, stop):
        return self._images.read(self._indices[start:stop])


# Mixed into the seed of the Generator that chooses the validation images.
VALIDATION_KEY = 0x76616C


def held_out(count: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices of `count` images, `share` of them held out,
    chosen by `seed` (the same every run), each in increasing order."""
    chosen = np.random.default_rng([VALIDATION_KEY, seed]).permutation(count)
    n = min(count - 1, max(1, round(count * share)))
    return np.sort(chosen[n:]), np.sort(chosen[:n])


class Diverged(LowmemError):
    """The parameters are no longer finite numbers (NaN or inf): the run stops, and
    nothing of it is saved from then on."""


@dataclass
class Stopped(Exception):
    """The run stopped on request after an update; its checkpoint is written."""

    epoch: int  # the epoch under way (1-based)
    position: int  # updates done in it (0: stopped between epochs)
    checkpoint: Path | None  # None: a run without checkpoints (the book's Trainer)


@dataclass
class Checkpointing:
    path: Path
    every_updates: int | None = None  # else every CHECKPOINT_SECONDS of training
    _saved_at: float = field(default_factory=time.monotonic)


class TrainingRun:
    """A whole training run on a network, an optimizer and a data set's two splits.

    Make it, `plan_without_data()` to refuse a budget too small before the data is
    touched, `use_data()`, optionally `restore()`, then `run()`.
    """

    def __init__(self, network, optimizer, budget: int, epochs: int, batch_size: int,
                 seed: int = 0, limit: int | None = None, test_count: int | None = None,
                 train_sample: int = TRAIN_SAMPLE, checkpointing: Checkpointing | None = None,
                 recorded_plan: dict | None = None, settings: Settings | None = None,
                 locks: list | None = None, augmentation: Augmentation = NO_AUGMENTATION,
                 lr_schedule: str = "constant", warmup: float = 0.0, val_split: float = 0.0,
                 keep_best: bool = False, patience: int | None = None):
        """`val_split`: the share of the training images held out to measure each epoch
        by; `keep_best`: save the parameters of the epoch that measured best;
        `patience`: stop after this many epochs without a better one."""
        if (keep_best or patience) and not val_split:
            raise LowmemError("keeping the best epoch, or stopping when the epochs stop "
                              "improving, needs a share of the training images held out "
                              "for validation")
        self.network, self.optimizer, self.budget = network, optimizer, budget
        self.augmentation, self.lr_schedule, self.warmup = augmentation, lr_schedule, warmup
        self.val_split, self.keep_best, self.patience = val_split, keep_best, patience
        self.validation = self.training_sample = None  # Subsets, with a validation split
        self.best: dict | None = None  # {"epoch", "val_accuracy"} of the best epoch so far
        self._best_arrays: dict = {}  # its parameters and statistics, with keep_best
        self.epochs, self.batch_size, self.seed, self.limit = epochs, batch_size, seed, limit
        self.test_count, self.train_sample = test_count, train_sample
        self.checkpointing, self.recorded_plan = checkpointing, recorded_plan
        self.rng = np.random.default_rng(seed)
        self.history: list[dict] = []
        self.settings = settings  # recorded in checkpoints, when checkpointing
        self.loop: EpochLoop | None = None
        self.test = None
        self.plan = None
        # locks.RunLock: held until release_locks (start and resume take them)
        self.locks = [] if locks is None else locks
        # (epochs done, updates done in the next) of the last checkpoint written or resumed
        self._checkpointed: tuple | None = None

    # --- the memory plan ------------------------------------------------------------

    def _work(self, picture: str | None = None) -> Work:
        """The run as a piece of work to plan. Before the data is open its size is not
        known: it is taken as `limit`, or MNIST's, so that the minimum named is one the
        whole run can keep, and the batch buffers and what opening the data leaves are
        still to come."""
        opened = self.loop is not None
        count = self.loop.count if opened else (self.limit or MNIST_TRAIN_IMAGES)
        return Work("train", min(self.batch_size, count), read_buffers=0 if opened else 2,
                    index=2 * count if self.val_split else count, opening=not opened,
                    optimizer_copies=self.optimizer.state_copies, evaluations=True, saves=True,
                    keeps_best=self.keep_best, picture=picture, recorded=self.recorded_plan)

    def _plan(self, picture: str | None = None):
        from lowmem_cnn.memory.planner import plan_work

        self.plan = plan_work(self.network, self._work(picture), self.budget)
        return self.plan

    def plan_without_data(self, picture: str | None = None):
        """Refuse (planner.BudgetError) a budget too small for the run, or for drawing
        `picture` at its end, before any data is read or downloaded."""
        return self._plan(picture)

    def use_data(self, train_split, test_split):
        """Train on `train_split` (its first `limit` images), evaluate on `test_split`;
        plan with the real batch buffers."""
        check_image_shape(self.network, train_split, test_split)
        count = min(self.limit or len(train_split), len(train_split))
        indices = None
        if self.val_split:
            indices, held = held_out(count, self.val_split, self.seed)
            self.validation = Subset(train_split, held)
            self.training_sample = Subset(train_split, indices)
            count = len(indices)
        batch = min(self.batch_size, count)
        schedule = Schedule(self.lr_schedule, self.optimizer.lr, self.epochs, -(-count // batch),
                            self.warmup)
        self.loop = EpochLoop(self.network, self.optimizer, train_split, self.batch_size, self.rng,
                              self.limit, self.seed, indices, self.augmentation, schedule)
        self.batch_size = self.loop.batch_size  # at most the number of training images
        self.test = test_split
        if self.settings is not None:
            self.settings.train_images = self.loop.count
            self.settings.data = data_identity(train_split)
        # (the batch buffers exist now, and are in the baseline the plan measures)
        return self._plan()

    # --- checkpoints ------------------------------------------------------------------

    def checkpoint_state(self, finished: bool = False) -> tuple[dict, dict]:
        meta, arrays = self.loop.state()
        p = self.plan
        meta.update(run=asdict(self.settings), history=self.history, finished=finished,
                    plan={"micro_batch": p.micro_batch, "eval_micro_batch": p.eval_micro_batch,
                          "tiles": list(p.tiles), "threads": p.threads}, best=self.best)
        arrays.update({f"best/{key}": value for key, value in self._best_arrays.items()})
        return meta, arrays

    def save_checkpoint(self, finished: bool = False):
        from lowmem_cnn.files.checkpoint import write_checkpoint

        loop = self.loop
        if loop.position:  # within an epoch (an epoch's end is checked by _end_epoch)
            done = min(loop.position * loop.batch_size, loop.count)
            self._check_finite(loop.epochs_done + 1, loop.loss_sum / done)
        write_checkpoint(self.checkpointing.path, *self.checkpoint_state(finished))
        self.checkpointing._saved_at = time.monotonic()
        self._checkpointed = (loop.epochs_done, loop.position)

    def _check_finite(self, epoch: int, loss: float):
        """Diverged unless every parameter and statistic is a finite number. The min and
        max of an array are NaN if any value is, and +-inf if any is infinite: no array
        the size of a parameter is made (np.isfinite's would be)."""
        arrays = [*self.network.params().values(), *self.network.state().values()]
        if all(np.isfinite(a.min()) and np.isfinite(a.max()) for a in arrays if a.size):
            return
        if self.checkpointing is None:
            kept = ""
        elif self._checkpointed is None:
            kept = ", nor a checkpoint"
        else:
            done, position = self._checkpointed
            kept = (f"; {self.checkpointing.path} keeps the run "
                    + (f"in epoch {done + 1} after update {position}" if position
                       else f"after epoch {done}"))
        out = f"{self.settings.out} is not written" if self.settings else "nothing is saved"
        raise Diverged(f"training diverged in epoch {epoch} (loss {loss:.4g}): the parameters "
                       f"are no longer finite numbers, so {out}{kept} (a smaller --lr or "
                       "--weight-decay may help)")

    def _checkpoint_due(self) -> bool:
        c = self.checkpointing
        if c is None:
            return False
        if c.every_updates:
            return self.loop.position % c.every_updates == 0
        return time.monotonic() - c._saved_at >= CHECKPOINT_SECONDS

    def restore(self, meta: dict, arrays: dict):
        """Continue from a checkpoint's state (see checkpoint_state)."""
        recorded = meta["run"]
        if self.loop.count != recorded["train_images"]:
            raise LowmemError(f"{self.checkpointing.path}: the run was started on "
                              f"{recorded['train_images']:,} training images, this data has "
                              f"{self.loop.count:,}")
        if recorded.get("data") and recorded["data"] != self.settings.data:
            raise LowmemError(f"{self.checkpointing.path}: the run was started on other data "
                              f"(fingerprint {recorded['data']}, this data's is {self.settings.data})")
        from lowmem_cnn.files.checkpoint import check_run_arrays

        check_run_arrays(self.checkpointing.path, meta, arrays, self)
        self.loop.restore(meta, arrays)
        self._checkpointed = (self.loop.epochs_done, self.loop.position)
        self.history = list(meta["history"])
        self.best = meta.get("best")
        self._best_arrays = {key.removeprefix("best/"): value for key, value in arrays.items()
                             if key.startswith("best/")}

    # --- running ------------------------------------------------------------------------

    @property
    def epochs_done(self) -> int:
        return self.loop.epochs_done

    def run(self, on_update=None, on_epoch=None, on_epoch_start=None, stop_requested=None):
        """Train the remaining epochs; return the history (one dict per epoch).

        on_epoch_start(epoch, images done) when an epoch starts or resumes;
        on_update(loss, images) after each update; on_epoch(record) after each epoch's
        evaluation. When stop_requested() turns true after an update, the checkpoint is
        written and Stopped is raised.
        """
        loop = self.loop
        while loop.epochs_done < self.epochs and not self.out_of_patience():
            epoch = loop.epochs_done + 1
            if on_epoch_start:
                on_epoch_start(epoch, min(loop.position * loop.batch_size, loop.count))
            for loss, n in loop.steps(self.plan):
                if on_update:
                    on_update(loss, n)
                if stop_requested and stop_requested():
                    self._stop()
                if self._checkpoint_due():
                    self.save_checkpoint()
            record = self._end_epoch(epoch)
            if on_epoch:
                on_epoch(record)
            if stop_requested and stop_requested():
                self._stop()
        return self.history

    def _end_epoch(self, epoch: int) -> dict:
        loss, seconds = self.loop.finish_epoch()
        if self.checkpointing is not None:  # (the book's Trainer saves nothing, as the book's)
            self._check_finite(epoch, loss)
        test = evaluate(self.network, self.test, self.plan, EVAL_READ, count=self.test_count)
        sample = evaluate(self.network, self.training_sample or self.loop.split, self.plan,
                          EVAL_READ, count=min(self.train_sample, self.loop.count))
        record = {"epoch": epoch, "loss": loss, "seconds": seconds,
                  "train_accuracy": sample.accuracy, "test_accuracy": test.accuracy,
                  "train_sample": sample.n, "test_sample": test.n}
        if self.validation is not None:
            validation = evaluate(self.network, self.validation, self.plan, EVAL_READ)
            record.update(val_accuracy=validation.accuracy, val_sample=validation.n)
            if self.best is None or validation.accuracy > self.best["val_accuracy"]:
                self.best = {"epoch": epoch, "val_accuracy": validation.accuracy}
                if self.keep_best:
                    self._keep_best()
        self.history.append(record)
        if self.checkpointing is not None:
            self.save_checkpoint()
        return record

    def _keep_best(self):
        """A copy of the parameters and statistics as they are (the plan counts it)."""
        arrays = {f"param/{k}": v for k, v in self.network.params().items()}
        arrays.update({f"state/{k}": v for k, v in self.network.state().items()})
        for key, value in arrays.items():
            if key in self._best_arrays:
                np.copyto(self._best_arrays[key], value)
            else:
                self._best_arrays[key] = value.copy()

    def out_of_patience(self) -> bool:
        """Whether `patience` epochs have passed since the best one."""
        return bool(self.patience and self.best
                    and self.loop.epochs_done - self.best["epoch"] >= self.patience)

    def _stop(self):
        if self.checkpointing is None:
            raise Stopped(self.loop.epochs_done + 1, self.loop.position, None)
        self.save_checkpoint()
        raise Stopped(self.loop.epochs_done + 1, self.loop.position, self.checkpointing.path)

    def finish(self, out: Path | None):
        """Save the parameters (the book's format) and mark the checkpoint finished.

        What only training needs is given back first (the optimizer state, the
        gradients, the workspaces; the last checkpoint on disk still has the state): the
        save makes a book-layout copy of the parameters, which the gradients' room
        holds, and pickle makes bytes of each array, which the plan counts (see _plan).
        Saving with all of it still held took a 128x128 RGB run 4.8 MiB over its plan
        and 0.3 MiB over --max-ram 512M.
        """
        from lowmem_cnn.files.params import save_params

        if self.keep_best and self._best_arrays:  # the best epoch's, not the last's
            for kind, arrays in (("param", self.network.params()), ("state", self.network.state())):
                for key, value in arrays.items():
                    np.copyto(value, self._best_arrays[f"{kind}/{key}"])
        self.release_memory()
        if out is not None:
            save_params(out, self.network, self._training_record())
        if self.checkpointing is not None:
            self.save_checkpoint(finished=True)  # the parameters, no optimizer state

    def _training_record(self) -> dict | None:
        """How the saved parameters were trained (params.TRAINING_FIELDS), and which
        pictures of a folder were held out for testing (params.SPLIT_FIELDS)."""
        from lowmem_cnn.training.run_options import DESCRIBED_OPTIONS

        s = self.settings
        if s is None:
            return None
        kept = self.best["epoch"] if self.keep_best and self.best else len(self.history)
        record = {option.name: getattr(s, option.name) for option in DESCRIBED_OPTIONS}
        record["epoch"] = max(kept, 1)
        if s.split_seed is not None:
            record.update(test_split=s.test_fraction, split_seed=s.split_seed)
        return record

    def release_memory(self):
        """Give back the optimizer state and the network's workspaces (e.g. before drawing)."""
        self.optimizer.state.clear()
        self.network.release_memory()

    def release_locks(self):
        """Let other runs have the checkpoint and the parameter file (the run is over, or
        stopped with its checkpoint written)."""
        from lowmem_cnn.common.locks import release_all

        release_all(self.locks)


class AlreadyFinished(Exception):
    """`resume` of a run that finished all its epochs; `settings` says where its
    parameters are."""

    def __init__(self, settings: Settings):
        super().__init__(f"the run finished all {settings.epochs} epochs")
        self.settings = settings


def _finished_or_unfinished(path: Path):
    """The metadata of a checkpoint at `path` (None if there is none)."""
    from lowmem_cnn.files.checkpoint import read_checkpoint

    if not path.exists():
        return None
    try:
        meta, _ = read_checkpoint(path)
    except LowmemError as err:
        raise LowmemError(f"{err}; remove it or choose another --checkpoint") from None
    return meta


def start(settings: Settings, checkpointing: Checkpointing, data, report=lambda text: None,
          picture: str | None = None):
    """A new run of `settings` on `data` (data.DataOptions) with its checkpoint:
    (TrainingRun, data set).

    The checkpoint and the parameter file are locked first (another live run on
    either is refused). A folder of pictures is opened next: it makes the network's
    input and scores. Then the budget is checked against the network before any
    array is allocated, and (IDX files) before the data is read or downloaded; with
    `picture`, room is left for drawing it at the end (planner.check_picture_room)."""
    from lowmem_cnn.files.config import load_config
    from lowmem_cnn.common.locks import RunLock, released_on_error

    with released_on_error() as locks:
        locks.append(RunLock(checkpointing.path, "checkpoint"))
        locks.append(RunLock(Path(settings.out), "parameter file"))
        meta = _finished_or_unfinished(checkpointing.path)
        if meta is not None and not meta.get("finished"):
            raise LowmemError(f"{checkpointing.path} holds an unfinished run: continue it with "
                              "--resume, or choose another --checkpoint")
        folder = None
        if data.is_folder():
            folder = data.open(settings.max_ram, load_config(settings.config).network.input_shape[1:])
            settings.input_shape, settings.classes = list(folder.input_shape), list(folder.classes)
            settings.test_fraction, settings.split_seed = folder.test_fraction, folder.seed
            settings.strict = data.strict
        return _build(settings, checkpointing, lambda run: folder or data.open(run.budget), report,
                      locks, picture)


def resume(checkpointing: Checkpointing, max_ram: int | None, data, report=lambda text: None,
           picture: str | None = None, given: dict | None = None):
    """The run recorded in a checkpoint, ready to continue where it stopped, with its
    settings and plan (a budget may be given anew), on `data` (data.DataOptions: a
    folder is read as the run began): (TrainingRun, data set). Raises AlreadyFinished
    for a run that is over. `given`: the settings the user gave again (see
    apply_given): the same as recorded, or more epochs."""
    from lowmem_cnn.memory.budget import check_threads, format_size
    from lowmem_cnn.files.checkpoint import check_run_meta, read_checkpoint
    from lowmem_cnn.common.locks import RunLock, released_on_error

    with released_on_error() as locks:
        locks.append(RunLock(checkpointing.path, "checkpoint"))
        meta, arrays = read_checkpoint(checkpointing.path)
        check_run_meta(checkpointing.path, meta)  # its run's fields are Settings', checked
        settings = Settings(**meta["run"])
        # before the network makes a workspace and gradients for each (its arithmetic
        # needs all of them: resume it where there are as many cores)
        check_threads(settings.threads, f"{checkpointing.path}: this run was started with --threads",
                      "resume it where it has as many")
        if meta.get("finished"):
            raise AlreadyFinished(settings)
        apply_given(settings, given or {}, report)
        if "out" not in (given or {}):
            _check_recorded_out(settings.out, checkpointing.path)
        if settings.classes is None and data.is_folder():  # told before anything is opened
            from lowmem_cnn.data.idx import data_directory

            directory, source = data_directory(data.data_dir)
            raise LowmemError(f"{source or directory} is a folder of pictures; this run was started "
                              "on MNIST-style IDX files: give their directory as --data-dir")
        locks.append(RunLock(Path(settings.out), "parameter file"))
        source = "recorded in the checkpoint"
        if max_ram is not None:
            settings.max_ram, source = max_ram, "--max-ram"
        report(f"budget: {settings.max_ram:,} bytes ({format_size(settings.max_ram)}, {source})")

        def open_data(run):
            if settings.classes is None:
                return data.open(run.budget)
            classes = ", ".join(settings.classes)
            if not data.is_folder():  # told before anything is opened (or downloaded)
                raise LowmemError(f"this run was started on a folder of pictures (classes {classes});"
                                  f" give it with --data-dir")
            c, h, w = settings.input_shape  # a folder, read as the run began
            recorded = replace(data, image_size=(h, w), test_fraction=settings.test_fraction,
                               split_seed=settings.split_seed or 0, strict=settings.strict)
            opened = recorded.open(run.budget, (h, w), c)
            settings.split_seed = opened.seed  # (a checkpoint from before split_seed)
            if list(opened.classes) != settings.classes:
                raise LowmemError(f"{opened.source}: not the folder of classes {classes} the run "
                                  f"was started on")
            return opened

        return _build(settings, checkpointing, open_data, report, locks, picture, meta, arrays)


def _check_recorded_out(out: str, checkpoint: Path):
    """A checkpoint is shared like a parameter file, so the parameter file it names is
    written only where the user works: below the current folder or the checkpoint's."""
    target = Path(out).resolve()
    if not any(target.is_relative_to(place) for place in (Path.cwd().resolve(),
                                                          Path(checkpoint).resolve().parent)):
        raise LowmemError(f"{checkpoint}: its run saves its parameters to {out}, outside this "
                          "folder and the checkpoint's: give --out to say where")


# What `given` (resume) may hold besides the declared options: the settings of the data
# a folder is read with, which a run on IDX files does not have (as a new run ignores them).
_FOLDER_SETTINGS = ("test_fraction", "image_size")


def apply_given(settings: Settings, given: dict, report=lambda text: None):
    """The settings given again to a resumed run (`given`: Settings field -> (the option
    as the user names it, the value as Settings holds it; "image_size": [H, W])): each
    must be the recorded one, except that a declared option that `extends` (epochs) may
    be larger when the rate does not depend on it (a constant schedule); it is then
    applied, and said. Anything else is refused in one line naming each option."""
    def shown(value):
        if isinstance(value, list):  # image_size
            return "x".join(map(str, value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    contradictions = []
    for name, (flag, value) in given.items():
        recorded = (settings.input_shape[1:] if settings.input_shape else None
                    ) if name == "image_size" else getattr(settings, name)
        if recorded is None and name in _FOLDER_SETTINGS:
            continue  # a run on IDX files: as a new run, it has no use for them
        if name == "out":  # where the parameters go is the user's to say, not the run's
            if Path(value) != Path(recorded):
                report(f"--resume: saving to {value} (the checkpoint's run named {recorded})")
                settings.out = value
            continue
        if value == recorded:
            continue
        option = OPTIONS.get(name)
        if option and option.extends and value > recorded and settings.lr_schedule == "constant":
            report(f"--resume: {flag} {shown(value)} extends the run (the checkpoint's "
                   f"{shown(recorded)})")
            setattr(settings, name, value)
            continue
        why = ""
        if option and option.extends and value > recorded:
            why = f" (its {settings.lr_schedule} schedule is laid out over {shown(recorded)})"
        contradictions.append(f"{flag} {shown(value)} contradicts the checkpoint's "
                              f"{shown(recorded)}{why}")
    if contradictions:
        raise LowmemError(f"--resume: {'; '.join(contradictions)}; a resumed run keeps its "
                          "settings: leave these out, or start a new run with another --checkpoint")


def training_run(network, optimizer: str, lr: float, budget: int, epochs: int, batch_size: int,
                 optimizer_options: dict | None = None, weight_decay: float = 0.0,
                 **options) -> TrainingRun:
    """A training run on `network`, the one way both faces make one (`lowmem-cnn train`,
    through start and resume, and lowmem_cnn.book.Trainer): the optimizer is made by
    name and checked (optimizers.make_optimizer); `weight_decay` applies to the weights
    (W1, W2, ...: not the biases, nor batch normalization's gamma and beta).
    `options`: TrainingRun's."""
    from lowmem_cnn.engine.optimizers import make_optimizer

    weights = [key for key, _, name in network.param_names() if name == "W"]
    optimizer = make_optimizer(optimizer, lr, weight_decay, weights, **(optimizer_options or {}))
    return TrainingRun(network, optimizer, budget, epochs, batch_size, **options)


def _build(settings, checkpointing, open_data, report, locks, picture, meta=None, arrays=None):
    from lowmem_cnn.files.config import describe_network, load_config, network_from_description
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.memory.planner import check_parameters_fit

    if settings.network is not None:  # resumed: the network the run began with
        try:  # (its initial weights are not described: the checkpoint has the weights)
            config = network_from_description(settings.network)
        except ValueError as err:
            raise LowmemError(f"{checkpointing.path}: its network: {err}") from None
    else:
        config = load_config(settings.config).network
        if settings.classes is not None:
            config = config.for_data(settings.input_shape, settings.classes)
        settings.network = describe_network(config)
    network = Network(config, np.dtype(settings.dtype), settings.threads)
    run = training_run(network, settings.optimizer, settings.lr, settings.max_ram, settings.epochs,
                       settings.batch_size, seed=settings.seed, limit=settings.limit,
                       checkpointing=checkpointing, recorded_plan=meta["plan"] if meta else None,
                       settings=settings, locks=locks, weight_decay=settings.weight_decay,
                       augmentation=Augmentation.parse(settings.augment),
                       lr_schedule=settings.lr_schedule, warmup=settings.warmup,
                       val_split=settings.val_split, keep_best=settings.keep == "best",
                       patience=settings.patience)
    # before any parameter exists (the optimizer's state copies them)
    check_parameters_fit(network, settings.max_ram, run.optimizer.state_copies)
    try:  # what the parameter file will say, refused now rather than after training
        network_from_description(settings.network)
    except ValueError as err:
        raise LowmemError(f"{config.name}: cannot be described beside its parameter file: "
                          f"{err}") from None
    network.init_params(run.rng)
    run.plan_without_data(picture)
    data = open_data(run)
    run.use_data(data.train, data.test)
    if meta is not None:
        run.restore(meta, arrays)
    return run, data
