"""Benchmark: lowmem-cnn against PyTorch and a book-style NumPy baseline, in one run.

For each budget: one training epoch (a child process: `lowmem-cnn train --epochs 1`)
and one evaluation of the 10,000 test images (`lowmem-cnn eval --batch-size 10000`).
With --torch-python, the same network in PyTorch (scripts/torch_baseline.py) runs
alternately with lowmem-cnn, --repeats times. With --book, the book-style baseline
(scripts/book_baseline.py) runs once. With --scale-dir, a training epoch on that
data set (e.g. 600,000 images from scripts/make_big_mnist.py) is compared with training
on the normal data set for as many epochs as make the same number of images. Peak RSS
is what the OS reports for each child (wait4); seconds are those the programs measure
(epoch, evaluation), medians over the repeats.

    python scripts/bench.py --max-ram 64M --max-ram 2G --torch-python venv/bin/python \\
        --book --repeats 3 --data-dir DIR [--config deep_convnet]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def measured(command):
    """Run `command`, returning (its JSON, its peak RSS in bytes from wait4)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = child.stdout.read()
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def lowmem(*args):
    return [sys.executable, "-m", "lowmem_cnn", *args]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-ram", action="append", default=[], help="budget (repeatable)")
    parser.add_argument("--data-dir", required=True, help="directory of the MNIST IDX files")
    parser.add_argument("--torch-python", help="a Python that has torch")
    parser.add_argument("--book", action="store_true", help="also run the book-style baseline")
    parser.add_argument("--scale-dir", help="a larger data set to compare a training epoch on")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scale-repeats", type=int, default=1,
                        help="times to alternate the --scale-dir comparison")
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    parser.add_argument("--config", default="simple_convnet",
                        help="network config for lowmem-cnn and PyTorch alike (the book-style "
                             "baseline is SimpleConvNet only)")
    parser.add_argument("--eval-batch", type=int, default=1000,
                        help="PyTorch's test images per forward pass (0: all at once)")
    options = parser.parse_args()
    budgets = options.max_ram or ["2G"]
    limit = ["--limit", str(options.limit)] if options.limit else []
    config = ["--config", options.config]
    samples = {}

    def add(name, **values):
        for key, value in values.items():
            samples.setdefault(name, {}).setdefault(key, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(options.repeats):
            for budget in budgets:
                params = os.path.join(tmp, f"params-{budget}.pkl")
                trained, train_peak = measured(lowmem(
                    "train", "--epochs", "1", "--max-ram", budget, "--out", params, "--json",
                    "--data-dir", options.data_dir, *limit, *config))
                evaluated, eval_peak = measured(lowmem(
                    "eval", params, "--batch-size", "10000", "--max-ram", budget, "--json",
                    "--data-dir", options.data_dir, *config))
                add(f"lowmem-cnn {budget}", epoch=trained["seconds_per_epoch"][0],
                    eval=evaluated["seconds"], train_peak=train_peak, eval_peak=eval_peak,
                    accuracy=trained["test_accuracy"])
            if options.torch_python:
                result, peak = measured([options.torch_python, os.path.join(HERE, "torch_baseline.py"),
                                         options.data_dir, *limit, *config, "--eval-batch",
                                         str(options.eval_batch)])
                add("PyTorch", epoch=result["epoch_seconds"], eval=result["eval_seconds"],
                    train_peak=peak, eval_peak=peak, accuracy=result["test_accuracy"])
        if options.book and options.config == "simple_convnet":
            result, peak = measured([sys.executable, os.path.join(HERE, "book_baseline.py"),
                                     options.data_dir, *limit])
            add("book-style NumPy", epoch=result["epoch_seconds"], eval=result["eval_seconds"],
                train_peak=peak, eval_peak=peak, accuracy=result["test_accuracy"])
        if options.scale_dir:
            # The same number of images through both, so that both runs are long and
            # see the same machine: one epoch of the larger set, as many epochs of the
            # normal one as make the same count; alternated --scale-repeats times.
            params = os.path.join(tmp, "scale.pkl")
            for _ in range(options.scale_repeats):
                big, peak = measured(lowmem(
                    "train", "--epochs", "1", "--max-ram", budgets[-1], "--out", params, "--json",
                    "--data-dir", options.scale_dir, *config))
                add("scale scaled", epoch=sum(big["seconds_per_epoch"]), train_peak=peak,
                    images=big["train_images"])
                epochs = max(1, round(big["train_images"] / trained["train_images"]))
                small, peak = measured(lowmem(
                    "train", "--epochs", str(epochs), "--max-ram", budgets[-1], "--out", params,
                    "--json", "--data-dir", options.data_dir, *config))
                add("scale 60k", epoch=sum(small["seconds_per_epoch"]), train_peak=peak,
                    images=small["train_images"] * epochs)

    median = {name: {k: statistics.median(v) for k, v in values.items()}
              for name, values in samples.items()}
    print(f"repeats: {options.repeats}; seconds are medians; peak RSS from the OS")
    print(f"{'run':<20}{'epoch s':>9}{'eval s':>9}{'train peak MiB':>16}{'eval peak MiB':>15}"
          f"{'test acc':>10}")
    for name, m in median.items():
        if name.startswith("scale"):
            continue
        print(f"{name:<20}{m['epoch']:>9.2f}{m['eval']:>9.2f}{m['train_peak'] / 2**20:>16.1f}"
              f"{m['eval_peak'] / 2**20:>15.1f}{m['accuracy']:>10.4f}")
    torch = median.get("PyTorch")
    if torch:
        print("ratios to PyTorch (lowmem-cnn / PyTorch):")
        for name, m in median.items():
            if name.startswith("lowmem"):
                print(f"  {name:<18} epoch {m['epoch'] / torch['epoch']:.2f}  eval "
                      f"{m['eval'] / torch['eval']:.2f}  training peak RSS "
                      f"{m['train_peak'] / torch['train_peak']:.3f}")
    if "scale 60k" in median:
        small, big = median["scale 60k"], median["scale scaled"]
        print(f"scaling, --max-ram {budgets[-1]}: {small['images']:,.0f} images (several epochs): "
              f"{small['epoch']:.2f} s, {small['train_peak'] / 2**20:.1f} MiB; "
              f"{big['images']:,.0f} images: {big['epoch']:.2f} s, {big['train_peak'] / 2**20:.1f} MiB; "
              f"peak ratio {big['train_peak'] / small['train_peak']:.3f}, time per image ratio "
              f"{(big['epoch'] / big['images']) / (small['epoch'] / small['images']):.3f}")


if __name__ == "__main__":
    main()
