"""profile-memory: the book's whole-batch im2col bytes against the tiles, and a measured run."""

import math

from lowmem_cnn.memory.budget import peak_rss
from lowmem_cnn.engine.conv_pool import ConvolutionPooling
from lowmem_cnn.engine.layers import Convolution
from lowmem_cnn.training.run import MAX_READ_IMAGES


def layer_table(network, plan, batch_size: int) -> list[dict]:
    """One row per layer of the book's network for a batch of `batch_size` images (a
    fused convolution and pooling make two rows), with the tiles of `plan`."""
    s = network.dtype.itemsize
    tiles = dict(zip(map(id, network.tiled), plan.tiles, strict=True))
    rows = []

    def row(layer, name, column_rows, column_bytes):
        shape = layer.out_shape
        rows.append({
            "layer": name,
            # the book's (C, H, W) order, for readers of the book
            "output_shape": [shape[2], shape[0], shape[1]] if len(shape) == 3 else list(shape),
            "book_im2col_bytes": layer.book_columns_bytes(batch_size),
            # pooling takes the max over strided views or blocks: no columns at all
            "tiled_bytes": column_bytes,
            "tile_rows": column_rows,
            "activation_bytes": plan.micro_batch * math.prod(shape) * s,
        })

    for layer in network.layers:
        if isinstance(layer, ConvolutionPooling):
            # one window per pooled output, all of a micro-batch's at once
            ph, pw, _ = layer.out_shape
            windows = plan.micro_batch * ph * pw
            row(layer.conv, layer.conv.describe() + " (+pool)", windows, layer.rows * windows * s)
            row(layer.pool, layer.pool.describe() + " (in conv)", 0, 0)
        elif isinstance(layer, Convolution):
            rows_ = tiles[id(layer)]
            row(layer, layer.describe(), rows_, rows_ * layer.width * s)
        else:
            row(layer, layer.describe(), 0, 0)
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
