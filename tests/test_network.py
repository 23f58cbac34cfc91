"""The whole network: gradients, micro-batches, the planner, and the book's parameters."""

import tracemalloc

import numpy as np
import pytest

from lowmem_cnn.files.config import load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network
from lowmem_cnn.engine.conv_pool import ConvolutionPooling
from lowmem_cnn.memory.planner import (BASELINE_JITTER, MARGIN_BYTES, MARGIN_SHARE, MAX_TRAIN_MICRO_BATCH,
                                       BudgetError, activation_peak, chosen_plan, make_plan,
                                       training_state_bytes)

TINY = """
[network]
name = "tiny"
input_shape = [1, 8, 8]
weight_init = 0.3
[[network.layers]]
type = "conv"
filters = 3
size = 3
pad = 1
[[network.layers]]
type = "relu"
[[network.layers]]
type = "pool"
size = 2
stride = 2
[[network.layers]]
type = "conv"
filters = 2
size = 2
stride = 1
[[network.layers]]
type = "relu"
[[network.layers]]
type = "affine"
units = 5
[[network.layers]]
type = "relu"
[[network.layers]]
type = "affine"
units = 10
"""


def make_tiny(tmp_path, threads=1):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    net = Network(load_config(str(path)).network, np.float64, threads)
    net.init_params(np.random.default_rng(0))
    return net


def plan(net, micro_batch, threads=1):
    # column tiles of 7 rows: 7 does not divide the rows of an image
    return chosen_plan(net, micro_batch, threads, (7,) * len(net.tiled))


@pytest.fixture
def tiny(tmp_path):
    return make_tiny(tmp_path)


def loss_of(net, images, labels):
    from lowmem_cnn.engine.layers import softmax_cross_entropy

    return softmax_cross_entropy(net.scores(net.to_input(images)), labels, len(labels))[0] / len(labels)


def test_whole_network_gradient_numerically(tiny):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 64), dtype=np.uint8)
    labels = np.array([1, 7, 3])
    tiny.accumulate_gradient(images, labels, plan(tiny, 3))
    for key, param in tiny.params().items():
        analytic = tiny.grads(plan(tiny, 3))[key]
        flat = param.reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 12), replace=False):
            old = flat[i]
            flat[i] = old + 1e-6
            up = loss_of(tiny, images, labels)
            flat[i] = old - 1e-6
            down = loss_of(tiny, images, labels)
            flat[i] = old
            numeric = (up - down) / 2e-6
            assert abs(numeric - analytic.reshape(-1)[i]) <= 1e-6 + 1e-4 * abs(numeric), key


