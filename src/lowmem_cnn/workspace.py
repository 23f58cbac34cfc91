"""Arrays kept from one micro-batch to the next.

A fresh large array costs a page fault for every 4 KiB page when it is first written
(large blocks are mapped one by one, see budget.map_large_arrays): about a third of a
training epoch, measured. So the layers take their large arrays from a Workspace, one
per thread, that hands back the same memory on every call. The planner counts each
workspace array as held for the whole run.
"""

import math

import numpy as np


class Workspace:
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

    def clear(self):
        self._arrays.clear()
