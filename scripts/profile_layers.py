"""Per-layer times of one training micro-batch: forward and backward of each layer.

One thread (a single-threaded BLAS, as lowmem-cnn runs it), large arrays mapped one by
one (as the commands run), the plan's tile sizes for a budget, warm workspaces. Each
repetition runs a whole micro-batch (every forward, the loss, every backward, as
Network._gradient does), timing each layer's call; the table gives the minimum and the
median over the repetitions, in ms (of thread CPU time with CPU_CLOCK=1 in the
environment: less moved by other programs than wall time).

    python scripts/profile_layers.py --config deep_convnet --reps 50
    python scripts/profile_layers.py --compare HEAD   # A/B, alternated in one process
    python scripts/profile_layers.py --tile-bytes 524288 --tile-bytes 0   # tile sizes

--compare REF loads the layers of git revision REF as a second package and runs its
layers (same weights, same inputs) in alternation with this tree's, so that both
see the same machine load. The machine is shared: read the numbers as noisy.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy (see lowmem_cnn/__init__)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402

from lowmem_cnn.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.config import load_config  # noqa: E402
from lowmem_cnn.layers import Gradients, softmax_cross_entropy  # noqa: E402
from lowmem_cnn.model import Network  # noqa: E402
from lowmem_cnn.planner import make_plan  # noqa: E402
from lowmem_cnn.workspace import Workspace  # noqa: E402


def load_revision(ref: str):
    """The lowmem_cnn package of git revision `ref`, imported as lowmem_cnn_ref."""
    root = Path(tempfile.mkdtemp(prefix="lowmem_ref_"))
    package = root / "lowmem_cnn_ref"
    package.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{ref}:src/lowmem_cnn"],
                           cwd=HERE.parent, check=True, capture_output=True, text=True).stdout
    for name in names.split():
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{ref}:src/lowmem_cnn/{name}"], cwd=HERE.parent,
                                  check=True, capture_output=True, text=True).stdout
            (package / name).write_text(text.replace("lowmem_cnn.", "lowmem_cnn_ref."))
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    import lowmem_cnn_ref.layers

    return lowmem_cnn_ref.layers


def images_and_labels(m):
    directory = os.environ.get("LOWMEM_CNN_DATA")
    if directory:
        from lowmem_cnn.data import open_directory

        data = open_directory(Path(directory))
        return data.train.images.read_range(0, m), data.train.labels[:m].astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (m, 784), dtype=np.uint8), rng.integers(0, 10, m)


def as_variant(layer, layers_module):
    """The same layer (same weights, same tile size) as the class of another revision."""
    variant = object.__new__(getattr(layers_module, type(layer).__name__))
    variant.__dict__ = layer.__dict__
    return variant


def run(network, layers, grads, ws, images, labels, times):
    """One micro-batch, as Network._gradient, each layer's call timed into `times`."""
    clock = time.thread_time if os.environ.get("CPU_CLOCK") else time.perf_counter
    for g in grads:
        g.restart()
    x = network.to_input(images, ws)
    saved = []
    noise = np.random.default_rng(0)
    for i, layer in enumerate(layers):
        start = clock()
        x, keep = layer.forward(x, True, ws, noise)
        times[i][0].append(clock() - start)
        saved.append(keep)
    loss, grad = softmax_cross_entropy(x, labels, len(labels))
    for i in reversed(range(len(layers))):
        start = clock()
        grad = layers[i].backward(grad, saved[i], grads[i], ws)
        times[i][1].append(clock() - start)
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--images", type=int, default=50, help="micro-batch size")
    parser.add_argument("--max-ram", default="2G", help="budget the tile sizes are planned for")
    parser.add_argument("--tile-bytes", type=int, action="append", default=[],
                        help="column tiles of this many bytes in every convolution instead of "
                             "the plan's (0: the whole micro-batch); repeat it to alternate sizes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--compare", metavar="REF", help="git revision to alternate with")
    options = parser.parse_args()
    map_large_arrays()  # as the commands do: a fresh large array is faulted in afresh

    config = load_config(options.config)
    network = Network(config.network, np.float32, threads=1)
    network.init_params(np.random.default_rng(0))
    m = options.images
    make_plan(network, parse_size(options.max_ram), 0, True, m, 0, evaluations=False)
    convs = [layer for layer in network.layers if layer.kind == "conv"]
    planned = [layer.tile_rows for layer in convs]
    images, labels = images_and_labels(m)
    grads = [Gradients({name: np.zeros_like(getattr(layer, name)) for name in layer.param_shapes})
             for layer in network.layers]

    def tiles(size):  # the tile rows of each convolution for `size` bytes (None: planned)
        if size is None:
            return planned
        return [m * layer.rows_per_image if size == 0 else max(1, size // (layer.width * 4))
                for layer in convs]

    variants, tile_rows = {}, {}
    for size in options.tile_bytes or [None]:
        name = "this tree" + ("" if size is None else f", tiles of {size or 'all'} bytes")
        variants[name], tile_rows[name] = network.layers, tiles(size)
    if options.compare:
        module = load_revision(options.compare)
        variants[options.compare] = [as_variant(layer, module)
                                     if hasattr(module, type(layer).__name__) else layer
                                     for layer in network.layers]
        tile_rows[options.compare] = tiles(options.tile_bytes[0] if options.tile_bytes else None)
    workspaces = {name: Workspace() for name in variants}
    times = {name: [([], []) for _ in network.layers] for name in variants}
    totals = {name: [] for name in variants}
    losses = {name: None for name in variants}
    for rep in range(options.reps + 2):  # the first two warm the workspaces, and are dropped
        for name, layers in variants.items():
            for layer, rows in zip(convs, tile_rows[name], strict=True):
                layer.tile_rows = rows
            start = time.perf_counter()
            losses[name] = run(network, layers, grads, workspaces[name], images, labels,
                               times[name])
            totals[name].append(time.perf_counter() - start)
            if rep < 2:
                totals[name].clear()
                for f, b in times[name]:
                    f.clear()
                    b.clear()

    print(f"{config.network.name}, {m} images, 1 thread, {options.reps} repetitions; ms, "
          f"min / median")
    for name in variants:
        print(f"\n== {name}: loss {losses[name]:.6f}")
        print(f"{'layer':44} {'tile rows':>9} {'forward':>15} {'backward':>15}")
        rows = iter(tile_rows[name])
        for layer, (f, b) in zip(variants[name], times[name], strict=True):
            tile = next(rows) if layer.kind == "conv" else ""
            print(f"{layer.describe():44} {tile!s:>9} "
                  f"{1e3 * min(f):6.2f} / {1e3 * statistics.median(f):6.2f} "
                  f"{1e3 * min(b):6.2f} / {1e3 * statistics.median(b):6.2f}")
        conv = [(f, b) for layer, (f, b) in zip(variants[name], times[name], strict=True)
                if layer.kind == "conv"]
        print(f"{'convolutions, sum of mins':44} {'':9} {1e3 * sum(min(f) for f, _ in conv):15.2f} "
              f"{1e3 * sum(min(b) for _, b in conv):15.2f}")
        t = totals[name]
        print(f"{'whole micro-batch':44} {'':9} {1e3 * min(t):6.2f} / {1e3 * statistics.median(t):6.2f}")


if __name__ == "__main__":
    main()
