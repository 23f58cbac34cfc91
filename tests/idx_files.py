"""Small IDX data sets written by the tests."""

import gzip
import struct
from pathlib import Path

import numpy as np

NAMES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def images_bytes(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x803, n, h, w) + images.astype(np.uint8).tobytes()


def labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_dataset(directory: Path, n_train=50, n_test=20, size=28, gz=False, seed=0, **override):
    """Four IDX files; `override` maps a NAMES key to replacement bytes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    content = {
        "train_images": images_bytes(rng.integers(0, 256, (n_train, size, size))),
        "train_labels": labels_bytes(rng.integers(0, 10, n_train)),
        "test_images": images_bytes(rng.integers(0, 256, (n_test, size, size))),
        "test_labels": labels_bytes(rng.integers(0, 10, n_test)),
    }
    content.update(override)
    for key, data in content.items():
        if data is None:
            continue
        path = directory / NAMES[key]
        if gz:
            path = path.with_name(path.name + ".gz")
            data = gzip.compress(data)
        path.write_bytes(data)
    return directory
