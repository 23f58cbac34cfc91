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
# matplotlib and one picture, measured: learning curves of 20 epochs 44.7 MiB, the
# memory per layer 46.9 MiB, 100 misclassified digits (100 small axes) 82.3 MiB.
PICTURE_BYTES = {"curves": 48 * 2**20, "memory": 50 * 2**20, "digits": 88 * 2**20}
MARGIN_SHARE = 0.10
# The baseline of two runs of the same command differs by 16 KiB to 1 MiB (measured):
# a minimum named for one must hold for the next.
BASELINE_JITTER = 1 << 20
# See check_parameters_fit.
SMALL_PARAMETERS = 16 * 2**20


@dataclass(frozen=True)
class Plan:
    budget: int
    baseline: int
    fixed: int
    micro_batch: int  # images through the network at once on each thread (training)
    eval_micro_batch: int  # the same for evaluation
    threads: int  # micro-batches in flight at once
    tiles: tuple  # one per tiled layer, in layer order (see tiled_layers)
    activations: int
    peak: int

    def apply(self, network):
        """Run `network` as planned: its tile sizes and thread count. The workspaces of
        threads the plan leaves idle are emptied: it counts only its own threads'."""
        for layer, size in zip(tiled_layers(network), self.tiles, strict=True):
            if layer.kind == "conv":
                layer.tile_rows = size
            else:
                layer.tile_images = size
        network.threads = self.threads
        for ws in network.workspaces[self.threads :]:
            ws.clear()


def tiled_layers(network):
    """The layers that work in tiles: a convolution's tile is column rows, a fused
    convolution and pooling's is images."""
    return [layer for layer in network.layers if layer.kind in ("conv", "conv+pool")]


def activation_peak(network, m: int, train: bool, tiles: tuple | None = None) -> int:
    """Peak bytes of the arrays one micro-batch of m images allocates, with `tiles`
    (one size per tiled layer, see tiled_layers; default: the layers' own).

    The layers' workspace arrays (see workspace.py) are held throughout; on top of
    them, walks the forward pass (and the backward pass when training) counting the
    other arrays alive at each step: what the layers keep for backward, the current
    activation or gradient, the layer's new output and its temporaries.
    """
    s = network.dtype.itemsize
    sizes = {} if tiles is None else dict(zip(map(id, tiled_layers(network)), tiles, strict=True))
    memory = {id(layer): (layer.memory(m, s, train, sizes[id(layer)]) if id(layer) in sizes
                          else layer.memory(m, s, train)) for layer in network.layers}
    held = m * int(np.prod(network.input_shape)) * s  # the input, in the workspace
    shared = {}  # workspace arrays that layers of a kind share: the largest of each, once
    for layer in network.layers:
        held += memory[id(layer)].workspace
        if hasattr(layer, "shared_workspace"):
            for name, size in layer.shared_workspace(m, s, train, sizes.get(id(layer))).items():
                held -= size
                shared[name] = max(shared.get(name, 0), size)
    held += sum(shared.values())
    alive = peak = kept = 0
    kept_by = []  # what each layer keeps until its backward
    for layer in network.layers:
        mem = memory[id(layer)]
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
        mem = memory[id(layer)]
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


def _activations(network, m, train, threads, tiles):
    """Every thread has a micro-batch in flight."""
    return threads * activation_peak(network, m, train, tiles)


def _peak(baseline, fixed, activations):
    return baseline + fixed + activations + MARGIN_BYTES + int(MARGIN_SHARE * (fixed + activations))


def _too_small(budget: int, minimum: int, held: int) -> LowmemError:
    from lowmem_cnn.budget import format_size

    return LowmemError(
        f"the budget of {budget:,} bytes is too small: this run needs at least {minimum:,} bytes "
        f"({format_size(minimum)}; the process already holds {format_size(held)})")


def check_parameters_fit(network, budget: int, optimizer_copies: int | None = None,
                         loading: bool = False):
    """Refuse, before any parameter exists, a budget that cannot hold the parameters
    (from the config's shapes), what making them takes (drawing them in chunks, or
    reading a file: its bytes and the float64 arrays in it), for training one set of
    gradients and `optimizer_copies` more copies, and one image's activations.

    A lower bound of the plan's minimum: without it, a config of a billion filters
    died in NumPy's MemoryError, and a 3 GB affine layer peaked at 9.1 GB before the
    plan refused it. Parameters that take less than SMALL_PARAMETERS to make are made
    anyway, so that the plan (which measures them) names the exact minimum.
    """
    from lowmem_cnn.budget import current_rss
    from lowmem_cnn.model import INIT_CHUNK

    params = network.param_bytes()
    train = optimizer_copies is not None
    need = params * (2 + optimizer_copies) if train else params
    if loading:
        need += 2 * params * 8 // network.dtype.itemsize
    else:
        need += INIT_CHUNK * 8
    making = need
    need += activation_peak(network, 1, train, (1,) * len(tiled_layers(network)))
    held = current_rss()
    minimum = held + need + MARGIN_BYTES
    if minimum > budget and making > SMALL_PARAMETERS:
        raise _too_small(budget, minimum, held)


