"""What a training run's divergence check costs at each epoch's end
(training.TrainingRun._check_finite: the min and max of every parameter and statistic),
for each shipped network, against np.isfinite(array).all(), which makes a bool array the
size of each parameter.

    python scripts/finite_check_cost.py
"""

import time
from types import SimpleNamespace

import numpy as np

from lowmem_cnn.files.config import load_config, shipped_configs
from lowmem_cnn.engine.model import Network
from lowmem_cnn.training.run import TrainingRun

REPEATS = 50  # the fastest of this many is reported


def fastest(call) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best


for name in sorted(shipped_configs()):
    network = Network(load_config(name).network)
    network.init_params(np.random.default_rng(0))
    run = SimpleNamespace(network=network, checkpointing=None, settings=None, _checkpointed=None)
    arrays = [*network.params().values(), *network.state().values()]
    check = fastest(lambda run=run: TrainingRun._check_finite(run, 1, 0.0))
    isfinite = fastest(lambda arrays=arrays: all(np.isfinite(a).all() for a in arrays))
    print(f"{name}: {sum(a.size for a in arrays):,} values; the check {check * 1e3:.3f} ms, "
          f"np.isfinite {isfinite * 1e3:.3f} ms with a bool array of up to "
          f"{max(a.size for a in arrays):,} bytes")
