"""The commands as a user runs them: exit status, one-line errors, real results."""

import json
import re

import pytest
from conftest import need_module, run_lowmem
from idx_files import write_dataset


def run(*args, cwd=None):
    # through conftest's launcher: the peak RSS the command reports (and peak_rss) is
    # its own, not the pytest process's (see conftest)
    return run_lowmem(*args, cwd=cwd)


# click's header above a usage error (a bad option value): "Usage: ...", "Try '... --help'
# for help.", and an empty line
USAGE_HEADER = re.compile(r"\AUsage: .*\nTry '.*' for help\.\n\n")


def error_line(stderr: str) -> str:
    """The error of a failed command, which must be one line: "Error: ..." and nothing
    else on stderr, apart from click's usage header for a bad option (a pointer to
    --help, not a second error). So a message with a line break, a traceback, a warning,
    or a second error all fail."""
    lines = USAGE_HEADER.sub("", stderr).splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def assert_clean_failure(result, message, status=None):
    assert result.returncode != 0 if status is None else result.returncode == status
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_help_and_version():
    result = run("--help")
    assert result.returncode == 0 and "train" in result.stdout and "profile-memory" in result.stdout
    assert run("--version").stdout.strip().startswith("lowmem-cnn, version")
    for command in ("train", "eval", "profile-memory"):
        text = run(command, "--help").stdout
        assert "--max-ram" in text and "1024" in text and "--json" in text


