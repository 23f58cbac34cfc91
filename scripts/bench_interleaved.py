"""Training speed of lowmem-cnn against PyTorch under the same machine load: both keep
training, in segments of a few batches that alternate.

bench.py alternates whole epochs, 20 to 40 s each; on a shared machine whose speed
moves by 20% within minutes, one of two neighbouring epochs can get a quiet spell the
other did not. Here the two take turns every --segment batches, in the order
lowmem-cnn, PyTorch, PyTorch, lowmem-cnn (so that a drift in speed falls on both
alike), for --rounds rounds: the ratio of their total times compares the same minutes.

lowmem-cnn trains as `lowmem-cnn train --config CONFIG` does (training.run.training_run:
the plan for --max-ram, the next batch read from the IDX file while one is computed,
and the config's whole [training] table: optimizer, rate, batch, and for a recipe such
as photos its augmentation, weight decay and learning-rate schedule over its epochs);
PyTorch as `scripts/torch_baseline.py --recipe CONFIG` does (the data in memory as
tensors, the same recipe), in a child process that waits between its segments (with
--serve). Only the batches are timed: no evaluation, no process start.

    python scripts/bench_interleaved.py --torch-python TORCHVENV/bin/python \\
        --config deep_convnet --max-ram 2G --segment 50 --rounds 8 --data-dir DIR
    python scripts/bench_interleaved.py --torch-python TORCHVENV/bin/python \\
        --config photos --max-ram 2G --data-dir /usr/share/datasets/fashion-mnist
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy (see lowmem_cnn/__init__)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

from lowmem_cnn import default_threads  # noqa: E402
from lowmem_cnn.data.augment import Augmentation  # noqa: E402
from lowmem_cnn.memory.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.files.config import load_config  # noqa: E402
from lowmem_cnn.data.idx import open_directory  # noqa: E402
from lowmem_cnn.engine.model import Network  # noqa: E402
from lowmem_cnn.memory.planner import check_parameters_fit  # noqa: E402
from lowmem_cnn.training.run import training_run  # noqa: E402


class LowmemRun:
    """A lowmem-cnn training run, advanced a number of updates at a time: the run
    `lowmem-cnn train --config CONFIG --max-ram BUDGET --data-dir DIR` makes (its
    Settings from the config's [training] table, as cli.train fills them, made into a
    run as training.starting._build does), without the evaluations between epochs."""

    def __init__(self, config_name, budget, data_dir, epochs=None, limit=None):
        """`epochs`, `limit`: as train's --epochs and --limit (default: the config's, all)."""
        config = load_config(config_name)
        training = config.training
        network = Network(config.network, np.float32, default_threads())
        self.run = training_run(network, training.optimizer, training.lr, budget,
                                epochs or training.epochs, training.batch_size, seed=0, limit=limit,
                                weight_decay=training.weight_decay,
                                augmentation=Augmentation.parse(training.augment),
                                lr_schedule=training.lr_schedule, warmup=training.warmup)
        check_parameters_fit(network, budget, self.run.optimizer.state_copies)
        network.init_params(self.run.rng)
        self.run.plan_without_data()
        data = open_directory(Path(data_dir))
        self.plan = self.run.use_data(data.train, data.test)
        self.described = f"{self.plan.threads} threads x {self.plan.micro_batch} images"
        recipe = [f"{training.optimizer} lr {training.lr}, batches of {self.run.batch_size}"]
        if training.lr_schedule != "constant":
            recipe.append(f"{training.lr_schedule} schedule over {self.run.epochs} epochs"
                          + (f" after {training.warmup:g} warm-up" if training.warmup else ""))
        if training.weight_decay:
            recipe.append(f"weight decay {training.weight_decay:g}")
        if Augmentation.parse(training.augment):
            recipe.append(f"augmented ({Augmentation.parse(training.augment)})")
        self.recipe = ", ".join(recipe)
        self.steps = self.run.loop.steps(self.plan)

    def train(self, batches: int) -> float:
        began = time.perf_counter()
        for _ in range(batches):
            if next(self.steps, None) is None:  # the epoch is over: the next one
                self.run.loop.finish_epoch()
                self.steps = self.run.loop.steps(self.plan)
                next(self.steps)
        return time.perf_counter() - began


class TorchChild:
    """scripts/torch_baseline.py --serve in a child process."""

    def __init__(self, python, config_name, data_dir):
        self.child = subprocess.Popen(
            [python, str(HERE / "torch_baseline.py"), data_dir, "--recipe", config_name, "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.child.stdout.readline().strip() != "ready":
            sys.exit("torch_baseline.py --serve did not start")

    def train(self, batches: int) -> float:
        self.child.stdin.write(f"{batches}\n")
        self.child.stdin.flush()
        return float(self.child.stdout.readline())

    def close(self):
        self.child.stdin.close()
        self.child.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python that has torch")
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--max-ram", default="2G")
    parser.add_argument("--segment", type=int, default=50, help="batches a turn")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of four turns")
    parser.add_argument("--data-dir", default=os.environ.get("LOWMEM_CNN_DATA", "../shared/data/mnist"))
    options = parser.parse_args()
    map_large_arrays()  # as the commands do
    ours = LowmemRun(options.config, parse_size(options.max_ram), options.data_dir)
    theirs = TorchChild(options.torch_python, options.config, options.data_dir)
    ours.train(5)  # warm: workspaces, first BLAS calls, PyTorch's first passes
    theirs.train(5)
    times = {"lowmem-cnn": [], "PyTorch": []}
    n = options.segment
    print(f"{options.config} ({ours.recipe}), lowmem-cnn --max-ram {options.max_ram} "
          f"({ours.described}); ms per batch, each round")
    for r in range(options.rounds):
        for name, side in (("lowmem-cnn", ours), ("PyTorch", theirs), ("PyTorch", theirs),
                           ("lowmem-cnn", ours)):
            times[name].append(side.train(n))
        print(f"  round {r + 1}: lowmem-cnn {1e3 * sum(times['lowmem-cnn'][-2:]) / (2 * n):6.1f}"
              f"  PyTorch {1e3 * sum(times['PyTorch'][-2:]) / (2 * n):6.1f}", flush=True)
    theirs.close()
    mine, torch_times = times["lowmem-cnn"], times["PyTorch"]
    pairs = [a / b for a, b in zip(mine, torch_times, strict=True)]
    print(f"lowmem-cnn {1e3 * sum(mine) / (len(mine) * n):.1f} ms per batch, PyTorch "
          f"{1e3 * sum(torch_times) / (len(torch_times) * n):.1f}: ratio {sum(mine) / sum(torch_times):.3f}"
          f" (turns' ratios: median {statistics.median(pairs):.3f}, "
          f"from {min(pairs):.3f} to {max(pairs):.3f})")


if __name__ == "__main__":
    main()
