"""Your own digit pictures made to look like MNIST's, for `lowmem-cnn predict`.

MNIST's digits are white on black, scaled (keeping their aspect ratio) to fit a
20x20 box, and placed in a 28x28 image so that their centre of mass is at its centre.
Pillow decodes the files (`pip install 'lowmem-cnn[images]'`), imported only here.
"""

from pathlib import Path

import numpy as np

from lowmem_cnn.errors import LowmemError

BOX = 20
SIZE = 28


def _image_module():
    try:
        from PIL import Image
    except ImportError:
        raise LowmemError("reading images needs Pillow: pip install 'lowmem-cnn[images]'") from None
    return Image


def mnist_style(path: Path) -> np.ndarray:
    """The picture at `path` as one MNIST-like row of 784 uint8 values."""
    Image = _image_module()
    try:
        with Image.open(path) as picture:
            gray = np.asarray(picture.convert("L"), dtype=np.float64)
    except FileNotFoundError:
        raise LowmemError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:  # Pillow's UnidentifiedImageError is an OSError
        raise LowmemError(f"{path}: not an image Pillow can read ({err})") from None
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:  # dark digit on a light background
        gray, border = 255.0 - gray, 255.0 - border
    gray -= np.median(border)  # the background to black
    np.clip(gray, 0, 255, out=gray)
    ink = gray > 0.2 * gray.max() if gray.max() > 0 else np.zeros(gray.shape, bool)
    if not ink.any():
        raise LowmemError(f"{path}: no digit found (the image is blank)")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = BOX / max(digit.shape)
    height, width = (max(1, round(n * scale)) for n in digit.shape)
    small = np.asarray(Image.fromarray(digit.astype(np.uint8)).resize((width, height),
                                                                         Image.LANCZOS), np.float64)
    canvas = np.zeros((SIZE, SIZE))
    total = small.sum() or 1.0
    cy = (small.sum(axis=1) * np.arange(height)).sum() / total
    cx = (small.sum(axis=0) * np.arange(width)).sum() / total
    top = int(np.clip(round(SIZE / 2 - 0.5 - cy), 0, SIZE - height))
    left = int(np.clip(round(SIZE / 2 - 0.5 - cx), 0, SIZE - width))
    canvas[top : top + height, left : left + width] = small
    canvas *= 255.0 / canvas.max()
    return canvas.round().astype(np.uint8).reshape(-1)
