"""eval, profile-memory and predict as library calls: values in, a result value out,
messages through callbacks (the CLI only parses, calls and prints)."""

import numpy as np
import pytest

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.data.datasets import ArrayImages, Split, SubsetImages
from lowmem_cnn.data.idx import DataOptions
from lowmem_cnn.memory.budget import current_rss
from lowmem_cnn.memory.planner import BudgetError
from lowmem_cnn.profiling import profile_memory
from lowmem_cnn.session import evaluate_params, predict_pictures


def test_subset_images_read_the_rows_chosen():
    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    images = ArrayImages(x, (1, 2, 2))
    chosen = np.array([4, 1, 3])
    subset = Split(SubsetImages(images, chosen), np.array([0, 1, 2, 3, 4])[chosen])
    assert len(subset) == 3 and len(subset.images) == 3
    assert (subset.images.channels, subset.images.rows, subset.images.cols) == (1, 2, 2)
    np.testing.assert_array_equal(subset.images.read_range(0, 3), x.reshape(5, 4)[chosen])
    np.testing.assert_array_equal(subset.images.read(np.array([2, 0])), x.reshape(5, 4)[[3, 4]])
    out = images.empty(2)  # into a buffer of the reader's rows, as the epoch loop reads
    subset.images.read(np.array([1]), out)
    np.testing.assert_array_equal(out[0], x.reshape(5, 4)[1])


def room() -> int:
    """A budget of 256 MiB above what this process (pytest, with what earlier tests left)
    already holds: the calls run in it."""
    return current_rss() + 256 * 2**20


def test_evaluate_params_returns_the_evaluation_and_says_the_plan(book_params, mnist_dir):
    planned, said = [], []
    budget = room()
    done = evaluate_params(book_params, budget, DataOptions(mnist_dir), batch_size=500,
                           on_plan=lambda network, plan: planned.append(plan), report=said.append)
    assert (done.evaluation.correct, done.evaluation.n) == (9600, 10000)  # the book's figure
    assert done.split == "test" and done.classes == [str(k) for k in range(10)]
    assert done.budget == budget and done.seconds > 0
    assert len(planned) == 1 and planned[0].peak <= done.budget
    assert not said  # nothing drawn, nothing to say


def test_profile_memory_returns_the_table_and_the_measured_peak(mnist_dir):
    budget = room()
    done = profile_memory(budget, DataOptions(mnist_dir), 200, train=True)
    assert done.rows and all("layer" in row for row in done.rows)
    assert done.budget == budget and done.plan.micro_batch >= 1
    assert done.measured > 0


def test_profile_memory_refuses_a_budget_too_small_before_the_data(tmp_path):
    # no data at all: the plan refuses first, so the data is never looked for
    with pytest.raises(BudgetError):
        profile_memory(8 * 2**20, DataOptions(tmp_path / "no data"), 200, train=True)


def test_predict_pictures_gives_each_picture_its_result_in_order(book_params, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    digit = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(digit)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    results = list(predict_pictures(book_params, [digit, broken, digit], max_ram=f"{room() >> 20}M"))
    assert [r.path for r in results] == [digit, broken, digit]
    assert results[1].probabilities is None and isinstance(results[1].error, LowmemError)
    for result in (results[0], results[2]):
        assert result.error is None and result.classes == [str(k) for k in range(10)]
        assert result.probabilities.shape == (10,) and abs(result.probabilities.sum() - 1) < 1e-9
    np.testing.assert_array_equal(results[0].probabilities, results[2].probabilities)


def test_predict_pictures_refuses_a_bad_budget_before_any_picture(book_params, tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(LowmemError):
        predict_pictures(book_params, [tmp_path / "never read.png"], max_ram="lots")
