"""The memory plan: how many images go through the network at once, and how many
column rows each convolution makes at a time, so that the peak RSS stays under the
budget.

The planned peak is
    baseline  (measured RSS of the process before the run's own arrays)
  + fixed     (optimizer state, index and batch buffers: what the run allocates
               besides activations; parameters and gradients are in the baseline)
  + what one micro-batch holds (its thread's workspace, recorded from the layers' own
    calls: Network.micro_batch_bytes), times the threads that each have one in flight
  + a margin  (allocator rounding, small blocks, Python objects: 4 MiB and 10% of the
               rest; large arrays are mapped one by one, see budget.map_large_arrays).
"""

import math
from dataclasses import dataclass

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.optimizers import CHUNK

# Column tiles of about this size: large enough that the per-tile Python work is
# small against the GEMM (a 100-image conv forward took 5.2 ms in 25 KiB tiles, 3.2 ms
# in 800 KiB ones), small against any budget.
TILE_BYTES = 1024 * 1024
# Evaluation micro-batches larger than this run slower (their activations fall out of
# the CPU caches) and cost memory: measured with `lowmem-cnn eval --json` at 50..500.
MAX_EVAL_MICRO_BATCH = 100
# Training micro-batches larger than this run slower: their activations fall out of
# the CPU caches (measured per 100-image batch on 2 threads: 50 images 11-12 ms,
# 100 images 26 ms on one thread against 18 ms for 25-50).
MAX_TRAIN_MICRO_BATCH = 50
# A micro-batch costs about as much fixed Python work as this many images: a thread
# running micro-batches of m images does m / (m + this) of the useful work it could.
MICRO_BATCH_OVERHEAD_IMAGES = 8
MARGIN_BYTES = 4 * 1024 * 1024
# matplotlib and one picture, measured: learning curves of 20 epochs 44.7 MiB, the
# memory per layer 46.9 MiB, 100 misclassified digits (100 small axes) 82.3 MiB.
PICTURE_BYTES = {"curves": 48 * 2**20, "memory": 50 * 2**20, "digits": 88 * 2**20}
MARGIN_SHARE = 0.10
# The baseline of two runs of the same command differs by 16 KiB to 1 MiB (measured):
# a minimum named for one must hold for the next.
BASELINE_JITTER = 1 << 20
# See check_parameters_fit.
SMALL_PARAMETERS = 16 * 2**20
# The evaluations between epochs read this many images at a time.
EVAL_READ = 1000
# Before the data is open, a run plans for this many training images unless limited.
MNIST_TRAIN_IMAGES = 60_000
# What opening the data leaves resident (imports, labels, cache decompression): 200 KiB
# measured for MNIST with a cold cache.
DATA_OPENING_BYTES = 512 * 1024
# A label, a predicted label or a loss term: int64 or float64.
VALUE_BYTES = 8
# A budget that leaves less than this to decode a picture is refused at once (every
# decode is estimated at 3 MiB at least, see imaging.decode_bytes).
MIN_DECODE_BYTES = 4 * 2**20


def decode_room(budget: int) -> int:
    """Bytes one picture may take to decode: what the budget leaves (the decoding pass
    holds one picture at a time)."""
    from lowmem_cnn.memory.budget import current_rss, format_size

    held = current_rss()
    room = budget - held - MARGIN_BYTES
    if room < MIN_DECODE_BYTES:
        raise LowmemError(f"the budget of {budget:,} bytes leaves no room to decode pictures: the "
                          f"process already holds {format_size(held)}")
    return room


class BudgetError(LowmemError):
    """A budget too small for a piece of work: `needed` bytes at least, for `what`
    (e.g. "this run"); `held`: what the process held already, when known. The message
    names the budget as the face that raised it does (`option`): the library says "the
    budget of", the CLI "--max-ram ", the book's classes "max_ram="; `worded` makes it
    anew for another face."""

    def __init__(self, needed: int, budget: int, what: str, held: int | None = None,
                 option: str = "the budget of "):
        self.needed, self.budget, self.what, self.held, self.option = needed, budget, what, held, option
        from lowmem_cnn.memory.budget import format_size

        held_text = f"; the process already holds {format_size(held)}" if held is not None else ""
        super().__init__(f"{option}{budget:,} bytes is too small: {what} needs at least "
                         f"{needed:,} bytes ({format_size(needed)}{held_text})")

    def worded(self, option: str) -> "BudgetError":
        return BudgetError(self.needed, self.budget, self.what, self.held, option)


@dataclass(frozen=True)
class Plan:
    """How a piece of work runs: handed to what runs it (Network.predict,
    accumulate_gradient; training.EpochLoop), never written into the network."""

    budget: int
    baseline: int
    fixed: int
    micro_batch: int  # images through the network at once on each thread (training)
    eval_micro_batch: int  # the same for evaluation
    threads: int  # micro-batches in flight at once
    tiles: tuple  # one per tiled layer, in layer order (see Network.tiled)
    activations: int
    peak: int


