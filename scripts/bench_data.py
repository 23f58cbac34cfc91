"""Benchmark: one training epoch on each of several data directories, alternated in one
run (e.g. MNIST's IDX files against the same images as a folder of PNGs, read from
the folder's cache). Prints the epoch seconds, peak RSS (wait4) and the ratio of each
median to the first directory's.

    python scripts/bench_data.py DIR_A DIR_B [--repeats 3] [--max-ram 2G] [-- TRAIN OPTIONS]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dirs", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-ram", default="2G")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    seconds = {d: [] for d in options.data_dirs}
    peaks = {d: [] for d in options.data_dirs}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(options.repeats):
            for directory in options.data_dirs:
                child = subprocess.Popen(
                    [sys.executable, "-m", "lowmem_cnn", "train", "--epochs", "1", "--data-dir",
                     directory, "--max-ram", options.max_ram, "--out", os.path.join(work, "p.pkl"),
                     "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                out = child.stdout.read()
                _, status, usage = os.wait4(child.pid, 0)
                if os.waitstatus_to_exitcode(status):
                    sys.exit(f"train on {directory} failed")
                seconds[directory] += json.loads(out.splitlines()[-1])["seconds_per_epoch"]
                peaks[directory].append(usage.ru_maxrss * 1024)
    first = statistics.median(seconds[options.data_dirs[0]])
    for directory in options.data_dirs:
        median = statistics.median(seconds[directory])
        print(f"{directory}: epochs {[round(s, 2) for s in seconds[directory]]} s, median "
              f"{median:.2f} s ({median / first:.3f} of the first), peak RSS "
              f"{max(peaks[directory]) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
