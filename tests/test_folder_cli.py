"""Folders of pictures through the commands: the data decides the network's input and
classes, the classes travel with the parameter file, and runs resume on them."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_folders import make_folder

from conftest import ROOT, run_lowmem
from lowmem_cnn.files.description import meta_path

_spec = importlib.util.spec_from_file_location("make_photo_folder", ROOT / "scripts" / "make_photo_folder.py")
make_photo_folder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_photo_folder)

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
    assert meta["classes"] == sorted(WORDS) and meta["input_shape"] == [3, 24, 24]
    assert meta["layers"][-1] == {"type": "affine", "units": 10}  # the network itself, no config name
    assert "config" not in meta
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


def test_every_decodable_picture_of_a_photo_folder_is_used(tmp_path):
    """Issue 19: of a folder of every format and the usual junk, every decodable picture
    is used (the JPEGs whose crop box came out negative among them), the count is said,
    system files are not mentioned, and the rest is one warning line."""
    root = tmp_path / "PetImages"
    counts = make_photo_folder.write_folder(root, classes=2, per_class=8, min_side=40, max_side=160,
                                            seed=1)
    assert counts == {"decodable": 38, "system": 12, "not_pictures": 2, "damaged": 2}
    args = ["train", "--data-dir", root, "--test-split", "0.2", "--image-size", "48", "--epochs", "1",
            "--max-ram", "256M", "--json"]
    trained = run_lowmem(*args, "--out", tmp_path / "p.pkl", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    data = next(line for line in trained.stderr.splitlines() if line.startswith("data: "))
    found = re.search(r"(\d+) train, (\d+) test images of 3x48x48", data)
    assert found and int(found[1]) + int(found[2]) == 38, data
    assert "38 of 42 files used (not used: 2 damaged or unreadable pictures, 2 files that are not " \
           "pictures)" in data
    assert json.loads(trained.stdout.splitlines()[-1])["train_images"] == int(found[1])
    warned = [line for line in trained.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1, trained.stderr
    assert warned[0].startswith(f"warning: {root}: 4 of its 42 files not used: 2 damaged or unreadable "
                                "pictures (")
    assert "11702.jpg" in warned[0] and "666.jpg" in warned[0]
    assert "; 2 files that are not pictures (Cat/readme.txt, Dog/readme.txt); the full list" in warned[0]
    for system in ("Thumbs.db", "desktop.ini", ".DS_Store", "._", "MACOSX", "thumbnails"):
        assert system not in trained.stderr
    listed = Path(warned[0].rsplit("with reasons: ", 1)[1]).read_text(encoding="utf-8").splitlines()
    assert sorted(line.split("\t")[:2] for line in listed[1:]) == [
        ["damaged", "Cat/666.jpg"], ["damaged", "Dog/11702.jpg"], ["not a picture", "Cat/readme.txt"],
        ["not a picture", "Dog/readme.txt"]]

    # --strict refuses on a damaged picture, in one line; not on junk that is no picture
    strict = run_lowmem(*args, "--strict", "--out", tmp_path / "s.pkl", cwd=tmp_path)
    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    error = strict.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and ("666.jpg" in error or "11702.jpg" in error), error
    (root / "Cat" / "666.jpg").unlink()
    (root / "Dog" / "11702.jpg").unlink()
    clean = run_lowmem(*args, "--strict", "--out", tmp_path / "c.pkl", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert "38 of 40 files used (not used: 2 files that are not pictures)" in clean.stderr
