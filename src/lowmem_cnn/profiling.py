"""profile-memory: the book's whole-batch im2col bytes against the tiles, and a measured run."""

import math
from dataclasses import dataclass

from lowmem_cnn.memory.budget import peak_rss
from lowmem_cnn.training.evaluation import MAX_READ_IMAGES


def layer_table(network, plan, batch_size: int, train: bool) -> list[dict]:
    """Rows per layer, as each layer gives them (Layer.profile_rows): the book's
    whole-batch im2col for `batch_size` images against what the layer asked of a
    workspace for one micro-batch of the plan, run alone, with the plan's tiles; and its
    output's bytes for the micro-batch."""
    rows = []
    tiles = network.tile_map(plan.tiles)
    recordings = network.layer_recordings(plan.micro_batch, train, plan.tiles)
    for layer, recording in zip(network.layers, recordings, strict=True):
        for row in layer.profile_rows(recording, batch_size, tiles.get(id(layer))):
            row["activation_bytes"] = plan.micro_batch * math.prod(row["output_shape"]) \
                * network.dtype.itemsize
            rows.append(row)
    return rows


def run_batch(network, split, plan, batch_size: int, train: bool) -> int:
    """Run the first `batch_size` images of `split` through the network (forward, or
    forward and backward) as the plan says; return the peak RSS of the process."""
    n = min(batch_size, len(split), MAX_READ_IMAGES)
    images = split.images.read_range(0, n)
    if train:
        network.accumulate_gradient(images, split.labels[:n], plan)
    else:
        network.predict(images, plan)
    return peak_rss()


@dataclass
class MemoryProfile:
    """What profile-memory found for a network and a batch size."""

    rows: list  # layer_table's
    plan: object  # planner.Plan
    measured: int  # the peak RSS of the process once the batch has run
    budget: int


def profile_memory(budget: int, data, batch_size: int, train: bool, config_name=None,
                   dtype="float32", threads: int = 1, plot=None,
                   report=lambda text: None) -> MemoryProfile:
    """The layer table of a network (the config named, parameters drawn from seed 0)
    for `batch_size` images, and the peak RSS of running the first of the test split of
    `data` (data.DataOptions) through it as planned under `budget`: forward, and with
    `train` backward too. With `plot`, the table is drawn into it
    (plotting.plot_memory) and report(text) says so."""
    from lowmem_cnn.memory.planner import Work
    from lowmem_cnn.session import Session

    session = Session(budget, config_name, dtype, threads, data)
    network = session.network
    # forward (and backward) of one batch: no evaluations between epochs to make room for
    work = Work("train" if train else "evaluate", batch_size, read=min(batch_size, MAX_READ_IMAGES),
                picture="memory" if plot else None)
    opened = session.prepare(work, optimizer_copies=0 if train else None)
    rows = layer_table(network, session.plan, batch_size, train)
    measured = run_batch(network, opened.test, session.plan, batch_size, train)
    if plot:
        from lowmem_cnn.plotting import plot_memory

        network.release_memory()
        plot_memory(rows, budget, plot)
        report(f"memory per layer drawn in {plot}")
    return MemoryProfile(rows, session.plan, measured, budget)
