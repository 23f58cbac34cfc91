"""Augmentation: training pictures changed a little each time they are seen.

It works on the uint8 rows of a batch, in the batch's own buffer, as the reader has
read them: nothing is held besides one picture's rows. Its randomness comes from a
Generator seeded by the run's seed, the epoch and the update, so a resumed run
draws the same changes as one that was never stopped, whichever thread reads.

- flip: each picture is mirrored left to right with probability 1/2 (not for digits:
  a mirrored 2 is no digit);
- crop:P: zero padding of P pixels on each side, then a random crop of the picture's
  size: the picture moves by up to P pixels each way, and the uncovered border is 0.
"""

from dataclasses import dataclass

import numpy as np

from lowmem_cnn.common.errors import LowmemError

# Mixed into the seed of an update's Generator, so that its draws are not the dropout's.
AUGMENT_KEY = 0x617567


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    crop: int = 0  # pixels of padding

    @classmethod
    def parse(cls, text: str | None) -> "Augmentation":
        """'flip,crop:4' (any order; '' or 'none': nothing)."""
        flip, crop = False, 0
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            name, _, value = part.partition(":")
            if name == "none" and not value:
                continue
            if name == "flip" and not value:
                flip = True
            elif name == "crop" and value.isdigit() and 0 < int(value) <= 64:
                crop = int(value)
            else:
                raise LowmemError(f"augmentation {part!r}: use flip, crop:P (P pixels, 1 to 64) "
                                  "or none, separated by commas")
        return cls(flip, crop)

    def __str__(self) -> str:
        parts = (["flip"] if self.flip else []) + ([f"crop:{self.crop}"] if self.crop else [])
        return ",".join(parts) or "none"

    def __bool__(self) -> bool:
        return self.flip or bool(self.crop)

    def apply(self, rows: np.ndarray, shape, key) -> None:
        """Change the pictures of `rows` (n, C*H*W uint8) in place; `shape` is (C, H, W),
        `key` the update's place in the run (seed, epoch, update)."""
        if not self:
            return
        c, h, w = shape
        pictures = rows.reshape(len(rows), c, h, w)
        rng = np.random.default_rng([AUGMENT_KEY, *key])
        if self.flip:
            for i in np.flatnonzero(rng.random(len(pictures)) < 0.5):
                pictures[i] = pictures[i, :, :, ::-1]  # NumPy copies an overlapping view first
        if self.crop:
            p = self.crop
            for picture, (dy, dx) in zip(pictures, rng.integers(-p, p + 1, (len(pictures), 2)),
                                         strict=True):
                _move(picture, int(dy), int(dx))


NO_AUGMENTATION = Augmentation()


def _move(picture: np.ndarray, dy: int, dx: int) -> None:
    """Move a (C, H, W) picture down by dy and right by dx (negative: up, left); what
    comes in at the edges is 0."""
    c, h, w = picture.shape
    if abs(dy) >= h or abs(dx) >= w:
        picture[:] = 0
        return
    target = picture[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
    source = picture[:, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    target[:] = source  # overlapping: NumPy copies the source first
    if dy > 0:
        picture[:, :dy] = 0
    elif dy < 0:
        picture[:, h + dy :] = 0
    if dx > 0:
        picture[:, :, :dx] = 0
    elif dx < 0:
        picture[:, :, w + dx :] = 0
