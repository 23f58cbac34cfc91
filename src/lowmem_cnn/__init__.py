"""lowmem-cnn: the book's convolutional networks trained and evaluated under a RAM budget."""

import os
import sys

__version__ = "0.1.0"

# lowmem-cnn runs micro-batches on several threads itself (--threads); a BLAS that
# also starts threads would oversubscribe the cores (measured: 3x slower). The BLAS
# reads these variables once, when NumPy is first imported, so set them before that
# unless the user chose otherwise.
BLAS_SINGLE_THREADED = "numpy" not in sys.modules
if BLAS_SINGLE_THREADED:
    for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
    BLAS_SINGLE_THREADED = os.environ["OPENBLAS_NUM_THREADS"] == "1"


def default_threads() -> int:
    """One thread per usable core when the BLAS can be made single-threaded (see
    blas.py), else one."""
    from lowmem_cnn.engine.blas import can_limit

    if not can_limit():
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1
