"""The BLAS's own threads.

lowmem-cnn runs micro-batches on its own threads, each with a single-threaded BLAS; a
BLAS that also starts threads oversubscribes the cores (measured: 3x slower). When
lowmem_cnn is imported before NumPy, the environment makes the BLAS single-threaded
(see __init__). A script that imported NumPy first (the book's scripts do) has a
BLAS whose threads are already started: then threadpoolctl, when installed (the
`threads` extra), limits it to one thread while lowmem-cnn computes, and gives the
script its threads back after. Without it lowmem-cnn runs on one thread.
"""

import contextlib

from lowmem_cnn import BLAS_SINGLE_THREADED

_controller = None


def _threadpool_controller():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController()  # finds the loaded BLAS: about 1.5 ms, once
    return _controller


def can_limit() -> bool:
    """Whether lowmem-cnn's threads each get a single-threaded BLAS."""
    return BLAS_SINGLE_THREADED or bool(_threadpool_controller())


def single_threaded():
    """A context in which the BLAS uses one thread (15 us to enter and leave, measured)."""
    if BLAS_SINGLE_THREADED or not _threadpool_controller():
        return contextlib.nullcontext()
    return _controller.limit(limits=1, user_api="blas")
