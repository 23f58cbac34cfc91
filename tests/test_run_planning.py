"""What a run allocates is planned before it is allocated: configs too big for the
budget are refused from their shapes, a batch larger than the data is the data,
profile-memory --train plans training alone, and a plan is not held to the threads an
earlier one chose (nor a recorded one let past the threads there are)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_lowmem

from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network
from lowmem_cnn.memory.planner import (MARGIN_BYTES, activation_peak, make_plan, measure_baseline,
                                recorded_plan)

HUGE = {
    # the most units a config may ask for (65,536), twice: 65,536^2 float32 weights, 16 GiB
    "affine": '[[network.layers]]\ntype = "affine"\nunits = 65536\n' * 2,
    # the most filters: 37.7 M outputs an image, 151 MB each, and 1.5 GB of affine weights after
    "conv": '[[network.layers]]\ntype = "conv"\nfilters = 65536\nsize = 5\n',
}


def huge_config(tmp_path, kind):
    path = tmp_path / f"huge_{kind}.toml"
    path.write_text('[network]\nname = "huge"\ninput_shape = [1, 28, 28]\n' + HUGE[kind]
                    + '[[network.layers]]\ntype = "affine"\nunits = 10\n')
    return path


@pytest.mark.parametrize("kind", sorted(HUGE))
@pytest.mark.parametrize("command", ["train", "eval", "profile-memory", "predict"])
def test_a_config_too_big_for_the_budget_is_refused_before_allocating(tmp_path, kind, command,
                                                                      book_params):
    config = huge_config(tmp_path, kind)
    data = ["--data-dir", tmp_path / "no-data"]  # never reached
    args = {"train": ["train", *data], "eval": ["eval", book_params, *data],
            "profile-memory": ["profile-memory", *data],
            "predict": ["predict", book_params, tmp_path / "digit.png"]}[command]
    result = run_lowmem(*args, "--config", config, "--max-ram", "256M", cwd=tmp_path)
    err, peak = result.stderr, result.peak_rss
    assert result.returncode == 1, err
    assert "needs at least" in err and "Traceback" not in err and "MemoryError" not in err
    assert len(err.strip().splitlines()) <= 2  # the budget line (train) and the error
    assert peak < 256 * 2**20  # refused within the budget


def test_a_batch_larger_than_the_data_is_the_whole_data(tmp_path, mnist_dir):
    result = subprocess.run([sys.executable, "-m", "lowmem_cnn", "train", "--batch-size",
                             "1000000000", "--limit", "300", "--epochs", "1", "--max-ram", "128M",
                             "--data-dir", mnist_dir, "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "batches of 300" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["train_images"] == 300


def test_a_training_profile_plans_training_alone():
    network = Network(load_config("simple_convnet").network, np.float32, 2)
    network.init_params(np.random.default_rng(0))
    baseline = measure_baseline(network, True)
    alone = make_plan(network, 2**30, baseline, True, 100, 0, evaluations=False)
    assert alone.activations == alone.threads * activation_peak(network, alone.micro_batch, True,
                                                                alone.tiles)
    with_evaluations = make_plan(network, 2**30, baseline, True, 100, 0)
    assert with_evaluations.eval_micro_batch > alone.micro_batch  # room was made for them


def test_a_later_plan_may_use_every_thread_the_network_was_built_for():
    # A run plans twice (plan_without_data, then use_data; eval and profile-memory
    # before and after opening the data): a first plan under a tight budget takes one
    # thread, and a second one with room must not be held to it.
    network = Network(load_config("simple_convnet").network, np.float32, 2)
    network.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, network.input_size), dtype=np.uint8)
    labels = rng.integers(0, 10, 4)
    one_image = activation_peak(network, 1, True, (1,) * len(network.tiled))
    tight = MARGIN_BYTES + 3 * one_image // 2  # one thread's image fits, two threads' do not

    def plan(budget):
        return make_plan(network, budget, 0, True, 100, 0, evaluations=False)

    def gradient(plan):  # as the optimizer sums it (no set zeroed, unlike network.grads)
        network.accumulate_gradient(images, labels, plan)
        return {key: sum(grads[key] for grads in network.thread_grads(plan))
                for key in network.params()}

    tight_plan = plan(tight)
    assert tight_plan.threads == 1
    measure_baseline(network, True)
    # the baseline holds a gradient set for every thread built, not only the one in use
    sets = network._gradient_sets()
    assert len(sets) == 2
    one = gradient(tight_plan)
    roomy = plan(2**30)
    assert roomy.threads == 2
    two = gradient(roomy)
    assert network._gradient_sets() is sets  # nothing made that the baseline lacks
    # and back to one thread: the second set, left as the two-thread run wrote it, is
    # not part of the gradient, and the idle thread's arrays, which the plan no longer
    # counts, are given back
    again_plan = plan(tight)
    assert again_plan == tight_plan  # a plan is a value: planning again changed nothing
    again = gradient(again_plan)
    assert network.workspaces[1].held_bytes() == 0
    for key, grad in one.items():
        np.testing.assert_allclose(two[key], grad, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(again[key], grad)


def test_a_recorded_plan_for_more_threads_than_the_network_has_is_refused():
    # a checkpoint's plan (resume keeps it) naming threads the network was not built for
    network = Network(load_config("simple_convnet").network, np.float32, 2)
    tiles = (1,) * len(network.tiled)
    for threads in (0, 3):
        with pytest.raises(LowmemError, match="does not fit this network"):
            recorded_plan(network, 2**30, 0, 0, 50, 50, tiles, threads)
    assert recorded_plan(network, 2**30, 0, 0, 50, 50, tiles, 2).threads == 2
