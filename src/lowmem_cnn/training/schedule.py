"""Learning-rate schedules: the rate of each update, from where the update is in the run.

A schedule is a function of (epoch, update) alone, so a resumed run takes the same
rates as one that was never stopped.

- constant: the configured rate throughout (today's arithmetic);
- cosine: after `warmup` epochs (at most half the run) of a linear rise from
  rate / (warmup updates), the rate falls along half a cosine to 0 at the last update;
- step: the rate, divided by 10 at half the epochs and again at three quarters.
"""

import math
from dataclasses import dataclass

from lowmem_cnn.common.errors import LowmemError

SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    kind: str
    lr: float
    epochs: int
    updates_per_epoch: int
    warmup: float = 0.0  # epochs

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise LowmemError(f"learning-rate schedule {self.kind!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup:
            raise LowmemError(f"warmup of {self.warmup} epochs is not a number >= 0")

    def rate(self, epoch: int, update: int) -> float:
        """The rate of update `update` (0-based) of epoch `epoch` (0-based)."""
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            passed = (epoch >= self.epochs / 2) + (epoch >= self.epochs * 3 / 4)
            return self.lr * 0.1**passed
        step = epoch * self.updates_per_epoch + update  # cosine
        total = self.epochs * self.updates_per_epoch
        # at most half the run: a recipe's warm-up must not take all of a short run
        warm = round(min(self.warmup, self.epochs / 2) * self.updates_per_epoch)
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
