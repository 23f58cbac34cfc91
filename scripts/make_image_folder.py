"""Write MNIST's digits as a folder of picture files, for trying image folders out.

    python scripts/make_image_folder.py MNIST_DIR OUT_DIR [--format png|jpeg|bmp|gif|pgm|webp]
        [--tint] [--size N] [--layout split|one] [--limit N] [--quality Q] [--seed S]

- `--format png` (the default) is lossless grayscale: the folder's rows are MNIST's,
  byte for byte. `--format jpeg` is lossy (quality --quality).
- `--tint` colours each digit: its ink and its background get random colours (seeded),
  so the pictures are RGB. `--size N` scales the 28x28 digits up to NxN (bicubic).
- `--layout split` (the default) writes OUT_DIR/train/<label>/<index>.<ext> and
  OUT_DIR/test/<label>/<index>.<ext>; `--layout one` writes every picture into
  OUT_DIR/<label>/ (train-<index> and test-<index>), for a drawn split.
- `--limit N` writes the first N training and the first N test images only.

Index numbers are the images' positions in the IDX files (5 digits), so a picture
names the row it came from. Needs Pillow (pip install 'lowmem-cnn[images]').
"""

import argparse
from pathlib import Path

import numpy as np

from lowmem_cnn.data.idx import open_directory

EXTENSIONS = {"png": "png", "jpeg": "jpg", "bmp": "bmp", "gif": "gif", "pgm": "pgm", "webp": "webp"}


def tinted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gray digit (white ink on black) as RGB: random dark background, bright ink."""
    background = rng.integers(0, 110, 3)
    ink = rng.integers(150, 256, 3)
    alpha = gray[..., None] / 255.0
    return (background * (1 - alpha) + ink * alpha).round().astype(np.uint8)


def write_folder(mnist_dir, out_dir, fmt="png", tint=False, size=28, layout="split", limit=None,
                 quality=90, seed=0) -> Path:
    """Write the folder (see the module notes); return its path."""
    from PIL import Image

    data = open_directory(Path(mnist_dir))
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    ext = EXTENSIONS[fmt]
    save = {"quality": quality} if fmt in ("jpeg", "webp") else {}
    if fmt == "webp" and not tint:
        save["lossless"] = True
    for part, split in (("train", data.train), ("test", data.test)):
        n = len(split) if limit is None else min(limit, len(split))
        for start in range(0, n, 1000):  # a block of rows at a time
            stop = min(start + 1000, n)
            block = split.images.read_range(start, stop).reshape(-1, split.images.rows,
                                                                 split.images.cols)
            for index, gray, label in zip(range(start, stop), block, split.labels[start:stop].tolist(),
                                          strict=True):
                picture = Image.fromarray(tinted(gray, rng) if tint else gray)
                if size != picture.width:
                    picture = picture.resize((size, size), Image.Resampling.BICUBIC)
                if layout == "split":
                    path = out_dir / part / str(label) / f"{index:05d}.{ext}"
                else:
                    path = out_dir / str(label) / f"{part}-{index:05d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                picture.save(path, **save)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--format", choices=sorted(EXTENSIONS), default="png")
    parser.add_argument("--tint", action="store_true", help="random RGB colours per picture")
    parser.add_argument("--size", type=int, default=28, help="side in pixels (28: MNIST's)")
    parser.add_argument("--layout", choices=["split", "one"], default="split")
    parser.add_argument("--limit", type=int, help="first N train and N test images only")
    parser.add_argument("--quality", type=int, default=90, help="JPEG and WebP quality")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tint colours")
    options = parser.parse_args()
    write_folder(options.mnist_dir, options.out_dir, options.format, options.tint, options.size,
                 options.layout, options.limit, options.quality, options.seed)


if __name__ == "__main__":
    main()