@dataclass(frozen=True)
class Work:
    """A piece of work to plan: what runs through the network, and what the data source
    and the caller hold beside it. Every face describes its work with one of these and
    plans it with plan_work; the bytes are counted here."""

    kind: str  # "train" (forward and backward), "evaluate" or "predict" (forward only)
    batch_size: int  # images per update (train), else per call
    read: int = 0  # images the data source reads at a time (uint8 rows and their labels)
    read_buffers: int = 0  # train: buffers of `batch_size` images not allocated yet
    index: int = 0  # train: the training images, whose order an epoch keeps
    opening: bool = False  # the data is not open yet: what opening it leaves resident
    optimizer_copies: int = 0  # train: the optimizer's state, in copies of the parameters
    evaluations: bool = False  # train: the evaluations between epochs (reads EVAL_READ images)
    saves: bool = False  # train: the parameters are pickled at the end
    keeps_best: bool = False  # train: a copy of the parameters of the best epoch
    outputs: int = 0  # scores rows the caller keeps
    loss: int = 0  # images whose loss is taken at once (in float64)
    compared: int = 0  # images whose predicted and true labels are compared at once
    float64_grads: bool = False  # the book's gradient: float64 arrays of the parameters
    outside: int = 0  # the caller's input not resident yet (a memory-mapped file's pages)
    picture: str | None = None  # drawn at the end, once the run's arrays are given back
    recorded: dict | None = None  # a resumed run's plan, to be kept

    @property
    def train(self) -> bool:
        return self.kind == "train"


def work_bytes(network, work: Work) -> int:
    """What the work holds besides the baseline and the network's micro-batches."""
    s = network.dtype.itemsize
    held = work.outside + work.read * (network.input_size + VALUE_BYTES)
    held += work.outputs * network.classes * s
    held += work.loss * (network.classes + 2) * VALUE_BYTES  # float64 scores, 2 per image
    held += work.compared * 3 * VALUE_BYTES  # predicted, true and equal
    if work.float64_grads:
        held += network.param_bytes() // s * VALUE_BYTES + work.batch_size * VALUE_BYTES
    if work.train:
        held += training_state_bytes(network, work.optimizer_copies)
        held += work.read_buffers * work.batch_size * network.input_size
        held += work.index * VALUE_BYTES
        if work.evaluations:
            held += EVAL_READ * network.input_size
        if work.keeps_best:
            held += network.param_bytes()
        if work.saves:  # the bytes pickle makes of the largest array
            held += max(math.prod(shape) for shape in network.expected_book_shapes().values()) * s
    if work.opening:
        held += DATA_OPENING_BYTES
    return held


def plan_work(network, work: Work, budget: int, baseline: int | None = None) -> Plan:
    """The plan of `work` on `network` under `budget` (bytes), or BudgetError naming the
    least budget it needs; the plan is handed to what runs it. `baseline`: the
    process's resident bytes at rest with the network made (measured here unless given,
    which runs two images through the network: measure_baseline)."""
    if baseline is None:
        baseline = measure_baseline(network, work.train)
    fixed = work_bytes(network, work)
    if work.recorded:
        p = work.recorded
        plan = recorded_plan(network, budget, baseline, fixed, p["micro_batch"],
                             p["eval_micro_batch"], p["tiles"], p["threads"])
    else:
        plan = make_plan(network, budget, baseline, work.train, work.batch_size, fixed,
                         evaluations=work.evaluations)
    if work.picture:
        check_picture_room(budget, plan.baseline, work.picture)
    return plan


def activation_peak(network, m: int, train: bool, tiles: tuple) -> int:
    """Bytes one thread holds for a micro-batch of m images with `tiles` (one size per
    tiled layer): what its workspace holds once the layers have asked for their arrays
    (see Network.micro_batch_bytes)."""
    return network.micro_batch_bytes(m, train, tiles)


def training_state_bytes(network, optimizer_copies: int) -> int:
    """Optimizer state and its scratch buffers. (The gradients exist from the warm-up in
    `measure_baseline` on, so the baseline holds them.)"""
    scratch = len(network.workspaces) * CHUNK * network.dtype.itemsize
    return network.param_bytes() * optimizer_copies + scratch


def _activations(network, m, train, threads, tiles):
    """Every thread has a micro-batch in flight."""
    return threads * activation_peak(network, m, train, tiles)


def _peak(baseline, fixed, activations):
    return baseline + fixed + activations + MARGIN_BYTES + int(MARGIN_SHARE * (fixed + activations))


def _too_small(budget: int, minimum: int, held: int) -> BudgetError:
    return BudgetError(minimum, budget, "this run", held)


