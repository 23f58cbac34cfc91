"""Scripts that import NumPy before lowmem_cnn (the book's do) still get one
single-threaded BLAS per lowmem-cnn thread, and their BLAS threads back after."""

import json
import subprocess
import sys

from conftest import need_module

SCRIPT = """
import json, os
import numpy as np  # first, as the book's scripts do: the BLAS starts its own threads
from threadpoolctl import threadpool_info
import lowmem_cnn
from lowmem_cnn import BLAS_SINGLE_THREADED, default_threads
from lowmem_cnn.files.config import load_config
from lowmem_cnn.engine.executor import run_shared
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import chosen_plan

def blas_threads():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

before = blas_threads()
network = Network(load_config().network, np.float32, 2)
network.init_params(np.random.default_rng(0))
inside = run_shared(network.pool, 2, lambda part, t: blas_threads(), [0, 1])
network.predict(np.zeros((10, 784), np.uint8), chosen_plan(network, 5, 2))
print(json.dumps({"env": BLAS_SINGLE_THREADED, "threads": default_threads(), "before": before,
                  "inside": inside, "after": blas_threads(), "cores": len(os.sched_getaffinity(0))}))
"""


def test_numpy_imported_first_gets_single_threaded_blas_and_its_threads_back():
    need_module("threadpoolctl")
    env = {"OPENBLAS_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}  # a BLAS with threads of its own
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["env"] is False  # too late to set the environment
    assert seen["threads"] == seen["cores"]  # yet one lowmem-cnn thread per core
    assert seen["before"] == seen["after"] == [2]  # the script's BLAS threads, given back
    assert seen["inside"] == [[1], [1]]  # while lowmem-cnn computes: one each
