"""profile-memory: the book's whole-batch im2col bytes against the tiles, and a measured run."""

import numpy as np

from lowmem_cnn.budget import peak_rss
from lowmem_cnn.training import MAX_READ_IMAGES


def layer_table(network, plan, batch_size: int) -> list[dict]:
    """One row per layer of the book's network for a batch of `batch_size` images (a
    fused convolution and pooling make two rows)."""
    s = network.dtype.itemsize
    rows = []

    def row(layer, name, column_rows, column_bytes):
        shape = layer.out_shape
        book = layer.book_columns_bytes(batch_size) if hasattr(layer, "book_columns_bytes") else 0
        rows.append({
            "layer": name,
            # the book's (C, H, W) order, for readers of the book
            "output_shape": [shape[2], shape[0], shape[1]] if len(shape) == 3 else list(shape),
            "book_im2col_bytes": book,
            # pooling takes the max over strided views or blocks: no columns at all
            "tiled_bytes": column_bytes,
            "tile_rows": column_rows,
            "activation_bytes": plan.micro_batch * int(np.prod(shape)) * s,
        })

    for layer in network.layers:
        if layer.kind == "conv+pool":
            # one window per pooled output, all of a micro-batch's at once
            ph, pw, _ = layer.out_shape
            windows = plan.micro_batch * ph * pw
            row(layer.conv, layer.conv.describe() + " (+pool)", windows,
                layer.column_bytes(plan.micro_batch, s))
            row(layer.pool, layer.pool.describe() + " (in conv)", 0, 0)
        elif layer.kind == "conv":
            row(layer, layer.describe(), layer.tile_rows, layer.tile_rows * layer.width * s)
        else:
            row(layer, layer.describe(), 0, 0)
    return rows


def run_batch(network, split, plan, batch_size: int, train: bool) -> int:
    """Run the first `batch_size` images of `split` through the network (forward, or
    forward and backward) as the plan says; return the peak RSS of the process."""
    n = min(batch_size, len(split), MAX_READ_IMAGES)
    images = split.images.read_range(0, n)
    if train:
        network.accumulate_gradient(images, split.labels[:n], plan.micro_batch)
    else:
        network.predict(images, plan.eval_micro_batch)
    return peak_rss()