def make_plan(network, budget: int, baseline: int, train: bool, batch_size: int,
              fixed: int, evaluations: bool = True) -> Plan:
    """The plan of the fastest thread count, up to the threads the network was built for
    (not the count an earlier plan applied): under a tight budget, one thread with large
    micro-batches beats two with tiny ones (measured at 64M: 15.5 s an epoch against
    25.7 s). A training plan also makes room for the evaluations between epochs unless
    `evaluations` is False. The search only computes; the plan chosen is then applied to
    the network (its tiles and threads)."""
    best, best_speed, refusal = None, 0.0, None
    for threads in range(len(network.workspaces), 0, -1):
        try:
            plan = _make_plan(network, threads, budget, baseline, train, batch_size, fixed,
                              evaluations)
        except LowmemError as err:
            refusal = err  # the last, one thread's, names the smallest minimum
            continue
        m = plan.micro_batch
        speed = threads * m / (m + MICRO_BATCH_OVERHEAD_IMAGES)
        if speed > best_speed:
            best, best_speed = plan, speed
    if best is None:
        raise refusal
    best.apply(network)
    return best


def _make_plan(network, threads: int, budget: int, baseline: int, train: bool,
               batch_size: int, fixed: int, evaluations: bool) -> Plan:
    """The largest micro-batch (at most `batch_size`) and tiles that fit `budget`.

    A training plan also sizes the micro-batch of the evaluations made between
    epochs. Raises LowmemError with the minimum budget when not even one image with
    one-row tiles fits.
    """
    tiled = tiled_layers(network)
    fused = any(layer.kind == "conv+pool" for layer in tiled)
    s = network.dtype.itemsize
    fused_images = 1  # images per tile of the fused layers

    def tiles_for(m, tile_bytes):
        """Convolutions: column rows of about tile_bytes; fused layers: fused_images."""
        return tuple(min(max(1, tile_bytes // (layer.width * s)), m * layer.rows_per_image)
                     if layer.kind == "conv" else min(fused_images, m) for layer in tiled)

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
        raise LowmemError(
            f"a picture needs matplotlib, about {PICTURE_BYTES[picture] / 2**20:.0f} MiB on top of the "
            f"{baseline / 2**20:.1f} MiB the process holds: --max-ram must be at least {needed:,} "
            f"bytes ({needed / 2**20:.1f} MiB) with --plot or --misclassified")


def recorded_plan(network, budget: int, baseline: int, fixed: int, micro_batch: int,
                  eval_micro_batch: int, tiles, threads: int) -> Plan:
    """A training plan chosen before (a resumed run keeps it, so that its arithmetic is
    the same), checked against this budget, then applied to the network."""
    tiles = tuple(tiles)
    if len(tiles) != len(tiled_layers(network)) or not 1 <= threads <= len(network.workspaces):
        raise LowmemError("the recorded plan does not fit this network")
    activations = max(_activations(network, micro_batch, True, threads, tiles),
                      _activations(network, eval_micro_batch, False, threads, tiles))
    peak = _peak(baseline, fixed, activations)
    if peak > budget:
        raise LowmemError(
            f"--max-ram {budget:,} bytes is too small for the plan this run was started with: "
            f"it needs at least {peak:,} bytes ({peak / 2**20:.1f} MiB)")
    plan = Plan(budget=budget, baseline=baseline, fixed=fixed, micro_batch=micro_batch,
                eval_micro_batch=eval_micro_batch, threads=threads, tiles=tiles,
                activations=activations, peak=peak)
    plan.apply(network)
    return plan


def measure_baseline(network, train: bool) -> int:
    """RSS once the process holds its libraries, parameters and BLAS buffers.

    Two images through the network make the BLAS library set up its thread buffers
    and NumPy its caches, so the measurement includes them.
    """
    from lowmem_cnn.budget import current_rss

    images = np.zeros((2, network.input_size), np.uint8)
    if train:
        network.accumulate_gradient(images, np.zeros(2, np.int64), 2)
    else:
        network.predict(images, 2)
    return current_rss()
