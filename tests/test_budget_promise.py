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


def test_the_measurement_is_the_commands_own_peak():
    # pytest holding 200 MiB must not show in the figure (see conftest), and memory the
    # command touches must
    ballast = np.ones(200 * MIB // 8)
    idle = run_python("-c", "pass")
    busy = run_python("-c", "import numpy as np; np.ones(100 * 2**20 // 8)")
    assert ballast.sum() == 200 * MIB // 8
    assert idle.returncode == busy.returncode == 0
    assert idle.peak_rss < 40 * MIB
    assert 100 * MIB < busy.peak_rss < 180 * MIB


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


def test_train_runs_at_the_minimum_it_names(mnist_dir, tmp_path):
    args = [*TRAIN, "--data-dir", mnist_dir, "--out", tmp_path / "p.pkl"]
    refused = run_lowmem(*args, "--max-ram", "1M", cwd=tmp_path)
    assert refused.returncode == 1
    found = re.search(r"needs at least ([\d,]+) bytes", refused.stderr)
    assert found, refused.stderr
    minimum = int(found.group(1).replace(",", ""))
    result = run_lowmem(*args, "--max-ram", minimum, cwd=tmp_path)
    plan = re.search(r"^plan: .*$", result.stdout, re.MULTILINE)
    story = (f"minimum {minimum:,} bytes; peak RSS {result.peak_rss:,}; "
             f"{plan.group(0) if plan else 'no plan line'}; {result.stderr.strip()}")
    assert result.returncode == 0, story
    assert result.peak_rss < minimum, story
