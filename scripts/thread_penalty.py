"""What sharing the interpreter costs: one training micro-batch's time alone, beside
the same work on a second thread of the process (as `train` runs it), and beside it in a
second process.

Each measurement runs micro-batches of --images real MNIST images (forward, loss,
backward, as Network.accumulate_gradient runs one) over and over on the main loop's
thread for --seconds, with the partner doing the same meanwhile; the three kinds
alternate for --rounds rounds. Printed per kind, medians of the rounds' medians: the
wall time, the thread's user CPU time, and its voluntary context switches, which on
two threads are mostly waits for the GIL. Both threads run one network's layers, as
`train` runs them (hence Network._gradient, a micro-batch as accumulate_gradient runs
it on one thread, with the tiles of the plan for --max-ram; the two threads are this
script's, whatever threads the plan would use). Linux only (per-thread resource usage).

    python scripts/thread_penalty.py --config deep_convnet --rounds 5
    py-spy record --native --format raw -o profile.txt -- \\
        python scripts/thread_penalty.py --only alone --rounds 1 --seconds 20
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy (see lowmem_cnn/__init__)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

from lowmem_cnn.memory.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.files.config import load_config  # noqa: E402
from lowmem_cnn.data.idx import open_directory  # noqa: E402
from lowmem_cnn.engine.model import Network  # noqa: E402
from lowmem_cnn.memory.planner import Plan, make_plan  # noqa: E402
from lowmem_cnn.engine.workspace import Context  # noqa: E402

KINDS = ("alone", "thread partner", "process partner")


@dataclass
class Work:
    net: Network
    images: np.ndarray  # 2 micro-batches of pixels, one a thread
    labels: np.ndarray
    m: int  # images a micro-batch
    plan: Plan  # its tiles


def micro_batches(work: Work, thread: int, stop: threading.Event, out: list):
    """Micro-batches on `thread`'s workspace and gradient set until `stop`; (wall, user
    CPU, voluntary switches) of each appended to `out`."""
    net, images, labels, m = work.net, work.images, work.labels, work.m
    sums = net._gradient_sets()[thread]
    tiles = net.tile_map(work.plan.tiles)
    part = slice(m * thread, m * (thread + 1))
    while not stop.is_set():
        before, began = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        sums.restart()
        noise = np.random.default_rng([thread]) if net.draws_noise else None
        ctx = Context(net.workspaces[thread], True, tiles, noise, 2 * m, sums.statistics)
        net._gradient(images[part], labels[part], ctx, sums.layer_grads)
        wall, after = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_THREAD)
        out.append((wall, after.ru_utime - before.ru_utime, after.ru_nvcsw - before.ru_nvcsw))


def setup(options) -> Work:
    map_large_arrays()  # as the commands do
    net = Network(load_config(options.config).network, np.float32, threads=2)
    net.init_params(np.random.default_rng(0))
    m = options.images
    plan = make_plan(net, parse_size(options.max_ram), 0, True, 2 * m, 0, evaluations=False)
    data = open_directory(Path(options.data_dir))
    return Work(net, data.train.images.read_range(0, 2 * m),
                data.train.labels[: 2 * m].astype(np.int64), m, plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--max-ram", default="2G", help="the budget the tiles are planned for")
    parser.add_argument("--images", type=int, default=50, help="images a micro-batch")
    parser.add_argument("--seconds", type=float, default=2.5, help="length of a measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=KINDS, help="measure this kind alone (e.g. to profile it)")
    parser.add_argument("--partner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=os.environ.get("LOWMEM_CNN_DATA", "../shared/data/mnist"))
    options = parser.parse_args()
    work = setup(options)
    if options.partner:  # the second process: micro-batches until its stdin closes
        stop = threading.Event()
        worker = threading.Thread(target=micro_batches, args=(work, 1, stop, []))
        worker.start()
        print("ready", flush=True)
        sys.stdin.read()
        stop.set()
        worker.join()
        return
    kinds = [options.only] if options.only else KINDS
    results = {kind: [] for kind in kinds}
    for _ in range(options.rounds):
        for kind in kinds:
            stop, out, partner = threading.Event(), [], None
            if kind == "process partner":
                partner = subprocess.Popen([sys.executable, __file__, "--partner", *sys.argv[1:]],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                partner.stdout.readline()
            elif kind == "thread partner":
                partner = threading.Thread(target=micro_batches, args=(work, 1, stop, []))
                partner.start()
            main_loop = threading.Thread(target=micro_batches, args=(work, 0, stop, out))
            main_loop.start()
            began = time.monotonic()
            while time.monotonic() - began < options.seconds or len(out) < 3:
                time.sleep(0.05)  # a script's wait, not a test's: the samples decide the end
            stop.set()
            main_loop.join()
            if isinstance(partner, threading.Thread):
                partner.join()
            elif partner is not None:
                partner.stdin.close()
                partner.wait()
            steady = out[1:]  # the first may overlap the partner's start
            results[kind].append([statistics.median(x[i] for x in steady) for i in range(3)])
    print(f"{options.config}, micro-batches of {options.images} images, medians of {options.rounds} "
          f"rounds (ms; switches)")
    for kind, rows in results.items():
        wall, user, switches = (statistics.median(column) for column in zip(*rows, strict=True))
        print(f"  {kind:<16} wall {1e3 * wall:6.1f}  user CPU {1e3 * user:6.1f}  "
              f"voluntary switches {switches:4.0f}   (walls: "
              + " ".join(f"{1e3 * row[0]:.1f}" for row in rows) + ")")


if __name__ == "__main__":
    main()
