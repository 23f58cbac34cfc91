"""Benchmark: the book-style scripts on lowmem_cnn.book against the CLI, in one run.

Alternates, --repeats times, `lowmem-cnn train --epochs E` and scripts/book_train.py
(the book's Trainer, Adam lr 0.001, batch 100, 1,000 images evaluated per epoch), and
runs scripts/book_predict.py (predict on all 10,000 test images in one call) once.
Peak RSS is what the OS reports for each child (wait4; this script imports no NumPy,
so it adds nothing to the children's figure); seconds per epoch are the programs' own.

    python scripts/bench_book.py --data-dir DIR --params BOOK_PARAMS.pkl --epochs 1 --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def measured(command, env):
    """(the last stdout line, its peak RSS in bytes from wait4)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed")
    return out.strip().splitlines()[-1], usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--params", required=True, help="the book's simple_convnet_params.pkl")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    env = dict(os.environ, LOWMEM_CNN_DATA=os.path.abspath(options.data_dir))
    work = tempfile.mkdtemp()
    line, peak = measured([sys.executable, os.path.join(HERE, "book_predict.py"), options.params], env)
    print(f"book_predict.py: {line}; peak RSS {peak / 2**20:,.1f} MiB", flush=True)
    cli_epochs, book_epochs, cli_peaks, book_peaks, accuracies = [], [], [], [], []
    for repeat in range(options.repeats):
        out = os.path.join(work, f"cli{repeat}.pkl")
        line, peak = measured([sys.executable, "-m", "lowmem_cnn", "train", "--epochs",
                               str(options.epochs), "--out", out, "--json"], env)
        cli_epochs += json.loads(line)["seconds_per_epoch"]
        cli_peaks.append(peak)
        line, peak = measured([sys.executable, os.path.join(HERE, "book_train.py"),
                               str(options.epochs), os.path.join(work, f"book{repeat}.pkl")], env)
        result = json.loads(line)
        book_epochs += result["seconds_per_epoch"]
        book_peaks.append(peak)
        accuracies.append(result["test_accuracy"])
        print(f"repeat {repeat + 1}: cli epochs {cli_epochs[-options.epochs:]}, book epochs "
              f"{book_epochs[-options.epochs:]}, book test accuracy {result['test_accuracy']}",
              flush=True)
    cli, book = statistics.median(cli_epochs), statistics.median(book_epochs)
    print(json.dumps({
        "cli_epoch_median_s": round(cli, 3), "book_epoch_median_s": round(book, 3),
        "book_over_cli": round(book / cli, 3),
        "cli_peak_mib": round(max(cli_peaks) / 2**20, 1),
        "book_peak_mib": round(max(book_peaks) / 2**20, 1), "book_test_accuracy": accuracies}))


if __name__ == "__main__":
    main()