@pytest.mark.parametrize("args, message", [
    (["train", "--max-ram", "banana"], "banana"),
    (["train", "--max-ram", "0"], "not a positive size"),
    (["train", "--max-ram", "-1G"], "-1G"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--batch-size", "-5"], "--batch-size"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--optimizer", "lion"], "--optimizer"),
    (["train", "--config", "no_such_net"], "no config 'no_such_net'"),
    (["eval", "no-such-file.pkl", "--max-ram", "1G"], "no-such-file.pkl"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    write_dataset(tmp_path / "data")
    result = run(*args, "--data-dir", tmp_path / "data", cwd=tmp_path)
    assert_clean_failure(result, message)
    assert message in error_line(result.stderr)


@pytest.mark.parametrize("stderr", [
    "Error: no config 'x'\nTraceback (most recent call last):\n",
    "Error: two\nlines\n",
    "Error: one\nError: two\n",
    "RuntimeWarning: overflow\nError: one\n",
    "Usage: lowmem-cnn train [OPTIONS]\nError: no pointer to --help, so no header\n",
    "",
])
def test_what_is_not_a_one_line_error(stderr):
    with pytest.raises(AssertionError):
        error_line(stderr)
    assert error_line("Usage: a [OPTIONS]\nTry 'a -h' for help.\n\nError: x\n") == "Error: x"


def test_budget_below_minimum_is_refused_before_any_work(tmp_path):
    result = run("train", "--max-ram", "20M", "--data-dir", tmp_path / "absent", cwd=tmp_path)
    # refused before the data is even looked at
    assert_clean_failure(result, "needs at least", status=1)
    assert "absent" not in result.stderr
    assert not (tmp_path / "params.pkl").exists()


def test_data_of_the_wrong_size_for_the_network(tmp_path):
    write_dataset(tmp_path / "data", size=20)
    result = run("train", "--data-dir", tmp_path / "data", "--max-ram", "1G", cwd=tmp_path)
    assert_clean_failure(result, "images are ")
    assert "20x20" in error_line(result.stderr) and "28x28" in result.stderr


def printed_planned_peak(text):
    """The planned peak of train's "plan: ..." line, in bytes, rounded up: the line gives it
    to a tenth of a MiB (or KiB, GiB; see budget.format_size)."""
    found = re.search(r"^plan: .*planned peak ([\d.]+) (KiB|MiB|GiB)", text, re.MULTILINE)
    assert found, text
    unit = 2 ** (10 * ("KiB", "MiB", "GiB").index(found.group(2)) + 10)
    return int((float(found.group(1)) + 0.05) * unit)


def test_train_then_eval_on_synthetic_data(tmp_path):
    write_dataset(tmp_path / "data", n_train=120, n_test=30, gz=True)
    out = tmp_path / "p.pkl"
    result = run("train", "--data-dir", tmp_path / "data", "--epochs", "2", "--batch-size", "32",
                 "--out", out, "--json", "--max-ram", "256M", "--optimizer", "momentum")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and len(summary["seconds_per_epoch"]) == 2
    # the peak it reports is the OS's figure for the whole command, which is within the
    # plan it printed (to stderr, with --json) and so within --max-ram
    assert summary["max_ram_bytes"] == 256 * 2**20
    assert same_peak(summary["peak_rss_bytes"], result.peak_rss)
    assert result.peak_rss <= printed_planned_peak(result.stderr) <= summary["max_ram_bytes"]
    assert out.exists()
    result = run("eval", out, "--data-dir", tmp_path / "data", "--json", "--batch-size", "7")
    assert result.returncode == 0, result.stderr
    evaluation = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluation["n"] == 30 and sum(map(sum, evaluation["confusion"])) == 30
    assert evaluation["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_book_fixture_eval_at_any_batch_size(book_params, mnist_dir):
    result = run("eval", book_params, "--batch-size", "10000", "--max-ram", "128M", "--data-dir",
                 mnist_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["correct"], summary["n"]) == (9600, 10000)
    assert summary["max_ram_bytes"] == 128 * 2**20
    text = run("eval", book_params, "--batch-size", "333", "--data-dir", mnist_dir).stdout
    assert "accuracy: 0.9600 (9,600 of 10,000 test images)" in text
    assert "confusion matrix" in text


def test_short_real_training_run_learns(mnist_dir, tmp_path):
    result = run("train", "--limit", "5000", "--epochs", "2", "--max-ram", "128M", "--data-dir",
                 mnist_dir, "--out", tmp_path / "p.pkl", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.85


def planned_and_measured(text):
    found = re.search(r"planned peak: ([\d,]+) bytes .*measured peak RSS: ([\d,]+) bytes", text)
    assert found, text
    return tuple(int(group.replace(",", "")) for group in found.groups())


def same_peak(reported, os_peak):
    """The command's own peak figure (VmHWM, read before it exits) is the OS's peak for
    the process (wait4's ru_maxrss). Not to the byte: the kernel's RSS counters are
    per-CPU and approximate, and the two were measured up to 356 KiB apart either way."""
    return abs(reported - os_peak) < 2**20


def test_profile_memory_reports_the_books_im2col(mnist_dir):
    result = run("profile-memory", "--batch-size", "10000", "--max-ram", "128M", "--data-dir",
                 mnist_dir, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    conv = report["layers"][0]
    assert conv["book_im2col_bytes"] == 1_152_000_000
    assert 0 < conv["tiled_bytes"] < 2**21
    # measured, not planned: the peak it reports is under the plan, and is the OS's
    # figure for the whole command (after the batch it only prints), which is under
    # the budget
    measured = report["measured_peak_bytes"]
    assert measured <= report["planned_peak_bytes"] <= report["max_ram_bytes"]
    assert same_peak(measured, result.peak_rss)
    assert result.peak_rss < report["max_ram_bytes"]
    result = run("profile-memory", "--batch-size", "100", "--train", "--data-dir", mnist_dir)
    assert result.returncode == 0, result.stderr
    assert "11,520,000" in result.stdout
    planned, measured = planned_and_measured(result.stdout)
    assert measured <= planned and same_peak(measured, result.peak_rss)


def test_huge_batch_size_still_fits(tmp_path):
    write_dataset(tmp_path / "data", n_train=40, n_test=25)
    result = run("train", "--data-dir", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "p.pkl",
                 "--max-ram", "256M")
    assert result.returncode == 0, result.stderr
    result = run("eval", tmp_path / "p.pkl", "--data-dir", tmp_path / "data", "--batch-size",
                 "1000000000", "--max-ram", "128M", "--json")
    assert result.returncode == 0, result.stderr
    assert '"n": 25' in result.stdout


def named_need(stderr: str, what: str) -> int:
    """The bytes a refusal says `what` needs at least."""
    found = re.search(rf"too small: {what}.* needs at least ([\d,]+) bytes", stderr)
    assert found, stderr
    return int(found.group(1).replace(",", ""))


def test_pictures_keep_within_the_budget_or_are_refused(tmp_path):
    from lowmem_cnn.memory.planner import BASELINE_JITTER

    need_module("matplotlib")
    write_dataset(tmp_path / "data", n_train=200, n_test=50)
    common = ["train", "--data-dir", tmp_path / "data", "--epochs", "1", "--out", tmp_path / "p.pkl",
              "--plot", tmp_path / "curves.png", "--json"]
    # The budgets come from the plan's own figures, not from one machine's baseline: the
    # least budget of the run (1M is below any process), which leaves too little room
    # for the picture, then the picture's need and a baseline's jitter
    run_need = named_need(run(*common, "--max-ram", "1M").stderr, "this run")
    refused = run(*common, "--max-ram", str(run_need))
    assert_clean_failure(refused, f"--max-ram {run_need:,} bytes is too small: drawing a picture", 1)
    assert not (tmp_path / "p.pkl").exists() and not (tmp_path / "curves.png").exists()
    budget = named_need(refused.stderr, "drawing a picture") + BASELINE_JITTER
    drawn = run(*common, "--max-ram", str(budget))
    assert drawn.returncode == 0, drawn.stderr
    summary = json.loads(drawn.stdout.strip().splitlines()[-1])
    assert (tmp_path / "curves.png").exists()
    assert same_peak(summary["peak_rss_bytes"], drawn.peak_rss)
    assert drawn.peak_rss < budget
