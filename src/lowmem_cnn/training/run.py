"""A training run: its settings (what a checkpoint records), the memory plan, the epoch
loop, the evaluations after each epoch, the history, and (when given a checkpoint
file) checkpoints. The CLI's `train` (through starting.start and starting.resume) and
`lowmem_cnn.book.Trainer` both run one. Nothing here prints: a face passes callbacks
and reads the results.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.data.augment import NO_AUGMENTATION, Augmentation
from lowmem_cnn.memory.planner import EVAL_READ, MNIST_TRAIN_IMAGES, Work
from lowmem_cnn.training.epochs import EpochLoop
from lowmem_cnn.training.run_options import CHECKPOINT_SECONDS, RUN_OPTIONS
from lowmem_cnn.training.evaluation import check_image_shape, evaluate
from lowmem_cnn.training.schedule import Schedule

# Train accuracy after each epoch is measured on this many training images (the first ones).
TRAIN_SAMPLE = 10_000


# What a run is: recorded in its checkpoint, so that a resumed run is the same run. The
# training options' fields come from their declarations (run_options.RUN_OPTIONS, with
# their defaults); the others are the run's own.
Settings = make_dataclass("Settings", [
    ("config", str),
    ("dtype", str),
    *((option.name, option.kind, field(default=option.default)) for option in RUN_OPTIONS),
    ("limit", int | None, field(default=None)),
    ("out", str, field(default="params.pkl")),
    ("max_ram", int, field(default=0)),  # the budget in bytes
    ("threads", int, field(default=1)),
    ("train_images", int | None, field(default=None)),  # known once the data is open
    ("data", str | None, field(default=None)),  # data_identity of the training split
    # an image folder: the network's input (C, H, W), the class names, the split
    ("input_shape", list | None, field(default=None)),
    ("classes", list | None, field(default=None)),
    ("test_fraction", float | None, field(default=None)),
    ("split_seed", int | None, field(default=None)),  # a drawn split (folders.py): its seed
    ("strict", bool, field(default=False)),
    # the network trained, as its parameter file's description says it
    # (config.describe_network): a resumed run is this network whatever its config says now
    ("network", dict | None, field(default=None)),
])
Settings.__module__ = __name__


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
        self.validation = self.training_sample = None  # Splits of SubsetImages, with a validation split
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
            from lowmem_cnn.data.datasets import Split, SubsetImages

            indices, held = held_out(count, self.val_split, self.seed)
            self.validation = Split(SubsetImages(train_split.images, held), train_split.labels[held])
            self.training_sample = Split(SubsetImages(train_split.images, indices),
                                         train_split.labels[indices])
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
        from lowmem_cnn.files.checkpoint import network_arrays

        for key, value in network_arrays(self.network).items():
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
            from lowmem_cnn.files.checkpoint import network_arrays

            for name, value in network_arrays(self.network).items():
                np.copyto(value, self._best_arrays[name])
        self.release_memory()
        if out is not None:
            save_params(out, self.network, self._training_record())
        if self.checkpointing is not None:
            self.save_checkpoint(finished=True)  # the parameters, no optimizer state

    def _training_record(self) -> dict | None:
        """How the saved parameters were trained (description.TRAINING_FIELDS), and which
        pictures of a folder were held out for testing (description.SPLIT_FIELDS)."""
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


def data_identity(split) -> str:
    """A short fingerprint of a training split: its labels, its image shape and a few of
    its rows, so that a run is not resumed on other data of the same size."""
    images = split.images
    digest = hashlib.sha256(np.ascontiguousarray(split.labels).tobytes())
    digest.update(repr((len(split), images.channels, images.rows, images.cols)).encode())
    for index in np.linspace(0, len(split) - 1, num=min(16, len(split)), dtype=np.int64):
        digest.update(images.read(np.array([index])).tobytes())
    return digest.hexdigest()[:16]



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

