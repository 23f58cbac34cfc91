"""The memory plan: how many images go through the network at once, and how many
column rows each convolution makes at a time, so that the peak RSS stays under the
budget.

The planned peak is
    baseline  (measured RSS of the process before the run's own arrays)
  + fixed     (optimizer state, index and batch buffers: what the run allocates
               besides activations; parameters and gradients are in the baseline)
  + the activation peak of one micro-batch (simulated layer by layer, below), times
    the threads that each have one in flight
  + a margin  (allocator rounding, small blocks, Python objects: 4 MiB and 10% of the
               rest; large arrays are mapped one by one, see budget.map_large_arrays).
"""

from dataclasses import dataclass

import numpy as np

from lowmem_cnn.errors import LowmemError
from lowmem_cnn.optimizers import CHUNK

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
MARGIN_SHARE = 0.10


@dataclass(frozen=True)
class Plan:
    budget: int
    baseline: int
    fixed: int
    micro_batch: int  # images through the network at once on each thread (training)
    eval_micro_batch: int  # the same for evaluation
    threads: int  # micro-batches in flight at once
    tile_rows: tuple  # one per convolution, in layer order
    activations: int
    peak: int

    def apply(self, network):
        for layer, rows in zip(_convolutions(network), self.tile_rows, strict=True):
            layer.tile_rows = rows


def _convolutions(network):
    return [layer for layer in network.layers if layer.kind == "conv"]


def activation_peak(network, m: int, train: bool) -> int:
    """Peak bytes of the arrays one micro-batch of m images allocates.

    The layers' workspace arrays (see workspace.py) are held throughout; on top of
    them, walks the forward pass (and the backward pass when training) counting the
    other arrays alive at each step: what the layers keep for backward, the current
    activation or gradient, the layer's new output and its temporaries.
    """
    s = network.dtype.itemsize
    held = m * int(np.prod(network.input_shape)) * s  # the input, in the workspace
    alive = peak = kept = 0
    kept_by = []  # what each layer keeps until its backward
    for layer in network.layers:
        mem = layer.memory(m, s, train)
        held += mem.workspace
        peak = max(peak, kept + alive + mem.out + mem.forward_scratch)
        if train:
            kept_by.append(mem.kept + (alive if mem.keeps_input else 0))
            kept += kept_by[-1]
            if mem.keeps_input:
                alive = 0
        if not mem.in_place:
            alive = mem.out
    if not train:
        return held + peak
    grad = alive  # the loss gradient takes the scores' place
    for layer in reversed(network.layers):
        mem = layer.memory(m, s, train)
        peak = max(peak, kept + grad + mem.grad_in + mem.backward_scratch)
        kept -= kept_by.pop()
        if not mem.in_place:
            grad = mem.grad_in
    return held + peak


def training_state_bytes(network, optimizer_copies: int) -> int:
    """Optimizer state and its scratch buffers. (The gradients exist from the warm-up in
    `measure_baseline` on, so the baseline holds them.)"""
    scratch = len(network.workspaces) * CHUNK * network.dtype.itemsize
    return network.param_bytes() * optimizer_copies + scratch


def _activations(network, m, train):
    """Every thread has a micro-batch in flight."""
    return network.threads * activation_peak(network, m, train)


def _peak(baseline, fixed, activations):
    return baseline + fixed + activations + MARGIN_BYTES + int(MARGIN_SHARE * (fixed + activations))


def make_plan(network, budget: int, baseline: int, train: bool, batch_size: int,
              fixed: int) -> Plan:
    """The plan of the fastest thread count, up to the network's: under a tight budget,
    one thread with large micro-batches beats two with tiny ones (measured at 64M: 15.5 s
    an epoch against 25.7 s)."""
    most = network.threads
    best, best_speed, refusal = None, 0.0, None
    for threads in range(most, 0, -1):
        network.threads = threads
        try:
            plan = _make_plan(network, budget, baseline, train, batch_size, fixed)
        except LowmemError as err:
            refusal = err  # the last, one thread's, names the smallest minimum
            continue
        m = plan.micro_batch
        speed = threads * m / (m + MICRO_BATCH_OVERHEAD_IMAGES)
        if speed > best_speed:
            best, best_speed = plan, speed
    if best is None:
        network.threads = most
        raise refusal
    network.threads = best.threads
    best.apply(network)
    return best


