"""Write a folder of photos as users have them, for trying `train --data-dir` on: every
format, random sizes, odd names, and the junk systems leave beside them.

    python scripts/make_photo_folder.py OUT_DIR [--classes N] [--per-class N]
        [--min-side PX] [--max-side PX] [--seed S]

OUT_DIR/<class>/ for each of --classes classes (Cat, Dog, Bird, Fish; 2 by default),
each holding:
- --per-class ordinary RGB JPEGs named as Kaggle's PetImages are (`1234.jpg`), each
  side drawn from --min-side..--max-side pixels; the first five have the sizes whose
  crop box once came out negative (317x187, 188x451, 494x375, 373x388, 262x187);
- one picture of each odd kind, named in Japanese with spaces: a PNG named .jpg, a
  CMYK JPEG, a gray JPEG, RGBA and palette PNGs, a 16-bit PNG, a JPEG stored sideways
  with EXIF orientation 6, an animated GIF, a BMP, a TIFF and a WebP;
- what systems leave (to be ignored without a word): Thumbs.db, desktop.ini,
  .DS_Store, an AppleDouble `._` file, a hidden folder with a picture in it; and
  __MACOSX/ beside the class folders;
- junk to be reported: readme.txt (not a picture), and in the first class a 0-byte
  666.jpg, in the second a truncated JPEG (damaged pictures).

Each class draws its own shape (an ellipse, a rectangle, a triangle, a cross) in random
colours on a random gradient, so that a network can learn the classes. The same seed
gives the same files. Prints one JSON line: the counts of decodable pictures, system
files, files that are not pictures and damaged pictures. Needs Pillow.
"""

import argparse
import io
import json
from pathlib import Path

import numpy as np

CLASSES = ["Cat", "Dog", "Bird", "Fish"]
SHAPES = ["ellipse", "rectangle", "triangle", "cross"]
# Sizes of ordinary JPEGs that lowmem-cnn once skipped at --image-size 48 (issue 19).
REPORTED_SIZES = [(317, 187), (188, 451), (494, 375), (373, 388), (262, 187)]
# The odd pictures of each class: file name, and how each is saved from an RGB picture.
ODD = {
    "本当は PNG.jpg": "png as jpg",
    "印刷用 CMYK.jpg": "cmyk jpeg",
    "白黒 写真.jpg": "gray jpeg",
    "透明 あり.png": "rgba png",
    "パレット 画像.png": "palette png",
    "16ビット 画像.png": "16-bit png",
    "横向き スマホ.jpg": "exif rotated jpeg",
    "動く 画像.gif": "animated gif",
    "古い 画像.bmp": "bmp",
    "スキャン 画像.tif": "tiff",
    "ウェブ 画像.webp": "webp",
}
SYSTEM_FILES = ["Thumbs.db", "desktop.ini", ".DS_Store"]
JUNK_NUMBERS = [666, 11702]  # the 0-byte and the truncated JPEG: no picture takes their names


def photo(rng: np.random.Generator, size: tuple[int, int], shape: str):
    """An RGB picture of `size` (width, height): a gradient with `shape` drawn on it."""
    from PIL import Image, ImageDraw

    w, h = size
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    pixels = a * (1 - t) + b * t + rng.normal(0, 6, (h, w, 3))
    picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    side = min(w, h)
    r = side * rng.uniform(0.25, 0.4)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * side, h / 2 + rng.uniform(-0.1, 0.1) * side
    ink = tuple(int(v) for v in 255 - a)  # the gradient's start, inverted: visible on it
    if shape == "ellipse":
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=ink)
    elif shape == "rectangle":
        draw.rectangle([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    else:
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=ink)
        draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=ink)
    return picture


