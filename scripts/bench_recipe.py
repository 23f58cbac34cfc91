"""A recipe's whole training in lowmem-cnn and in PyTorch, one after the other: final
test accuracy, seconds per epoch and peak RSS of each, and their ratios (issue 19's
targets for photos on Fashion-MNIST: accuracy within 0.5 points, epoch time ratio at
most 1.25, peak RSS ratio at most 0.15).

lowmem-cnn runs `lowmem-cnn train --config RECIPE --max-ram BUDGET --json`; PyTorch
`scripts/torch_baseline.py DATA_DIR --recipe RECIPE` (2 threads; the same network, init,
augmentation, weight decay, schedule, epochs). Peak RSS is what the OS reports for each
child (wait4). Whole runs of 20 epochs do not see the same machine load: for the epoch
time ratio, scripts/bench_interleaved.py --config RECIPE is the fairer measure.

    python scripts/bench_recipe.py --torch-python TORCHVENV/bin/python --recipe photos \\
        --max-ram 2G --data-dir /usr/share/datasets/fashion-mnist
"""

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import lowmem, measured  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python that has torch")
    parser.add_argument("--recipe", default="photos")
    parser.add_argument("--max-ram", default="2G")
    parser.add_argument("--data-dir", required=True, help="directory of the four IDX files")
    parser.add_argument("--epochs", type=int, help="instead of the recipe's (quick checks)")
    parser.add_argument("--limit", type=int, help="train on the first N images (quick checks)")
    parser.add_argument("--order", choices=["lowmem-first", "torch-first"], default="lowmem-first")
    options = parser.parse_args()
    extra = (["--epochs", str(options.epochs)] if options.epochs else []) + (
        ["--limit", str(options.limit)] if options.limit else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "lowmem-cnn": lowmem("train", "--config", options.recipe, "--max-ram", options.max_ram,
                                 "--data-dir", options.data_dir, "--json", "--out",
                                 os.path.join(tmp, "params.pkl"), *extra),
            "PyTorch": [options.torch_python, os.path.join(HERE, "torch_baseline.py"),
                        options.data_dir, "--recipe", options.recipe, *extra],
        }
        names = list(runs) if options.order == "lowmem-first" else list(reversed(runs))
        for name in names:
            print(f"running {name}: {' '.join(runs[name])}", file=sys.stderr, flush=True)
            results[name] = measured(runs[name])
    rows = {}
    for name, (result, peak) in results.items():
        history = result["history"]
        rows[name] = {"epochs": [h["seconds"] for h in history],
                      "accuracy": [h["test_accuracy"] for h in history], "peak": peak}
    print(f"{options.recipe}, {len(rows['PyTorch']['epochs'])} epochs; peak RSS from the OS (wait4)")
    print(f"{'run':<12}{'test acc':>10}{'best acc':>10}{'epoch s, median':>17}{'total s':>9}"
          f"{'peak RSS MiB':>14}")
    for name, row in rows.items():
        print(f"{name:<12}{row['accuracy'][-1]:>10.4f}{max(row['accuracy']):>10.4f}"
              f"{statistics.median(row['epochs']):>17.2f}{sum(row['epochs']):>9.1f}"
              f"{row['peak'] / 2**20:>14.1f}")
    ours, theirs = rows["lowmem-cnn"], rows["PyTorch"]
    print("test accuracy per epoch:")
    for name, row in rows.items():
        print(f"  {name:<12}" + " ".join(f"{a:.4f}" for a in row["accuracy"]))
    points = 100 * (ours["accuracy"][-1] - theirs["accuracy"][-1])
    median = statistics.median(ours["epochs"]) / statistics.median(theirs["epochs"])
    print(f"lowmem-cnn - PyTorch: test accuracy {points:+.2f} points; epoch time ratio {median:.3f}"
          f" (medians; total {sum(ours['epochs']) / sum(theirs['epochs']):.3f}); peak RSS ratio "
          f"{ours['peak'] / theirs['peak']:.3f}")


if __name__ == "__main__":
    main()
