"""Write a data set ten times MNIST's size for the scaling benchmark.

The training images are the 60,000 MNIST images and shifted copies of them (each copy
rolled by a different offset of up to 2 pixels; MNIST's borders are blank); labels
repeat; the test files are MNIST's. Written row block by row block, so it never holds more than
one block in memory.

    python scripts/make_big_mnist.py MNIST_DIR OUT_DIR [--copies 10]
"""

import argparse
import os
import shutil
import struct

import numpy as np

from lowmem_cnn.data.idx import open_directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mnist_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--copies", type=int, default=10)
    options = parser.parse_args()
    data = open_directory(options.mnist_dir)
    n, rows, cols = len(data.train), data.train.images.rows, data.train.images.cols
    total = n * options.copies
    os.makedirs(options.out_dir, exist_ok=True)
    offsets = [(0, 0)] + [(dy, dx) for dy in (-2, -1, 1, 2) for dx in (-1, 0, 1)]
    with open(os.path.join(options.out_dir, "train-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, total, rows, cols))
        for copy in range(options.copies):
            dy, dx = offsets[copy % len(offsets)]
            for start in range(0, n, 10_000):
                block = data.train.images.read_range(start, min(start + 10_000, n))
                block = block.reshape(-1, rows, cols)
                f.write(np.roll(block, (dy, dx), axis=(1, 2)).tobytes())
    with open(os.path.join(options.out_dir, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, total))
        for _ in range(options.copies):
            f.write(data.train.labels.tobytes())
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        for suffix in ("", ".gz"):
            source = os.path.join(options.mnist_dir, name + suffix)
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(options.out_dir, name + suffix))
                break


if __name__ == "__main__":
    main()
