"""What helps photos learn: augmentation, weight decay, a validation split with the best
epoch kept, learning-rate schedules, and the shipped recipe; each survives --resume."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_lowmem

from lowmem_cnn.data.augment import Augmentation
from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.optimizers import make_optimizer
from lowmem_cnn.training.schedule import Schedule
from lowmem_cnn.training.run import held_out

CRASH_CHILD = Path(__file__).with_name("crash_child.py")


def pictures(n=6, c=2, h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, c * h * w), dtype=np.uint8), (c, h, w)


@pytest.mark.parametrize("text, expected", [("flip,crop:4", "flip,crop:4"), ("crop:2, flip", "flip,crop:2"),
                                            ("none", "none"), ("", "none")])
def test_augmentation_is_chosen_by_name(text, expected):
    assert str(Augmentation.parse(text)) == expected


@pytest.mark.parametrize("text", ["rotate", "crop", "crop:0", "crop:-1", "crop:99", "flip:2"])
def test_unknown_augmentation_is_one_line(text):
    with pytest.raises(LowmemError, match="use flip, crop:P"):
        Augmentation.parse(text)


def test_flip_mirrors_about_half_the_pictures_and_nothing_else():
    rows, shape = pictures(n=200)
    before = rows.copy()
    Augmentation(flip=True).apply(rows, shape, (1, 2, 3))
    c, h, w = shape
    new, old = rows.reshape(-1, c, h, w), before.reshape(-1, c, h, w)
    mirrored = [np.array_equal(a, b[:, :, ::-1]) for a, b in zip(new, old, strict=True)]
    same = [np.array_equal(a, b) for a, b in zip(new, old, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 60 < sum(mirrored) < 140


def test_crop_moves_each_picture_and_fills_with_zeros():
    rows, shape = pictures(n=50)
    before = rows.copy()
    Augmentation(crop=2).apply(rows, shape, (0, 0, 0))
    c, h, w = shape
    moved = 0
    for new, old in zip(rows.reshape(-1, c, h, w), before.reshape(-1, c, h, w), strict=True):
        # the picture is the old one moved by some (dy, dx) within 2, zeros coming in
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                expected = np.zeros_like(old)
                expected[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
                    old[:, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
                if np.array_equal(new, expected):
                    found = True
                    moved += (dy, dx) != (0, 0)
        assert found
    assert moved > 30


def test_augmentation_is_the_same_for_the_same_update_and_differs_between_updates():
    rows, shape = pictures(n=40)
    augmentation = Augmentation(flip=True, crop=3)
    a, b, c = rows.copy(), rows.copy(), rows.copy()
    augmentation.apply(a, shape, (7, 1, 5))
    augmentation.apply(b, shape, (7, 1, 5))
    augmentation.apply(c, shape, (7, 1, 6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    untouched = rows.copy()
    Augmentation().apply(untouched, shape, (7, 1, 5))
    assert np.array_equal(untouched, rows)


def test_schedules():
    constant = Schedule("constant", 0.1, 4, 10)
    assert {constant.rate(e, u) for e in range(4) for u in range(10)} == {0.1}
    step = Schedule("step", 0.1, 4, 10)
    assert [step.rate(e, 0) for e in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cosine = Schedule("cosine", 0.1, 4, 10, warmup=1)
    rates = [cosine.rate(e, u) for e in range(4) for u in range(10)]
    assert rates[:10] == pytest.approx([0.1 * (u + 1) / 10 for u in range(10)])  # linear warm-up
    assert rates[10] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[10:-1], rates[11:], strict=True))  # down, to near 0
    assert rates[-1] < 0.001
    # a warm-up longer than half a short run takes half of it
    short = Schedule("cosine", 0.1, 2, 10, warmup=5)
    assert short.rate(0, 9) == pytest.approx(0.1) and short.rate(0, 4) == pytest.approx(0.05)
    with pytest.raises(LowmemError, match="not one of"):
        Schedule("linear", 0.1, 4, 10)


def test_validation_images_are_chosen_by_seed_apart_from_the_training_images():
    train, validation = held_out(1000, 0.1, seed=3)
    assert len(validation) == 100 and len(train) == 900
    assert not set(train) & set(validation) and set(train) | set(validation) == set(range(1000))
    again, validation_again = held_out(1000, 0.1, seed=3)
    assert np.array_equal(validation, validation_again) and np.array_equal(train, again)
    assert not np.array_equal(held_out(1000, 0.1, seed=4)[1], validation)


def test_weight_decay_is_the_books_l2_on_the_weights_only():
    w, b = np.ones(3, np.float32), np.ones(3, np.float32)
    grad = {"W1": np.full(3, 0.5, np.float32), "b1": np.full(3, 0.5, np.float32)}
    sgd = make_optimizer("sgd", 0.1, 0.2, ["W1"])
    sgd.update({"W1": w, "b1": b}, {key: value.copy() for key, value in grad.items()})
    np.testing.assert_allclose(w, 1 - 0.1 * (0.5 + 0.2 * 1))  # lambda W added to the gradient
    np.testing.assert_allclose(b, 1 - 0.1 * 0.5)  # biases are not decayed
    with pytest.raises(LowmemError, match="weight decay"):
        make_optimizer("sgd", 0.1, -1.0, ["W1"])


def test_the_recipe_config_names_its_defaults():
    training = load_config("photos").training
    assert (training.augment, training.lr_schedule) == ("flip,crop:2", "cosine")
    assert training.weight_decay > 0 and training.warmup > 0


def test_a_config_with_an_unknown_training_key_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[network]\ninput_shape = [1, 28, 28]\n[[network.layers]]\ntype = "affine"\n'
                    'units = 10\n[training]\naugmentt = "flip"\n')
    with pytest.raises(LowmemError, match="has no augmentt"):
        load_config(str(path))


# 600 real images, 60 held out, batches of 50: 11 updates an epoch, a checkpoint every 4.
RECIPE = ["train", "--config", "photos", "--limit", "600", "--epochs", "3", "--batch-size", "50",
          "--val-split", "0.1", "--keep", "best", "--checkpoint-every", "4", "--max-ram", "256M",
          "--json"]


def summary(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_recipe_resumes_bitwise(mnist_dir, tmp_path):
    """Augmentation, weight decay, the cosine schedule and the validation split: stopped
    with SIGINT after update 6 (the child counts its own updates) and resumed, the run
    saves the same parameter file, to the byte, and the same history."""
    whole = tmp_path / "whole"
    whole.mkdir()
    reference = summary(run_lowmem(*RECIPE, "--data-dir", mnist_dir, cwd=whole))
    assert all("val_accuracy" in h for h in reference["history"])
    assert reference["best"]["epoch"] in (1, 2, 3)

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    child = subprocess.run([sys.executable, str(CRASH_CHILD), "--action", "SIGINT", "--at-update", "6",
                            "--", *RECIPE, "--data-dir", str(mnist_dir)],
                           cwd=stopped, capture_output=True, text=True, timeout=600)
    assert child.returncode == 128 + signal.SIGINT, child.stderr
    resumed = summary(run_lowmem("train", "--resume", "--json", "--data-dir", mnist_dir, cwd=stopped))
    assert (stopped / "params.pkl").read_bytes() == (whole / "params.pkl").read_bytes()
    # the description says how they were trained: the recipe's defaults, the best epoch
    training = json.loads((stopped / "params.pkl.json").read_text())["training"]
    assert training == {"augment": "flip,crop:2", "weight_decay": 0.0001, "lr_schedule": "cosine",
                        "warmup": 1, "val_split": 0.1, "epoch": reference["best"]["epoch"]}

    def without_seconds(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert without_seconds(resumed["history"]) == without_seconds(reference["history"])
    assert resumed["best"] == reference["best"]


def test_the_best_epoch_is_the_one_kept_and_patience_stops(mnist_dir, tmp_path):
    """With a rate too high to settle, validation accuracy falls after its best epoch:
    --keep best saves that epoch's parameters (the same bytes as a run of that many
    epochs), and --patience 1 stops the run one epoch after it."""
    common = ["train", "--limit", "500", "--batch-size", "50", "--lr", "0.05", "--val-split", "0.2",
              "--max-ram", "256M", "--json", "--data-dir", mnist_dir]
    longer = summary(run_lowmem(*common, "--epochs", "5", "--keep", "best", "--out", "best.pkl",
                                cwd=tmp_path))
    best = longer["best"]["epoch"]
    assert best < len(longer["history"]) == 5  # a later epoch was worse: the case to test
    shorter = summary(run_lowmem(*common, "--epochs", str(best), "--out", "short.pkl", cwd=tmp_path))
    assert shorter["history"][-1]["val_accuracy"] == longer["best"]["val_accuracy"]
    assert (tmp_path / "best.pkl").read_bytes() == (tmp_path / "short.pkl").read_bytes()

    patient = run_lowmem(*common, "--epochs", "5", "--patience", "1", "--out", "patient.pkl",
                         cwd=tmp_path)
    history = summary(patient)["history"]
    assert len(history) < 5 and "no better validation accuracy for 1 epochs" in patient.stderr
    values = [h["val_accuracy"] for h in history]
    assert values[-1] <= max(values[:-1])


def test_keep_best_needs_a_validation_split(tmp_path, mnist_dir):
    result = run_lowmem("train", "--keep", "best", "--limit", "100", "--epochs", "1",
                        "--data-dir", mnist_dir, "--max-ram", "256M", cwd=tmp_path)
    assert result.returncode == 1 and "held out for validation" in result.stderr
    assert "Traceback" not in result.stderr