@pytest.mark.parametrize("micro", [1, 2, 5, 7])
def test_micro_batches_give_the_whole_batch_gradient(tiny, micro):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (7, 64), dtype=np.uint8)
    labels = rng.integers(0, 10, 7)
    whole_loss = tiny.accumulate_gradient(images, labels, plan(tiny, 7))
    whole = {k: g.copy() for k, g in tiny.grads(plan(tiny, 7)).items()}
    loss = tiny.accumulate_gradient(images, labels, plan(tiny, micro))
    assert loss == pytest.approx(whole_loss, rel=1e-12)
    for key, grad in tiny.grads(plan(tiny, micro)).items():
        np.testing.assert_allclose(grad, whole[key], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_gradient_and_predictions(tmp_path, threads):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (11, 64), dtype=np.uint8)
    labels = rng.integers(0, 10, 11)
    single, several = make_tiny(tmp_path), make_tiny(tmp_path, threads)
    loss_single = single.accumulate_gradient(images, labels, plan(single, 2))
    loss_several = several.accumulate_gradient(images, labels, plan(several, 2, threads))
    assert loss_several == pytest.approx(loss_single, rel=1e-12)
    several_grads = several.grads(plan(several, 2, threads))
    for key, grad in single.grads(plan(single, 2)).items():
        np.testing.assert_allclose(several_grads[key], grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(several.predict(images, plan(several, 3, threads)),
                                  single.predict(images, plan(single, 3)))
    # the same threads twice: the same bits
    again = make_tiny(tmp_path, threads)
    again.accumulate_gradient(images, labels, plan(again, 2, threads))
    for key, grad in again.grads(plan(again, 2, threads)).items():
        np.testing.assert_array_equal(several_grads[key], grad)


def test_pool_before_relu_swap_and_fusion():
    net = Network(load_config().network)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["ConvolutionPooling", "ReLU", "Affine", "ReLU", "Affine"]
    assert net.layers[0].need_input_grad is False
    # many input channels: the pooled convolutions stay separate layers
    deep = [type(layer).__name__ for layer in Network(load_config("deep_convnet").network).layers]
    assert deep[:6] == ["Convolution", "ReLU", "Convolution", "MaxPooling", "ReLU", "Convolution"]


# Arrays below glibc's mapping threshold (256 KiB, see budget.map_large_arrays) are
# left to the planner's margin for small blocks: bias-gradient sums, index arrays,
# Python objects. Measured, SimpleConvNet's and DeepConvNet's runs exceed their
# planned activations by at most 45 KiB.
SMALL_ARRAYS = 256 * 1024


def measured_peak(net, train, plan, images, labels):
    """Peak bytes a run of `images` allocates on top of what the process held before
    it, as tracemalloc counts them (NumPy reports every array's memory to it). As in a
    new process: no arrays kept from an earlier run, then two images through the
    network, as measure_baseline does before a plan is made."""
    net.release_memory()
    if train:
        net.accumulate_gradient(images[:2], labels[:2], chosen_plan(net, 2))
    else:
        net.predict(images[:2], chosen_plan(net, 2))
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        if train:
            net.accumulate_gradient(images, labels, plan)
        else:
            net.predict(images, plan)
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def held_by_a_real_run(net, train, plan, images, labels):
    """What the plan's threads' workspaces hold once `plan` has run on `images`, from
    empty workspaces: real arrays, not the planner's dry run."""
    net.release_memory()
    if train:
        net.accumulate_gradient(images, labels, plan)
    else:
        net.predict(images, plan)
    return sum(ws.held_bytes() for ws in net.workspaces[: plan.threads])


def planned_peak(baseline, fixed, activations):
    """The planned peak as planner.py's docstring states it."""
    return baseline + fixed + activations + MARGIN_BYTES + int(MARGIN_SHARE * (fixed + activations))


@pytest.mark.parametrize("config", ["simple_convnet", "deep_convnet"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_plans_hold_what_the_run_allocates(config, train, threads):
    net = Network(load_config(config).network, np.float32, threads)
    net.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (200, net.input_size), dtype=np.uint8)
    labels = rng.integers(0, 10, 200)
    baseline = 40 * 2**20
    fixed = training_state_bytes(net, 2) if train else 0
    previous, measured, held = {}, {}, {}  # previous: threads -> their last micro-batch
    for budget_mib in (48, 52, 56, 64, 80, 96, 128, 256, 512, 2048):
        budget = budget_mib * 2**20
        try:
            plan = make_plan(net, budget, baseline, train, 100, fixed)
        except LowmemError as err:
            assert "at least" in str(err)
            continue
        # more room never means smaller batches on as many threads (more threads may
        # take smaller ones)
        assert plan.micro_batch >= previous.get(plan.threads, 0)
        previous[plan.threads] = plan.micro_batch
        assert all(size >= 1 for size in plan.tiles)
        # what the run allocates stays within the plan's activations (the planned peak
        # is the baseline, the fixed bytes, these activations and a margin)
        runs = [(train, plan.micro_batch)] + ([(False, plan.eval_micro_batch)] if train else [])
        for training, micro_batch in runs:
            key = (training, micro_batch, plan.threads, plan.tiles)
            if key not in measured:  # the same plan allocates the same
                # two micro-batches a thread: a thread's later ones add to its gradients
                n = 2 * plan.threads * micro_batch
                measured[key] = measured_peak(net, training, plan, images[:n], labels[:n])
                held[key] = held_by_a_real_run(net, training, plan, images[:n], labels[:n])
            assert measured[key] <= plan.activations + SMALL_ARRAYS, (
                f"{budget_mib} MiB, {'training' if training else 'evaluation'} micro-batches "
                f"of {micro_batch}: {measured[key]:,} bytes allocated, "
                f"{plan.activations:,} planned")
        # the plan's activations are, to the byte, what real workspaces hold on its threads
        # (the larger of training's and evaluation's: the workspaces are emptied between
        # them), and with those real bytes the peak is within the budget
        real = max(held[(training, m, plan.threads, plan.tiles)] for training, m in runs)
        assert plan.activations == real, (budget_mib, plan)
        assert planned_peak(baseline, fixed, real) == plan.peak <= budget
    # with all the room it wants, the batch is shared equally by all the threads, whatever
    # the tighter plans before chose
    assert plan.threads == threads
    assert plan.micro_batch == min(-(-100 // threads), MAX_TRAIN_MICRO_BATCH if train else 100)
    assert measured


@pytest.mark.parametrize("train", [False, True])
def test_budget_below_minimum_is_refused_with_the_minimum(train):
    """A budget above the baseline but below what one image needs is refused, and the
    minimum the refusal names is the least budget that is planned."""
    net = Network(load_config().network)
    net.init_params(np.random.default_rng(0))
    baseline = 40 * 2**20  # any: the planner counts on top of it
    fixed = training_state_bytes(net, 2) if train else 0
    # micro-batches of one image, every tile of one row (or image): what real workspaces
    # hold for them (two: the second adds to the gradients), then the planned peak as
    # planner.py states it
    one_image = chosen_plan(net, 1, 1, (1,) * len(net.tiled))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, net.input_size), dtype=np.uint8)
    need = planned_peak(baseline, fixed, held_by_a_real_run(net, train, one_image, images, [3, 5]))
    net.release_memory()
    budget = (baseline + need) // 2
    assert baseline < budget < need
    with pytest.raises(BudgetError) as refused:
        make_plan(net, budget, baseline, train, 100, fixed)
    # named with room for another run's baseline (see planner.BASELINE_JITTER)
    named = need + BASELINE_JITTER
    assert refused.value.needed == named and refused.value.held == baseline
    assert f"needs at least {named:,} bytes" in str(refused.value)
    # the minimum is exact: one byte less is refused, the minimum itself is planned
    with pytest.raises(BudgetError):
        make_plan(net, need - 1, baseline, train, 100, fixed)
    plan = make_plan(net, need, baseline, train, 100, fixed)
    assert (plan.micro_batch, plan.threads, plan.peak) == (1, 1, need)


def test_activation_peak_grows_with_the_micro_batch():
    net = Network(load_config().network)
    for train in (False, True):
        peaks = [activation_peak(net, m, train, (m,)) for m in (1, 10, 100)]
        assert peaks[0] < peaks[1] < peaks[2]
    assert activation_peak(net, 100, True, (100,)) > activation_peak(net, 100, False, (100,))


def test_planning_computes_and_changes_nothing():
    from lowmem_cnn.memory.planner import _make_plan, make_plan, measure_baseline

    network = Network(load_config("deep_convnet").network, np.float32, 2)
    network.init_params(np.random.default_rng(0))
    baseline = measure_baseline(network, True)
    held = [ws.held_bytes() for ws in network.workspaces]
    budget = baseline + 48 * 2**20  # the process (pytest) holds what it holds
    one_thread = _make_plan(network, 1, budget, baseline, True, 100, 0, True)
    plan = make_plan(network, budget, baseline, True, 100, 0)
    assert [ws.held_bytes() for ws in network.workspaces] == held  # nothing allocated
    assert one_thread.threads == 1 and one_thread.peak <= budget
    # tight, then roomy, then tight again: the same plan as the first
    make_plan(network, 2**31, baseline, True, 100, 0)
    assert make_plan(network, budget, baseline, True, 100, 0) == plan


def shipped_configs():
    from importlib import resources

    folder = resources.files("lowmem_cnn") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def allocated_besides(run) -> int:
    """Peak bytes `run` allocates, as tracemalloc counts them. An array made outside the
    workspace is made on every run; the least of a few runs leaves out the interpreter's
    own one-off growth (a 1.8 MiB table once, seen under pytest)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("config", shipped_configs())
@pytest.mark.parametrize("train", [False, True])
def test_the_memory_figure_is_what_a_real_pass_holds(config, train):
    """Every layer of every shipped config, at several tile sizes: the figure the planner
    uses (a dry run against a recording workspace) is, to the byte, what the workspace
    holds after a real micro-batch, and nothing else of any size is allocated."""
    net = Network(load_config(config).network, np.float32, 1)
    net.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(4)
    m = 6
    images = rng.integers(0, 256, (2 * m, net.input_size), dtype=np.uint8)
    labels = rng.integers(0, net.classes, 2 * m)
    for tile in (1, 5, 97, 10**6):
        # column rows for convolutions; images for fused convolutions and poolings
        tiles = tuple(min(tile, m) if isinstance(layer, ConvolutionPooling) else tile
                      for layer in net.tiled)
        figure = net.micro_batch_bytes(m, train, tiles)
        net.release_memory()
        plan = chosen_plan(net, m, 1, tiles)

        def run(plan=plan):
            if train:
                net.accumulate_gradient(images, labels, plan)
            else:
                net.predict(images, plan)

        run()  # the workspace's arrays are made
        assert net.workspaces[0].held_bytes() == figure, (config, train, tile)
        assert min(allocated_besides(run) for _ in range(3)) < SMALL_ARRAYS, (config, train, tile)
        assert net.workspaces[0].held_bytes() == figure
