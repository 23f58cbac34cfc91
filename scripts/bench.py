"""Benchmark: one training epoch and one evaluation of all 10,000 test images per budget.

Each run is a child process; its peak RSS is what the OS reports for that child
(wait4), its seconds are the epoch time the run reports (training) or the wall time
of the whole command (evaluation).

    python scripts/bench.py --max-ram 128M --max-ram 2G [--data-dir DIR] [--limit N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_child(args):
    """(last stdout line as JSON, wall seconds, peak RSS bytes) of `lowmem-cnn args`."""
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "lowmem_cnn", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = child.stdout.read(), child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"lowmem-cnn {' '.join(args)} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1]), seconds, usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-ram", action="append", required=True, help="budget (repeatable)")
    parser.add_argument("--data-dir", help="directory of the IDX files")
    parser.add_argument("--limit", type=int, help="train on the first N images only")
    parser.add_argument("--dtype", default="float32")
    options = parser.parse_args()
    common = ["--dtype", options.dtype] + (["--data-dir", options.data_dir] if options.data_dir else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in options.max_ram:
            params = os.path.join(tmp, f"params-{budget}.pkl")
            train_args = ["train", "--epochs", "1", "--max-ram", budget, "--out", params, "--json"]
            train_args += ["--limit", str(options.limit)] if options.limit else []
            trained, _, train_peak = run_child(train_args + common)
            _evaluated, eval_seconds, eval_peak = run_child(
                ["eval", params, "--batch-size", "10000", "--max-ram", budget, "--json"] + common)
            rows.append((budget, trained["seconds_per_epoch"][0], train_peak,
                         trained["test_accuracy"], eval_seconds, eval_peak))
    print(f"{'budget':>8} {'epoch s':>8} {'train peak MiB':>15} {'test acc':>9} "
          f"{'eval s':>7} {'eval peak MiB':>14}")
    for budget, epoch, train_peak, accuracy, eval_s, eval_peak in rows:
        print(f"{budget:>8} {epoch:>8.2f} {train_peak / 2**20:>15.1f} {accuracy:>9.4f} "
              f"{eval_s:>7.2f} {eval_peak / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