def _make_plan(network, budget: int, baseline: int, train: bool, batch_size: int,
               fixed: int) -> Plan:
    """The largest micro-batch (at most `batch_size`) and column tiles that fit `budget`.

    A training plan also sizes the micro-batch of the evaluations made between
    epochs. Raises LowmemError with the minimum budget when not even one image with
    one-row tiles fits.
    """
    convs = _convolutions(network)
    s = network.dtype.itemsize

    def set_tiles(m, tile_bytes):
        for layer in convs:
            rows = max(1, tile_bytes // (layer.width * s))
            layer.tile_rows = min(rows, m * layer.rows_per_image)

    def peak_for(m, tile_bytes):
        set_tiles(m, tile_bytes)
        return _peak(baseline, fixed, _activations(network, m, train))

    # Shrink the tiles only when even one image does not fit with cache-sized tiles.
    tile_bytes = TILE_BYTES
    while tile_bytes > 1 and peak_for(1, tile_bytes) > budget:
        tile_bytes //= 2
    minimum = peak_for(1, 1)
    if minimum > budget:
        raise LowmemError(
            f"--max-ram {budget:,} bytes is too small: this run needs at least {minimum:,} bytes "
            f"({minimum / 2**20:.1f} MiB; the process already holds {baseline / 2**20:.1f} MiB)"
        )
    def largest(cap, training, fits):  # the largest m <= cap that fits (1 at least)
        low, high = 1, cap
        while low < high:
            mid = (low + high + 1) // 2
            set_tiles(mid, tile_bytes)
            if fits(_activations(network, mid, training)):
                low = mid
            else:
                high = mid - 1
        return low

    def in_budget(activations):
        return _peak(baseline, fixed, activations) <= budget

    per_thread = -(-batch_size // network.threads)
    if train:
        micro_batch = largest(min(per_thread, MAX_TRAIN_MICRO_BATCH), True, in_budget)
        # equal micro-batches: 50 images as 31 + 19 would leave one thread idle a third
        # of the time
        parts = -(-per_thread // micro_batch)
        micro_batch = -(-per_thread // parts)
        # The evaluations between epochs take the room training has, no more: they
        # are a small part of the time, and the budget's room goes to training.
        set_tiles(micro_batch, tile_bytes)
        room = _activations(network, micro_batch, True)
        eval_micro_batch = largest(MAX_EVAL_MICRO_BATCH, False, lambda a: a <= room)
    else:
        eval_micro_batch = micro_batch = largest(min(per_thread, MAX_EVAL_MICRO_BATCH), False,
                                                 in_budget)
    # Tiles sized for the smaller micro-batch serve the other as well.
    set_tiles(micro_batch, tile_bytes)
    activations = max(_activations(network, micro_batch, train),
                      _activations(network, eval_micro_batch, False))
    return Plan(
        budget=budget, baseline=baseline, fixed=fixed, micro_batch=micro_batch,
        eval_micro_batch=eval_micro_batch, threads=network.threads,
        tile_rows=tuple(layer.tile_rows for layer in convs),
        activations=activations, peak=_peak(baseline, fixed, activations),
    )


def recorded_plan(network, budget: int, baseline: int, fixed: int, micro_batch: int,
                  eval_micro_batch: int, tile_rows, threads: int) -> Plan:
    """A training plan chosen before (a resumed run keeps it, so that its arithmetic is
    the same), checked against this budget."""
    convs = _convolutions(network)
    if len(tile_rows) != len(convs):
        raise LowmemError("the recorded plan does not fit this network")
    network.threads = threads
    for layer, rows in zip(convs, tile_rows, strict=True):
        layer.tile_rows = rows
    activations = max(_activations(network, micro_batch, True),
                      _activations(network, eval_micro_batch, False))
    peak = _peak(baseline, fixed, activations)
    if peak > budget:
        raise LowmemError(
            f"--max-ram {budget:,} bytes is too small for the plan this run was started with: "
            f"it needs at least {peak:,} bytes ({peak / 2**20:.1f} MiB)")
    return Plan(budget=budget, baseline=baseline, fixed=fixed, micro_batch=micro_batch,
                eval_micro_batch=eval_micro_batch, threads=network.threads, tile_rows=tuple(tile_rows),
                activations=activations, peak=peak)


def measure_baseline(network, train: bool) -> int:
    """RSS once the process holds its libraries, parameters and BLAS buffers.

    Two images through the network make the BLAS library set up its thread buffers
    and NumPy its caches, so the measurement includes them.
    """
    from lowmem_cnn.budget import current_rss

    images = np.zeros((2, network.input_size), np.uint8)
    if train:
        network.accumulate_gradient(images, np.zeros(2, np.int64), 2)
        network.zero_grads()
    else:
        network.predict(images, 2)
    return current_rss()
