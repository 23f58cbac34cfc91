"""Training batches of this tree against a git revision's, alternated in one process.

Both networks (same config, same weights) run with one plan: this tree's plan for the
budget (its micro-batch, threads and tiles), given to each as its API takes it: a
revision since 6db8776 is handed the plan (Network.accumulate_gradient(images, labels,
plan)), an older one has the plan's tiles and threads written into its network and is
handed the micro-batch (accumulate_gradient(images, labels, micro_batch)), as its own
Plan.apply did. They run the same mini-batches of real MNIST, batches of 100 on
--threads threads as `lowmem-cnn train` runs them (without its data reading and
optimizer), in rounds that alternate, so that both see the same machine load. Prints
each round's milliseconds per batch, the median ratio of the rounds (this tree / the
revision), and the process CPU time per batch, which moves less with what other
programs do than the wall time. The last loss of each must agree: the arithmetic is the
same.

    python scripts/compare_revision.py HEAD --config deep_convnet --rounds 6
    python scripts/compare_revision.py 6db8776~1 --rounds 1 --batches 2   # the old API
"""

import argparse
import inspect
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

from lowmem_cnn.memory.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.data.idx import open_directory  # noqa: E402
from lowmem_cnn.memory.planner import make_plan  # noqa: E402
from profile_layers import load_revision, module  # noqa: E402


def network(package: str, config: str, threads: int):
    load_config = module(package, "config").load_config
    model = module(package, "model")
    net = model.Network(load_config(config).network, np.float32, threads=threads)
    net.init_params(np.random.default_rng(0))
    return net


def batch_runner(package: str, net, plan):
    """A function that runs one batch on `net` (accumulate_gradient, then the threads'
    gradients summed, as an update takes them) with `plan`'s micro-batch, threads and
    tiles, whichever API `net`'s revision has; it returns the mean loss."""
    api = list(inspect.signature(net.accumulate_gradient).parameters)[2]
    if api == "plan":  # since 6db8776: a plan is a value, handed to what runs it
        own = module(package, "planner").chosen_plan(
            net, plan.micro_batch, plan.threads, plan.tiles)

        def batch(images, labels):
            loss = net.accumulate_gradient(images, labels, own)
            net.grads(own)
            return loss

        return batch
    if api != "micro_batch":
        sys.exit(f"{package}: Network.accumulate_gradient takes {api!r} third, neither a plan "
                 "nor a micro-batch: an API this script does not know")
    # before 6db8776: the plan's tiles and threads are written into the network (as that
    # revision's Plan.apply did) and the micro-batch is handed to accumulate_gradient
    tiled = [layer for layer in net.layers if layer.kind in ("conv", "conv+pool")]
    for layer, size in zip(tiled, plan.tiles, strict=True):
        if layer.kind == "conv":
            layer.tile_rows = size
        else:
            layer.tile_images = size
    net.threads = plan.threads

    def batch(images, labels):
        loss = net.accumulate_gradient(images, labels, plan.micro_batch)
        net.grads()
        return loss

    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--max-ram", default="2G", help="budget the plan (both's) is made for")
    parser.add_argument("--threads", type=int, default=2, help="threads built (the plan may use fewer)")
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
    ours = network("lowmem_cnn", options.config, options.threads)
    plan = make_plan(ours, parse_size(options.max_ram), 0, True, 100, 0, evaluations=False)
    theirs = network("lowmem_cnn_ref", options.config, options.threads)
    batches = {"this tree": batch_runner("lowmem_cnn", ours, plan),
               options.revision: batch_runner("lowmem_cnn_ref", theirs, plan)}
    wall = {name: [] for name in batches}
    cpu = {name: [] for name in batches}
    loss = {}
    for _ in range(options.rounds):
        for name, batch in batches.items():
            batch(images[:100], labels[:100])  # warm
            began, cpu_began = time.perf_counter(), time.process_time()
            for b in range(0, n, 100):
                loss[name] = batch(images[b : b + 100], labels[b : b + 100])
            wall[name].append((time.perf_counter() - began) / options.batches * 1e3)
            cpu[name].append((time.process_time() - cpu_began) / options.batches * 1e3)
    print(f"{options.config}, --max-ram {options.max_ram}: plan of {plan.threads} threads x "
          f"{plan.micro_batch} images, tiles {plan.tiles}; ms per batch of 100, each round")
    for name in batches:
        print(f"{name:>12}: " + " ".join(f"{t:6.1f}" for t in wall[name])
              + f"   median {statistics.median(wall[name]):.1f}, CPU {statistics.median(cpu[name]):.1f},"
              f" last loss {loss[name]:.6f}")
    ours_wall, theirs_wall = wall["this tree"], wall[options.revision]
    ratios = [a / b for a, b in zip(ours_wall, theirs_wall, strict=True)]
    cpu_ratios = [a / b for a, b in zip(cpu["this tree"], cpu[options.revision], strict=True)]
    print(f"this tree / {options.revision}: median of the rounds {statistics.median(ratios):.3f} "
          f"(CPU time {statistics.median(cpu_ratios):.3f})")
    if f"{loss['this tree']:.6f}" != f"{loss[options.revision]:.6f}":
        sys.exit(f"the last losses differ: {loss['this tree']!r} against {loss[options.revision]!r}")


if __name__ == "__main__":
    main()
