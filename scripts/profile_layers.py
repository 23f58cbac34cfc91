"""Per-layer times of one training micro-batch: forward and backward of each layer.

One thread (a single-threaded BLAS, as lowmem-cnn runs it), large arrays mapped one by
one (as the commands run), the plan's tile sizes for a budget, warm workspaces. Each
repetition runs a whole micro-batch (every forward, the loss, every backward, as
Network._gradient does, with a workspace.Context), timing each layer's call; the table
gives the minimum and the median over the repetitions, in ms (of thread CPU time with
CPU_CLOCK=1 in the environment: less moved by other programs than wall time).

    python scripts/profile_layers.py --config deep_convnet --reps 50
    python scripts/profile_layers.py --compare HEAD   # A/B, alternated in one process
    python scripts/profile_layers.py --tile-bytes 524288 --tile-bytes 0   # tile sizes

--compare REF loads git revision REF as a second package and builds its network (same
config, same weights, same tile sizes, its own workspace), whose layers run in
alternation with this tree's, so that both see the same machine load. REF must take
the layers' calls as this tree does (forward(x, ctx), backward(dout, saved, grads, ctx),
since 6db8776); across that change, scripts/compare_revision.py compares whole training
batches. The machine is shared: read the numbers as noisy.
"""

import argparse
import atexit
import importlib
import inspect
import os
import shutil
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

from lowmem_cnn.memory.budget import map_large_arrays, parse_size  # noqa: E402
from lowmem_cnn.files.config import load_config  # noqa: E402
from lowmem_cnn.engine.model import Network  # noqa: E402
from lowmem_cnn.memory.planner import make_plan  # noqa: E402
from lowmem_cnn.engine.workspace import WHOLE  # noqa: E402


def load_revision(ref: str):
    """The lowmem_cnn package of git revision `ref`, imported as lowmem_cnn_ref (from a
    temporary directory removed when the process exits); its layers module."""
    root = Path(tempfile.mkdtemp(prefix="lowmem_ref_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / "lowmem_cnn_ref"
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", f"{ref}:src/lowmem_cnn"],
                           cwd=HERE.parent, check=True, capture_output=True, text=True).stdout
    for name in names.split():
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{ref}:src/lowmem_cnn/{name}"], cwd=HERE.parent,
                                  check=True, capture_output=True, text=True).stdout
            (package / name).parent.mkdir(parents=True, exist_ok=True)
            text = text.replace("lowmem_cnn.", "lowmem_cnn_ref.")
            (package / name).write_text(text.replace("from lowmem_cnn import", "from lowmem_cnn_ref import"))
    sys.path.insert(0, str(root))
    return module("lowmem_cnn_ref", "layers")


# where a module is: in the folders since they came (engine/, files/, memory/), or flat before
FOLDERS = {"layers": "engine", "workspace": "engine", "conv_pool": "engine", "model": "engine",
           "config": "files", "planner": "memory", "budget": "memory"}


def module(package: str, name: str):
    """Module `name` of `package` (lowmem_cnn or a revision's lowmem_cnn_ref), wherever
    that revision keeps it."""
    try:
        return importlib.import_module(f"{package}.{FOLDERS[name]}.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"{package}.{name}")


def images_and_labels(m):
    directory = os.environ.get("LOWMEM_CNN_DATA")
    if directory:
        from lowmem_cnn.data.idx import open_directory

        data = open_directory(Path(directory))
        return data.train.images.read_range(0, m), data.train.labels[:m].astype(np.int64)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (m, 784), dtype=np.uint8), rng.integers(0, 10, m)


