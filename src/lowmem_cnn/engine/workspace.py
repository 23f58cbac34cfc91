"""Arrays kept from one micro-batch to the next, and what a layer's call is given.

A fresh large array costs a page fault for every 4 KiB page when it is first written
(large blocks are mapped one by one, see budget.map_large_arrays): about a third of a
training epoch, measured. So the layers take their arrays from a Workspace, one per
thread, that hands back the same memory on every call.

The same calls give the memory figure: a Recording workspace hands out arrays of the
shapes asked for that hold no memory, and the layers return as soon as they have
asked for their arrays (`ctx.dry`). What it recorded is what a real Workspace holds
after the same call (the planner counts it as held for the whole run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

# A tile size that covers everything: a layer given no tile works on the whole micro-batch.
WHOLE = 1 << 30


class Workspace:
    dry = False

    def __init__(self):
        self._arrays = {}

    def array(self, owner, name: str, shape, dtype) -> np.ndarray:
        """An uninitialised array of `shape`: the same memory on every call with this
        owner and name, reallocated only when a call needs more of it."""
        size = math.prod(shape)  # not np.prod: this runs some 40 times a micro-batch
        key = (id(owner), name)
        held = self._arrays.get(key)
        if held is None or held.size < size or held.dtype != dtype:
            # the old array goes before the larger one comes: a shared array grows
            # several times in a thread's first micro-batch, and the plan counts one
            held = self._arrays[key] = None
            held = self._arrays[key] = np.empty(size, dtype)
        return held[:size].reshape(shape)

    def held_bytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    def bytes_of(self, names) -> int:
        """Bytes of the arrays held under any of `names` (whatever their owner)."""
        return sum(array.nbytes for (_, name), array in self._arrays.items() if name in names)

    def clear(self):
        self._arrays.clear()


class Recording(Workspace):
    """Sees shapes only: records the largest size asked for under each owner and name,
    as a Workspace would hold it, and hands back an array of that shape whose values
    all share one element (no memory; not to be computed with)."""

    dry = True

    def __init__(self):
        super().__init__()
        self._sizes = {}

    def array(self, owner, name: str, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (id(owner), name)
        size = math.prod(shape)
        held_size, held_dtype = self._sizes.get(key, (0, dtype))
        if held_dtype != dtype or size > held_size:
            self._sizes[key] = (size, dtype)
        return as_strided(np.zeros(1, dtype), tuple(shape), (0,) * len(shape))

    def held_bytes(self) -> int:
        return sum(size * dtype.itemsize for size, dtype in self._sizes.values())

    def bytes_of(self, names) -> int:
        """Bytes of the arrays recorded under any of `names` (whatever their owner)."""
        return sum(size * dtype.itemsize for (_, name), (size, dtype) in self._sizes.items()
                   if name in names)

    def clear(self):
        self._sizes.clear()


@dataclass(frozen=True)
class Context:
    """What a layer's forward and backward are given besides the data: the thread's
    workspace, training or not, the plan's tile sizes (by layer), the Generator
    dropout draws its masks from (None: dropout scales, as at test time), the images
    of the whole mini-batch (training: batch statistics are weighted by it) and where
    the batch statistics go."""

    ws: Workspace = field(default_factory=Workspace)
    train: bool = False
    tiles: dict = field(default_factory=dict)  # id(layer) -> tile size
    dropout_rng: np.random.Generator | None = None  # (a string: numpy.random is not imported)
    batch_images: int = 0
    # id(layer) -> the thread's layers.Statistics of the layers that measure the batch
    statistics: dict | None = None

    @property
    def dry(self) -> bool:
        return self.ws.dry

    def tile(self, layer) -> int:
        return self.tiles.get(id(layer), WHOLE)
