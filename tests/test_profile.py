"""profile-memory's figures are what each layer asks of a workspace (the Recording), not
a formula beside the layers: the same bytes as a real pass of that layer."""

import math

import numpy as np
import pytest
from click.testing import CliRunner

from lowmem_cnn.cli import main
from lowmem_cnn.engine.model import Network
from lowmem_cnn.engine.workspace import Context, Workspace
from lowmem_cnn.files.config import load_config
from lowmem_cnn.profiling import layer_table


class _Plan:
    def __init__(self, micro_batch, tiles):
        self.micro_batch, self.tiles = micro_batch, tiles


def real_pass(network, layer, m, train, tile_map):
    """A layer's own Workspace after real passes (forward, and backward in training) of
    two micro-batches of an update: the first writes its gradients whole, the second
    adds to them (an affine layer needs a buffer only then)."""
    rng = np.random.default_rng(1)
    ws = Workspace()
    ctx = Context(ws, train, tile_map, np.random.default_rng(2) if train else None, m)
    grads = network._gradient_sets()[0].layer_grads[network.layers.index(layer)]
    grads.restart()
    for _ in range(2 if train else 1):
        x = rng.standard_normal((m, *layer.in_shape)).astype(network.dtype)
        out, saved = layer.forward(x, ctx)
        if train:
            layer.backward(np.ones_like(out), saved, grads, ctx)
    return ws


@pytest.mark.parametrize("config", ["deep_convnet", "simple_convnet", "photos"])
@pytest.mark.parametrize("train", [False, True])
def test_each_row_is_what_the_layer_holds_after_a_real_pass(config, train):
    network = Network(load_config(config).network, np.float32)
    network.init_params(np.random.default_rng(0))
    m = 3
    # 2,000-row column tiles (the example), 2-image fused tiles
    tiles = tuple(2000 if layer.tile_unit == "rows" else 2 for layer in network.tiled)
    rows = layer_table(network, _Plan(m, tiles), 100, train)
    # a row per layer, and one more for a pooling fused into its convolution
    own = [row for row in rows if not row["layer"].endswith("(in conv)")]
    assert len(own) == len(network.layers)
    tile_map = network.tile_map(tiles)
    for layer, row in zip(network.layers, own, strict=True):
        assert row["layer"].startswith(layer.describe().split(" + ")[0])
        ws = real_pass(network, layer, m, train, tile_map)
        assert row["workspace_bytes"] == ws.held_bytes(), row["layer"]
        assert row["tiled_bytes"] == ws.bytes_of(layer.column_arrays), row["layer"]
        assert row["tile_unit"] == layer.tile_unit
        if layer.tile_unit:
            assert row["tile"] == tile_map[id(layer)]
        assert row["activation_bytes"] == m * math.prod(layer.out_shape) * 4 or " + " in layer.describe()


def test_deep_convnets_column_tiles_are_not_the_old_formula():
    """2,000 rows of 3x3x1 columns are 72,000 bytes by rows x width x 4; the layer asks
    for fewer (it makes columns of pairs of outputs: columns.ConvGeometry)."""
    network = Network(load_config("deep_convnet").network, np.float32)
    network.init_params(np.random.default_rng(0))
    tiles = (2000,) * len(network.tiled)
    rows = layer_table(network, _Plan(100, tiles), 100, False)
    first = rows[0]
    assert first["layer"].startswith("conv")
    assert first["tiled_bytes"] != 2000 * 9 * 4
    tile_map = network.tile_map(tiles)
    assert first["tiled_bytes"] == real_pass(network, network.layers[0], 100, False, tile_map).bytes_of(
        network.layers[0].column_arrays)


def test_the_table_names_its_columns(mnist_dir):
    result = CliRunner().invoke(main, ["profile-memory", "--batch-size", "50", "--data-dir",
                                       str(mnist_dir)])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("layer"))
    assert header.split()[-3:] == ["columns", "here", "tile"] and "windows" not in header
    fused = next(line for line in result.output.splitlines() if "(+pool)" in line)
    assert fused.rstrip().endswith("images")  # the fused layer's tiles are images
