"""Training batches of this tree against a git revision's, alternated in one process.

Both networks (same config, same weights, same plan for the budget) run the same
mini-batches of real MNIST, batches of 100 on --threads threads as `lowmem-cnn train`
runs them (without its data reading and optimizer), in rounds that alternate, so that
both see the same machine load. Prints each round's milliseconds per batch, the median
ratio of the rounds (this tree / the revision), and the process CPU time per batch,
which moves less with what other programs do than the wall time. The last loss of each
must agree: the arithmetic is the same.

    python scripts/compare_revision.py HEAD --config deep_convnet --rounds 6
"""

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy (see lowmem_cnn/__init__)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from lowmem_cnn.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.data import open_directory  # noqa: E402
from profile_layers import load_revision  # noqa: E402


def network(package: str, config: str, threads: int, budget: int):
    load_config = importlib.import_module(package + ".config").load_config
    model = importlib.import_module(package + ".model")
    planner = importlib.import_module(package + ".planner")
    net = model.Network(load_config(config).network, np.float32, threads=threads)
    net.init_params(np.random.default_rng(0))
    planner.make_plan(net, budget, 0, True, 100, 0, evaluations=False)
    return net


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--max-ram", default="2G", help="budget both plans are made for")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="batches of 100 a round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--data-dir", default=os.environ.get("LOWMEM_CNN_DATA", "../shared/data/mnist"))
    options = parser.parse_args()
    load_revision(options.revision)
    map_large_arrays()  # as the commands do
    data = open_directory(Path(options.data_dir))
    n = 100 * options.batches
    images = data.train.images.read_range(0, n)
    labels = data.train.labels[:n].astype(np.int64)
    budget = parse_size(options.max_ram)
    nets = {"this tree": network("lowmem_cnn", options.config, options.threads, budget),
            options.revision: network("lowmem_cnn_ref", options.config, options.threads, budget)}
    micro_batch = -(-100 // options.threads)
    wall = {name: [] for name in nets}
    cpu = {name: [] for name in nets}
    loss = {}
    for _ in range(options.rounds):
        for name, net in nets.items():
            net.accumulate_gradient(images[:100], labels[:100], micro_batch)  # warm
            began, cpu_began = time.perf_counter(), time.process_time()
            for b in range(0, n, 100):
                loss[name] = net.accumulate_gradient(images[b : b + 100], labels[b : b + 100],
                                                     micro_batch)
                net.grads()
            wall[name].append((time.perf_counter() - began) / options.batches * 1e3)
            cpu[name].append((time.process_time() - cpu_began) / options.batches * 1e3)
    print(f"{options.config}, {options.threads} threads, --max-ram {options.max_ram}: "
          f"ms per batch of 100, each round")
    for name in nets:
        print(f"{name:>12}: " + " ".join(f"{t:6.1f}" for t in wall[name])
              + f"   median {statistics.median(wall[name]):.1f}, CPU {statistics.median(cpu[name]):.1f},"
              f" last loss {loss[name]:.6f}")
    ours, theirs = wall["this tree"], wall[options.revision]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu["this tree"], cpu[options.revision], strict=True)]
    print(f"this tree / {options.revision}: median of the rounds {statistics.median(ratios):.3f} "
          f"(CPU time {statistics.median(cpu_ratios):.3f})")


if __name__ == "__main__":
    main()
