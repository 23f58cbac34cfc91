"""Folders of pictures through the commands: the data decides the network's input and
classes, the classes travel with the parameter file, and runs resume on them."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_folders import make_folder

from conftest import run_lowmem
from lowmem_cnn.params import meta_path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def named_folder(mnist_dir, path, **options):
    """A one-folder layout of MNIST's digits, each class folder named by its word."""
    root = make_folder(mnist_dir, path, layout="one", **options)
    for digit, word in enumerate(WORDS):
        (root / str(digit)).rename(root / word)
    return root


def test_png_folder_gives_the_idx_path_s_predictions(tmp_path, mnist_dir, book_params):
    # all 10,000 test images, lossless: the same 9,600 and the same confusion matrix
    root = make_folder(mnist_dir, tmp_path / "png", limit=10_000)
    results = []
    for data in (mnist_dir, root):
        found = run_lowmem("eval", book_params, "--data-dir", data, "--batch-size", "10000",
                           "--max-ram", "128M", "--json", cwd=tmp_path)
        assert found.returncode == 0, found.stderr
        results.append(json.loads(found.stdout.splitlines()[-1]))
        assert found.peak_rss < 128 * 2**20
    idx, folder = results
    assert folder["correct"] == idx["correct"] == 9600
    assert folder["confusion"] == idx["confusion"]
    assert folder["classes"] == [str(k) for k in range(10)]


def test_tinted_rgb_jpegs_train_and_their_names_travel_with_the_parameters(tmp_path, mnist_dir):
    root = named_folder(mnist_dir, tmp_path / "photos", fmt="jpeg", tint=True, size=40, limit=400)
    out = tmp_path / "p.pkl"
    trained = run_lowmem("train", "--data-dir", root, "--image-size", "24", "--epochs", "3",
                         "--max-ram", "256M", "--out", out, "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "3x24x24 (RGB), 10 classes (eight, five, four, nine, one, seven, six, three, two, zero)" \
        in trained.stderr
    assert trained.peak_rss < 256 * 2**20
    summary = json.loads(trained.stdout.splitlines()[-1])
    assert summary["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    meta = json.loads(meta_path(out).read_text())
    assert meta == {"classes": sorted(WORDS), "input_shape": [3, 24, 24], "config": "simple_convnet"}
    # eval reads the folder as the parameters were trained, and names the classes
    evaluated = run_lowmem("eval", out, "--data-dir", root, "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.splitlines()[-1])
    assert report["classes"] == sorted(WORDS)
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"])
    # predict names the class of a picture
    picture = next((root / "seven").iterdir())
    said = subprocess.run([sys.executable, "-m", "lowmem_cnn", "predict", out, picture, "--json",
                           "--max-ram", "128M"], capture_output=True, text=True, cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    line = json.loads(said.stdout)
    assert line["class"] in WORDS and line["class"] == sorted(WORDS)[line["digit"]]
    assert np.isclose(sum(line["probabilities"]), 1, atol=1e-4)
    # a folder of other classes is refused for these parameters
    other = make_folder(mnist_dir, tmp_path / "digits", limit=50)
    refused = run_lowmem("eval", out, "--data-dir", other, cwd=tmp_path)
    assert refused.returncode == 1 and "not those" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_run_on_a_folder_resumes_on_it(tmp_path, mnist_dir):
    from test_checkpoint import CRASH_CHILD

    root = make_folder(mnist_dir, tmp_path / "png", limit=300)
    args = ["train", "--data-dir", root, "--epochs", "2", "--batch-size", "50", "--image-size",
            "20", "--checkpoint-every", "2", "--max-ram", "256M"]
    solo = tmp_path / "solo"
    solo.mkdir()
    assert run_lowmem(*args, cwd=solo).returncode == 0
    crashed = subprocess.run([sys.executable, str(CRASH_CHILD), "--at-update", "5", "--", *map(str, args)],
                             cwd=tmp_path, capture_output=True, text=True)
    assert crashed.returncode == -9, crashed.stderr
    resumed = run_lowmem("train", "--resume", "--data-dir", root, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "1x20x20 (gray)" in resumed.stdout
    assert (tmp_path / "params.pkl").read_bytes() == (solo / "params.pkl").read_bytes()


def test_bad_folders_through_the_commands(tmp_path, mnist_dir):
    root = make_folder(mnist_dir, tmp_path / "png", limit=20)
    (root / "train" / "cats").mkdir()
    failed = run_lowmem("train", "--data-dir", root, "--max-ram", "256M", cwd=tmp_path)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "cats" in lines[-1] and "Traceback" not in failed.stderr
    assert not (tmp_path / "params.pkl").exists()
    bad = run_lowmem("train", "--data-dir", root, "--image-size", "0x5", cwd=tmp_path)
    assert bad.returncode == 2 and "--image-size" in bad.stderr