def save_odd(picture, path: Path, kind: str):
    from PIL import Image

    if kind == "png as jpg":
        picture.save(path, "PNG")
    elif kind == "cmyk jpeg":
        picture.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray jpeg":
        picture.convert("L").save(path, "JPEG", quality=90)
    elif kind == "rgba png":
        alpha = Image.linear_gradient("L").resize(picture.size)
        rgba = picture.copy()
        rgba.putalpha(alpha)
        rgba.save(path)
    elif kind == "palette png":
        picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    elif kind == "16-bit png":
        gray = np.asarray(picture.convert("L"), np.uint16) * 257
        Image.fromarray(gray).save(path)  # mode I;16
    elif kind == "exif rotated jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # a viewer turns it 90 degrees clockwise
        picture.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif)
    elif kind == "animated gif":
        frames = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT), picture]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "bmp":
        picture.save(path, "BMP")
    elif kind == "tiff":
        picture.save(path, "TIFF", compression="tiff_deflate")
    elif kind == "webp":
        picture.save(path, "WEBP", quality=80)
    else:
        raise ValueError(kind)


def write_folder(out_dir, classes=2, per_class=300, min_side=120, max_side=500, seed=0) -> dict:
    """Write the folder (see the module notes); return the counts of what it holds."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"classes: 2 to {len(CLASSES)}")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    counts = {"decodable": 0, "system": 0, "not_pictures": 0, "damaged": 0}
    for k, name in enumerate(CLASSES[:classes]):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        free = np.setdiff1d(np.arange(max(12500, per_class + 2)), JUNK_NUMBERS)
        numbers = rng.permutation(free)[:per_class]
        for i, number in enumerate(numbers.tolist()):
            size = (REPORTED_SIZES[i] if i < len(REPORTED_SIZES)
                    else tuple(int(v) for v in rng.integers(min_side, max_side + 1, 2)))
            photo(rng, size, SHAPES[k]).save(folder / f"{number}.jpg", quality=int(rng.integers(70, 96)))
        for file_name, kind in ODD.items():
            size = tuple(int(v) for v in rng.integers(min_side, max_side + 1, 2))
            save_odd(photo(rng, size, SHAPES[k]), folder / file_name, kind)
        counts["decodable"] += per_class + len(ODD)
        # what systems leave
        for system in SYSTEM_FILES:
            (folder / system).write_bytes(rng.bytes(64))
        (folder / f"._{numbers[0]}.jpg").write_bytes(b"\0\5\26\7" + rng.bytes(60))  # AppleDouble
        (folder / ".thumbnails").mkdir(exist_ok=True)
        photo(rng, (64, 64), SHAPES[k]).save(folder / ".thumbnails" / "t.jpg")
        counts["system"] += len(SYSTEM_FILES) + 2
        # junk to report
        (folder / "readme.txt").write_text("Pictures downloaded from the web.\n", encoding="utf-8")
        counts["not_pictures"] += 1
        if k == 0:
            (folder / "666.jpg").write_bytes(b"")
            counts["damaged"] += 1
        elif k == 1:
            whole = io.BytesIO()
            photo(rng, (300, 200), SHAPES[k]).save(whole, "JPEG", quality=90)
            (folder / "11702.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
            counts["damaged"] += 1
    macosx = out_dir / "__MACOSX" / CLASSES[0]
    macosx.mkdir(parents=True, exist_ok=True)
    (macosx / "._666.jpg").write_bytes(b"\0\5\26\7" + rng.bytes(60))
    (out_dir / "Thumbs.db").write_bytes(rng.bytes(64))
    counts["system"] += 2
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--classes", type=int, default=2, help=f"2 to {len(CLASSES)}")
    parser.add_argument("--per-class", type=int, default=300, help="ordinary JPEGs per class")
    parser.add_argument("--min-side", type=int, default=120)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    if options.per_class < 1 or not 1 <= options.min_side <= options.max_side:
        parser.error("--per-class at least 1, and 1 <= --min-side <= --max-side")
    try:
        counts = write_folder(options.out_dir, options.classes, options.per_class, options.min_side,
                              options.max_side, options.seed)
    except (ValueError, OSError) as err:
        parser.exit(1, f"Error: {err}\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