def check_parameters_fit(network, budget: int, optimizer_copies: int | None = None,
                         loading: bool = False):
    """Refuse, before any parameter exists, a budget that cannot hold the parameters
    (from the config's shapes), what making them takes (drawing them in chunks, or
    reading a file: its bytes and the float64 arrays in it), for training a set of
    gradients per thread and `optimizer_copies` more copies, and one image's activations.

    A lower bound of the plan's minimum: without it, a config of a billion filters
    died in NumPy's MemoryError, and a 3 GB affine layer peaked at 9.1 GB before the
    plan refused it. Parameters that take less than SMALL_PARAMETERS to make are made
    anyway, so that the plan (which measures them) names the exact minimum.
    """
    from lowmem_cnn.memory.budget import current_rss
    from lowmem_cnn.engine.layers import INIT_CHUNK

    params = network.param_bytes()
    train = optimizer_copies is not None
    # training: a set of gradients for every thread the network was built with (see
    # Network._gradient_sets: the baseline's warm-up makes them all)
    need = params * (1 + network.max_threads + optimizer_copies) if train else params
    if loading:
        need += 2 * params * 8 // network.dtype.itemsize
    else:
        need += INIT_CHUNK * 8
    making = need
    need += activation_peak(network, 1, train, (1,) * len(network.tiled))
    held = current_rss()
    minimum = held + need + MARGIN_BYTES
    if minimum > budget and making > SMALL_PARAMETERS:
        raise _too_small(budget, minimum, held)


def check_book_parameters_fit(network, budget: int):
    """Refuse a budget that cannot hold the book's classes' parameters: the float64
    dict in the book's layout, the engine's copy, and the drawing of the largest."""
    from lowmem_cnn.memory.budget import current_rss

    count = network.param_bytes() // network.dtype.itemsize
    largest = max(math.prod(shape) for shape in network.expected_book_shapes().values())
    held = current_rss()
    need = held + count * (VALUE_BYTES + network.dtype.itemsize) + largest * VALUE_BYTES
    if need > budget:
        raise BudgetError(need, budget, f"the parameters of this {network.config.name} alone", held)


def make_plan(network, budget: int, baseline: int, train: bool, batch_size: int,
              fixed: int, evaluations: bool = True) -> Plan:
    """The plan of the fastest thread count, up to the threads the network was built for
    (not the count an earlier plan applied): under a tight budget, one thread with large
    micro-batches beats two with tiny ones (measured at 64M: 15.5 s an epoch against
    25.7 s). A training plan also makes room for the evaluations between epochs unless
    `evaluations` is False. It runs nothing: the plan is handed to what runs it."""
    best, best_speed, refusal = None, 0.0, None
    for threads in range(network.max_threads, 0, -1):
        try:
            plan = _make_plan(network, threads, budget, baseline, train, batch_size, fixed,
                              evaluations)
        except BudgetError as err:
            refusal = err  # the last, one thread's, names the smallest minimum
            continue
        m = plan.micro_batch
        speed = threads * m / (m + MICRO_BATCH_OVERHEAD_IMAGES)
        if speed > best_speed:
            best, best_speed = plan, speed
    if best is None:
        raise refusal
    return best


