"""Whole-array MNIST loading for the comparison baselines (as PyTorch and the book
load it: everything in memory at once). The project itself never does this."""

import gzip
import os
import struct

import numpy as np


def load(directory, name):
    path = os.path.join(directory, name)
    opener = gzip.open if not os.path.exists(path) else open
    with opener(path if os.path.exists(path) else path + ".gz", "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


def mnist(directory):
    """(train images, train labels, test images, test labels): images float32 / 255, NCHW."""
    arrays = [load(directory, name) for name in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    for i in (0, 2):
        arrays[i] = arrays[i].astype(np.float32) / 255.0
    return arrays