class Variant:
    """A network of one package (lowmem_cnn, or lowmem_cnn_ref for --compare) with tile
    sizes (one per tiled layer, as a plan's), its own workspace and gradient set."""

    def __init__(self, package: str, network, planned: tuple, tile_bytes: int | None, m: int):
        """`planned`: the plan's tile sizes; `tile_bytes`: column tiles of that many bytes
        in the unfused convolutions instead (0: the whole micro-batch of m images)."""
        self.layers_module = module(package, "layers")
        self.workspace_module = module(package, "workspace")
        self.conv_pool_module = module(package, "conv_pool")
        self.network = network
        s = network.dtype.itemsize
        tiles = tuple(size if tile_bytes is None or not isinstance(layer, self.layers_module.Convolution)
                      else m * layer.rows_per_image if tile_bytes == 0
                      else max(1, tile_bytes // (layer.width * s))
                      for layer, size in zip(network.tiled, planned, strict=True))
        self.by_layer = dict(zip(map(id, network.tiled), tiles, strict=True))
        self.ws = self.workspace_module.Workspace()
        sums = network._gradient_sets()[0]  # a ThreadSums; before, (flat, per layer)
        self.grads = sums.layer_grads if hasattr(sums, "layer_grads") else sums[1]  # one per layer
        self.statistics = {"statistics": sums.statistics} if hasattr(sums, "statistics") else {}

    def tile(self, layer) -> str:
        """The layer's tile: column rows (a convolution) or images (a fused one)."""
        size = self.by_layer.get(id(layer))
        if size is None:
            return ""
        unit = "img" if isinstance(layer, self.conv_pool_module.ConvolutionPooling) else "rows"
        return f"all {unit}" if size >= WHOLE else f"{size} {unit}"

    def run(self, images, labels, times) -> float:
        """One micro-batch, as Network._gradient, each layer's call timed into `times`."""
        clock = time.thread_time if os.environ.get("CPU_CLOCK") else time.perf_counter
        network, layers = self.network, self.network.layers
        for g in (*self.grads, *self.statistics.get("statistics", {}).values()):
            g.restart()
        noise = np.random.default_rng(0) if network.draws_noise else None
        ctx = self.workspace_module.Context(self.ws, True, self.by_layer, noise, len(labels),
                                            **self.statistics)
        x = network.to_input(images, self.ws)
        saved = []
        for i, layer in enumerate(layers):
            start = clock()
            x, keep = layer.forward(x, ctx)
            times[i][0].append(clock() - start)
            saved.append(keep)
        loss, grad = self.layers_module.softmax_cross_entropy(x, labels, len(labels))
        for i in reversed(range(len(layers))):
            start = clock()
            grad = layers[i].backward(grad, saved[i], self.grads[i], ctx)
            times[i][1].append(clock() - start)
        return loss


def revision_network(ref: str, network):
    """The network of revision `ref` (same config, same weights), or exit when its layers
    take another API than this tree's."""
    load_revision(ref)
    layers = module("lowmem_cnn_ref", "layers")
    if list(inspect.signature(layers.Convolution.forward).parameters) != ["self", "x", "ctx"]:
        sys.exit(f"--compare {ref}: its layers take another API than this tree's (before 6db8776: "
                 f"forward(x, train, ws, noise)), which this script does not drive; compare whole "
                 f"training batches with: python scripts/compare_revision.py {ref}")
    model = module("lowmem_cnn_ref", "model")
    theirs = model.Network(network.config, network.dtype, threads=1)
    theirs.load_book_params(network.book_params())
    return theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deep_convnet")
    parser.add_argument("--images", type=int, default=50, help="micro-batch size")
    parser.add_argument("--max-ram", default="2G", help="budget the tile sizes are planned for")
    parser.add_argument("--tile-bytes", type=int, action="append", default=[],
                        help="column tiles of this many bytes in every (unfused) convolution "
                             "instead of the plan's (0: the whole micro-batch); repeat it to "
                             "alternate sizes")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--compare", metavar="REF",
                        help="git revision to alternate with (one with this tree's layer API)")
    options = parser.parse_args()
    map_large_arrays()  # as the commands do: a fresh large array is faulted in afresh

    config = load_config(options.config)
    network = Network(config.network, np.float32, threads=1)
    network.init_params(np.random.default_rng(0))
    m = options.images
    plan = make_plan(network, parse_size(options.max_ram), 0, True, m, 0, evaluations=False)
    images, labels = images_and_labels(m)

    variants = {}
    for size in options.tile_bytes or [None]:
        name = "this tree" + ("" if size is None else f", tiles of {size or 'all'} bytes")
        variants[name] = Variant("lowmem_cnn", network, plan.tiles, size, m)
    if options.compare:
        theirs = revision_network(options.compare, network)
        variants[options.compare] = Variant("lowmem_cnn_ref", theirs, plan.tiles,
                                            options.tile_bytes[0] if options.tile_bytes else None, m)
    times = {name: [([], []) for _ in v.network.layers] for name, v in variants.items()}
    totals = {name: [] for name in variants}
    losses = {name: None for name in variants}
    for rep in range(options.reps + 2):  # the first two warm the workspaces, and are dropped
        for name, variant in variants.items():
            start = time.perf_counter()
            losses[name] = variant.run(images, labels, times[name])
            totals[name].append(time.perf_counter() - start)
            if rep < 2:
                totals[name].clear()
                for f, b in times[name]:
                    f.clear()
                    b.clear()

    print(f"{config.network.name}, {m} images, 1 thread, {options.reps} repetitions; ms, "
          f"min / median")
    for name, variant in variants.items():
        print(f"\n== {name}: loss {losses[name]:.6f}")
        print(f"{'layer':44} {'tile':>10} {'forward':>15} {'backward':>15}")
        for layer, (f, b) in zip(variant.network.layers, times[name], strict=True):
            print(f"{layer.describe():44} {variant.tile(layer):>10} "
                  f"{1e3 * min(f):6.2f} / {1e3 * statistics.median(f):6.2f} "
                  f"{1e3 * min(b):6.2f} / {1e3 * statistics.median(b):6.2f}")
        conv = [(f, b) for layer, (f, b) in zip(variant.network.layers, times[name], strict=True)
                if variant.tile(layer)]
        print(f"{'convolutions, sum of mins':44} {'':10} {1e3 * sum(min(f) for f, _ in conv):15.2f} "
              f"{1e3 * sum(min(b) for _, b in conv):15.2f}")
        t = totals[name]
        print(f"{'whole micro-batch':44} {'':10} {1e3 * min(t):6.2f} / {1e3 * statistics.median(t):6.2f}")


if __name__ == "__main__":
    main()
