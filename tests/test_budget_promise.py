"""The central promise: with --max-ram the process's peak RSS stays under it, as the OS
measures the command (wait4's ru_maxrss, see conftest.run_python), on the real MNIST
files; and a budget the command names as its minimum is enough."""

import json
import re

import numpy as np
import pytest

from conftest import run_lowmem, run_python

MIB = 2**20
BUDGETS = {"64M": 64 * MIB, "128M": 128 * MIB}
# training on 2,000 images keeps a run to a few seconds; the evaluations after the
# epoch still read all 10,000 test images
TRAIN = ["train", "--epochs", "1", "--limit", "2000"]


def last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


def resident_bytes():
    """This (pytest's) process's resident memory now, from Linux's /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_measurement_is_the_commands_own_peak():
    # What pytest holds must not show in the figure (Linux carries a peak across exec,
    # see conftest), and memory the command touches must, in full. Each figure is
    # compared with another one measured here, never with a size calibrated on one
    # machine; two runs of one command differ by about 1 MiB (planner.BASELINE_JITTER),
    # and the tolerance is a tenth of what the busy command touches.
    touch = 100 * MIB
    idle = ["-c", "import numpy"]
    busy = ["-c", f"import numpy as np; np.ones({touch // 8})"]
    alone = run_python(*idle)
    # pytest now holds more than the idle command and all the busy one touches: were its
    # memory in the figures, the idle command's would come out at least the ballast,
    # far above its figure measured alone
    ballast = np.ones((alone.peak_rss + touch) // 8)  # ones: written, so resident
    beside = run_python(*idle)
    busy_beside = run_python(*busy)
    # the ballast was in pytest's RSS while the commands ran (this also keeps it alive
    # until they have)
    assert resident_bytes() > ballast.nbytes
    del ballast
    assert alone.returncode == beside.returncode == busy_beside.returncode == 0, busy_beside.stderr
    assert beside.peak_rss < alone.peak_rss + touch // 10, (alone.peak_rss, beside.peak_rss)
    touched = busy_beside.peak_rss - beside.peak_rss
    assert abs(touched - touch) < touch // 10, touched


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("command", ["train", "eval", "profile-memory"])
def test_peak_rss_stays_under_the_budget(command, budget, mnist_dir, tmp_path, request):
    if command == "train":
        args = [*TRAIN, "--out", tmp_path / "p.pkl"]
    elif command == "eval":
        args = ["eval", request.getfixturevalue("book_params"), "--batch-size", "10000"]
    else:
        args = ["profile-memory"]  # the whole test set in one batch, the book's way 1.15 GB
    result = run_lowmem(*args, "--max-ram", budget, "--data-dir", mnist_dir, "--json",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.peak_rss < BUDGETS[budget], (
        f"peak RSS {result.peak_rss:,} bytes over --max-ram {budget}: {result.stderr}")
    report = last_json(result)
    assert report["max_ram_bytes"] == BUDGETS[budget]
    # and the run did the work it was asked for
    if command == "train":
        assert report["train_images"] == 2000 and (tmp_path / "p.pkl").exists()
    elif command == "eval":
        assert (report["correct"], report["n"]) == (9600, 10000)
    else:
        assert report["layers"][0]["book_im2col_bytes"] == 1_152_000_000
        # the figure it prints is the OS's, read before it exits (see test_cli.same_peak)
        assert abs(report["measured_peak_bytes"] - result.peak_rss) < 2**20


# The room a named minimum keeps for another run's baseline (the RSS before the run's
# own arrays), which differs from run to run: planner.BASELINE_JITTER, the promise.
BASELINE_ROOM = 1 * MIB

# The command line, started by a script that first holds `extra` bytes more: a run
# whose baseline is that much higher.
HOLDING = """
import sys
held = bytes(range(256)) * ({extra} // 256)  # written, so resident: in the baseline
from lowmem_cnn.cli import main
sys.exit(main(sys.argv[1:], prog_name="lowmem-cnn"))
"""


def run_holding(extra, *args, cwd):
    return run_python("-c", HOLDING.format(extra=extra), *args, cwd=cwd)


def named_minimum(refused):
    assert refused.returncode == 1, refused.stderr
    found = re.search(r"needs at least ([\d,]+) bytes", refused.stderr)
    assert found, refused.stderr
    return int(found.group(1).replace(",", ""))


def test_train_runs_at_the_minimum_it_names(mnist_dir, tmp_path):
    """A budget the command names as its minimum is enough for the whole run, for a run
    whose baseline is up to BASELINE_ROOM above the one that named it: the runs at the
    minimum hold half that room more, so a minimum named without the room fails here.
    The baseline is measured, and two runs differ by their own jitter on top (a busier
    machine, another allocator): the test does not hope they will not. The rest of the
    minimum is arithmetic on the config and the command line, so a run refused at a
    minimum shows its baseline's growth as the growth of the minimum it names: a
    refusal is within the promise only when that exceeds BASELINE_ROOM (and comes from
    the same plan, made before the data is read), and the next minimum named must then
    hold in turn."""
    args = [*TRAIN, "--data-dir", mnist_dir, "--out", tmp_path / "p.pkl"]
    minimum = named_minimum(run_holding(0, *args, "--max-ram", "1M", cwd=tmp_path))
    for _ in range(5):
        result = run_holding(BASELINE_ROOM // 2, *args, "--max-ram", minimum, cwd=tmp_path)
        plan = re.search(r"^plan: .*$", result.stdout, re.MULTILINE)
        story = (f"minimum {minimum:,} bytes; peak RSS {result.peak_rss:,}; "
                 f"{plan.group(0) if plan else 'no plan line'}; {result.stderr.strip()}")
        if result.returncode == 0:
            break
        again = named_minimum(result)
        assert not re.search(r"^data: ", result.stdout, re.MULTILINE), (
            f"refused after the data was read, at the minimum named before: {story}")
        assert again - minimum > BASELINE_ROOM, (
            f"refused at the minimum it named, though it needs only {again - minimum:,} bytes "
            f"more (its baseline grew by that much): {story}")
        minimum = again
    else:
        pytest.fail(f"five runs in a row each held over {BASELINE_ROOM:,} bytes more than the "
                    f"one before: {story}")
    assert result.peak_rss <= minimum, story