def _make_plan(network, threads: int, budget: int, baseline: int, train: bool,
               batch_size: int, fixed: int, evaluations: bool) -> Plan:
    """The largest micro-batch (at most `batch_size`) and tiles that fit `budget`.

    A training plan also sizes the micro-batch of the evaluations made between
    epochs. Raises BudgetError with the minimum budget when not even one image with
    one-row tiles fits.
    """
    tiled = network.tiled
    fused = any(layer.tile_unit == "images" for layer in tiled)
    s = network.dtype.itemsize
    fused_images = 1  # images per tile of the layers whose tiles are images

    def tiles_for(m, tile_bytes):
        """Each layer's tile in its unit: column rows of about tile_bytes, or fused_images."""
        return tuple(layer.tile_size(m, tile_bytes, fused_images, s) for layer in tiled)

    def activations(m, training, tiles):
        return _activations(network, m, training, threads, tiles)

    def peak_for(m, tile_bytes):
        return _peak(baseline, fixed, activations(m, train, tiles_for(m, tile_bytes)))

    # Shrink the tiles only when even one image does not fit with cache-sized tiles.
    tile_bytes = TILE_BYTES
    while tile_bytes > 1 and peak_for(1, tile_bytes) > budget:
        tile_bytes //= 2
    minimum = peak_for(1, 1)
    if minimum > budget:
        # named with room for another run's baseline, which differs by up to 1 MiB
        raise _too_small(budget, minimum + BASELINE_JITTER, baseline)

    def largest(cap, fits):  # the largest value <= cap that fits (1 at least)
        low, high = 1, cap
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return low

    def in_budget(activations):
        return _peak(baseline, fixed, activations) <= budget

    def batch_fits(training, test):
        def fits(m):
            return test(activations(m, training, tiles_for(m, tile_bytes)))
        return fits

    per_thread = -(-batch_size // threads)
    cap = min(per_thread, MAX_TRAIN_MICRO_BATCH if train else MAX_EVAL_MICRO_BATCH)
    # The micro-batch first, with the fused layers' smallest tiles: a tile of fewer
    # images costs less time than a smaller micro-batch (measured, 2 threads, per
    # epoch: 50 images in one tile 5.4 s, in tiles of 17 5.6 s, 25 images 6.5 s).
    micro_batch = largest(cap, batch_fits(train, in_budget))
    if train:
        # equal micro-batches: 50 images as 31 + 19 would leave one thread idle a third
        # of the time
        parts = -(-per_thread // micro_batch)
        micro_batch = -(-per_thread // parts)

    def tile_fits(images):
        nonlocal fused_images
        fused_images = images
        return in_budget(activations(micro_batch, train, tiles_for(micro_batch, tile_bytes)))

    fused_images = largest(micro_batch, tile_fits) if fused else 1
    tiles = tiles_for(micro_batch, tile_bytes)
    room = activations(micro_batch, train, tiles)
    eval_micro_batch = micro_batch
    if train and evaluations:
        # The evaluations between epochs take the room training has, no more: they
        # are a small part of the time, and the budget's room goes to training.
        eval_micro_batch = largest(MAX_EVAL_MICRO_BATCH, batch_fits(False, lambda a: a <= room))
    # Tiles sized for the training micro-batch serve the evaluation's as well.
    held = room
    if evaluations:
        held = max(room, activations(eval_micro_batch, False, tiles))
    return Plan(
        budget=budget, baseline=baseline, fixed=fixed, micro_batch=micro_batch,
        eval_micro_batch=eval_micro_batch, threads=threads, tiles=tiles,
        activations=held, peak=_peak(baseline, fixed, held),
    )


def check_picture_room(budget: int, baseline: int, picture: str):
    """Refuse a picture (drawn after the run's arrays are released, see
    Network.release_memory) that would take the process over the budget."""
    needed = baseline + PICTURE_BYTES[picture] + MARGIN_BYTES
    if needed > budget:
        raise BudgetError(needed, budget, f"drawing a picture with matplotlib (about "
                          f"{PICTURE_BYTES[picture] / 2**20:.0f} MiB)", baseline)


def recorded_plan(network, budget: int, baseline: int, fixed: int, micro_batch: int,
                  eval_micro_batch: int, tiles, threads: int) -> Plan:
    """A training plan chosen before (a resumed run keeps it, so that its arithmetic is
    the same), checked against this budget."""
    tiles = tuple(tiles)
    if len(tiles) != len(network.tiled) or not 1 <= threads <= network.max_threads:
        raise LowmemError("the recorded plan does not fit this network")
    activations = max(_activations(network, micro_batch, True, threads, tiles),
                      _activations(network, eval_micro_batch, False, threads, tiles))
    peak = _peak(baseline, fixed, activations)
    if peak > budget:
        raise BudgetError(peak, budget, "the plan this run was started with")
    return Plan(budget=budget, baseline=baseline, fixed=fixed, micro_batch=micro_batch,
                eval_micro_batch=eval_micro_batch, threads=threads, tiles=tiles,
                activations=activations, peak=peak)


def chosen_plan(network, micro_batch: int, threads: int = 1, tiles: tuple | None = None) -> Plan:
    """A plan chosen by hand, not against a budget (the baseline's warm-up, tests,
    benchmarks): `micro_batch` images a thread, for training and evaluation alike;
    `tiles` one per tiled layer (default: whole micro-batches)."""
    from lowmem_cnn.engine.workspace import WHOLE

    tiles = (WHOLE,) * len(network.tiled) if tiles is None else tuple(tiles)
    return Plan(budget=0, baseline=0, fixed=0, micro_batch=micro_batch, eval_micro_batch=micro_batch,
                threads=threads, tiles=tiles, activations=0, peak=0)


def measure_baseline(network, train: bool) -> int:
    """RSS once the process holds its libraries, parameters and BLAS buffers.

    Two images through the network make the BLAS library set up its thread buffers
    and NumPy its caches, so the measurement includes them.
    """
    from lowmem_cnn.memory.budget import current_rss

    images = np.zeros((2, network.input_size), np.uint8)
    warm_up = chosen_plan(network, 2)
    if train:
        kept = {key: value.copy() for key, value in network.state().items()}
        network.accumulate_gradient(images, np.zeros(2, np.int64), warm_up)
        for key, value in network.state().items():  # the warm-up moved no statistics
            np.copyto(value, kept[key])
    else:
        network.predict(images, warm_up)
    return current_rss()
