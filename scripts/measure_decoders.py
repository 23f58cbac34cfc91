"""Measure what decoding a picture of each format really takes, against the plan's estimate.

    python scripts/measure_decoders.py [--sides 500,1000,2000] [--formats NAME,...]
        [--pictures DIR [--per-suffix N]] [--no-made] [--json]

Pictures of each format Pillow writes are made at a few sizes (--sides: the longer
side; each picture is 4:5), and with --pictures every file under DIR is taken as well
(Pillow's own test pictures: the Tests/images of its sdist hold PSD, FLI, DCX, ...,
which Pillow cannot write). Each is decoded in a fresh child process as a folder's
pictures are (imaging.image_row to 32x32 RGB, no budget). The child reads its resident
set just before decoding (VmRSS), resets its peak (writing 5 to /proc/self/clear_refs),
decodes, and reads the peak (VmHWM): the growth is what the decoding took, from the
OS. Linux only.

Printed per picture: format, mode, size, the growth and the plan's estimate
(imaging.decode_bytes); per format, the growth per pixel beyond Pillow's own picture
(the decoder's extra, what imaging._DECODER_BYTES_PER_PIXEL plans) from the largest
picture, and for generated pictures the slope between the two largest sizes. A row
whose growth is above its estimate is marked "OVER".
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys
from lowmem_cnn.memory.budget import map_large_arrays
map_large_arrays()  # as the command line does
from lowmem_cnn.data import imaging
def status(field):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

path = sys.argv[1]
out = {"path": path}
try:
    with imaging.open_image(path) as picture:
        out.update(format=picture.format, mode=picture.mode, size=list(picture.size))
    imaging.image_row(path, (32, 32), 3, 1)  # refused: the estimate, and the imports made
except imaging.ImageRefused as err:
    out["estimate"] = err.needed
    out["refused"] = err.reason if err.needed is None else None
if out.get("estimate") is not None:
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    try:
        imaging.image_row(path, (32, 32), 3, None)
    except imaging.ImageRefused as err:
        out["failed"] = err.reason
    out["growth"] = status("VmHWM") - before
print(json.dumps(out))
"""

# Format: (file suffix, mode, Pillow's save options). What Pillow writes (Image.SAVE),
# in the modes and codings pictures come in; EPS (Ghostscript), PDF, PALM (write only)
# are left out.
MADE = {
    "JPEG baseline": (".jpg", "RGB", {"quality": 90}),
    "JPEG progressive": (".jpg", "RGB", {"quality": 90, "progressive": True}),
    "JPEG CMYK": (".jpg", "CMYK", {}),
    "PNG RGB": (".png", "RGB", {}),
    "PNG RGBA": (".png", "RGBA", {}),
    "PNG palette": (".png", "P", {}),
    "PNG 16-bit": (".png", "I;16", {}),  # made from a uint16 array
    "GIF": (".gif", "P", {}),
    "BMP": (".bmp", "RGB", {}),
    "TIFF raw": (".tif", "RGB", {}),
    "TIFF LZW": (".tif", "RGB", {"compression": "tiff_lzw"}),
    "TIFF JPEG": (".tif", "RGB", {"compression": "jpeg"}),
    "TIFF deflate RGBA": (".tif", "RGBA", {"compression": "tiff_adobe_deflate"}),
    "WebP lossy": (".webp", "RGB", {"quality": 80}),
    "WebP lossless": (".webp", "RGBA", {"lossless": True}),
    "AVIF": (".avif", "RGB", {"speed": 10}),
    "JPEG 2000": (".jp2", "RGB", {}),
    "JPEG 2000 tiled": (".j2k", "RGB", {"tile_size": (256, 256)}),
    "BLP2": (".blp", "P", {}),
    "BLP1": (".blp", "P", {"blp_version": "BLP1"}),
    "DDS RGBA": (".dds", "RGBA", {}),
    "DDS DXT1": (".dds", "RGB", {"pixel_format": "DXT1"}),
    "PCX": (".pcx", "RGB", {}),
    "PPM": (".ppm", "RGB", {}),
    "TGA RLE": (".tga", "RGB", {"compression": "tga_rle"}),
    "SGI": (".sgi", "RGB", {}),
    "IM": (".im", "RGB", {}),
    "MSP": (".msp", "1", {}),
    "XBM": (".xbm", "1", {}),
    "SPIDER": (".spider", "F", {"format": "SPIDER"}),
    "QOI": (".qoi", "RGBA", {}),
    "ICNS": (".icns", "RGBA", {}),  # Pillow writes its sizes up to 1024, whatever the side
    "ICO": (".ico", "RGBA", {}),  # at most 256x256
    "MPO": (".mpo", "RGB", {}),
}
# What a format is at most (ICO's pictures, ICNS's largest), and sides a multiple of 4
# (DDS's blocks).
# BLP's encoders are Python loops: minutes for 2000x1600 pictures.
MAX_SIDE = {"ICO": 256, "ICNS": 1024, "BLP1": 1000, "BLP2": 1000}


def picture(side: int, mode: str, rng):
    """A 4:5 picture whose longer side is `side`: a gradient with noise (neither flat,
    which compresses to nothing, nor pure noise)."""
    from PIL import Image

    h, w = side, side * 4 // 5 // 4 * 4
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    rgb = (rgb + rng.integers(0, 24, rgb.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "F":
        return image.convert("L").convert("F")
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


def measure(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return {"path": str(path), "crashed": done.returncode, "stderr": done.stderr[-300:]}
    return json.loads(done.stdout.splitlines()[-1])


def storage(mode: str) -> int:
    from lowmem_cnn.data.imaging import _storage

    return _storage(mode)


def extra_per_pixel(row: dict) -> float | None:
    """Growth per pixel beyond Pillow's picture of the decoded mode."""
    if row.get("growth") is None:
        return None
    pixels = row["size"][0] * row["size"][1]
    return row["growth"] / pixels - storage(row["mode"])


def line(name: str, row: dict) -> str:
    if "crashed" in row:
        return f"{name:<20} child failed ({row['crashed']}): {row['stderr'].strip()}"
    if row.get("growth") is None:
        return f"{name:<20} {row.get('format')}: refused ({row.get('refused')})"
    w, h = row["size"]
    over = "OVER" if row["growth"] > row["estimate"] else ""
    failed = f" failed: {row['failed']}" if row.get("failed") else ""
    return (f"{name:<20} {row['format']:<9} {row['mode']:<6} {w:>5}x{h:<5} growth "
            f"{row['growth'] / 2**20:8.1f} MiB  estimate {row['estimate'] / 2**20:8.1f} MiB  "
            f"{row['growth'] / (w * h):6.1f} B/px  extra {extra_per_pixel(row):6.1f} B/px "
            f"{over}{failed}")


def made_rows(sides, folder: Path, say, names=None):
    rng = np.random.default_rng(0)
    summary = {}
    for name, (suffix, mode, options) in MADE.items():
        if names and name not in names:
            continue
        rows = []
        for side in sides:
            side = min(side, MAX_SIDE.get(name, side))
            path = folder / f"{name.replace(' ', '_')}-{side}{suffix}"
            try:
                picture(side, mode, rng).save(path, **options)
            except (OSError, ValueError, KeyError) as err:
                say(f"{name:<20} cannot write: {err}")
                break
            row = measure(path)
            say(line(name, row))
            rows.append(row)
            path.unlink()
            if MAX_SIDE.get(name, side + 1) <= side:
                break
        measured = [r for r in rows if r.get("growth") is not None]
        if not measured:
            continue
        big = measured[-1]
        slope = None
        if len(measured) >= 2 and measured[-2]["size"] != measured[-1]["size"]:
            a, b = measured[-2], measured[-1]
            pixels = [r["size"][0] * r["size"][1] for r in (a, b)]
            slope = (b["growth"] - a["growth"]) / (pixels[1] - pixels[0]) - storage(b["mode"])
        summary[name] = {"format": big["format"], "mode": big["mode"],
                         "extra_per_pixel": round(extra_per_pixel(big), 2),
                         "slope_extra_per_pixel": None if slope is None else round(slope, 2),
                         "over": sum(r["growth"] > r["estimate"] for r in measured)}
    return summary


def file_rows(directory: Path, say, per_suffix=None):
    summary = {}
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    if per_suffix:  # the largest few of each file name ending: the decoders' worst cases
        by_suffix = {}
        for path in files:
            by_suffix.setdefault(path.suffix.lower(), []).append(path)
        files = sorted(path for group in by_suffix.values()
                       for path in sorted(group, key=lambda p: -p.stat().st_size)[:per_suffix])
    for path in files:
        row = measure(path)
        if row.get("growth") is None and "crashed" not in row:
            continue  # not a picture Pillow opens
        say(line(path.name[:20], row))
        fmt = row.get("format", "?")
        entry = summary.setdefault(fmt, {"files": 0, "over": 0, "most_extra_per_pixel": 0.0,
                                         "most_growth": 0, "worst": None})
        entry["files"] += 1
        if "crashed" in row:
            entry["over"] += 1
            entry["worst"] = row["path"]
            continue
        entry["over"] += row["growth"] > row["estimate"]
        extra = extra_per_pixel(row)
        entry["most_growth"] = max(entry["most_growth"], row["growth"])
        if extra > entry["most_extra_per_pixel"] and row["size"][0] * row["size"][1] >= 10_000:
            entry["most_extra_per_pixel"] = round(extra, 2)
            entry["worst"] = row["path"]
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="500,1000,2000",
                        help="longer sides of the pictures made, comma-separated")
    parser.add_argument("--pictures", type=Path, help="also measure every file under this folder")
    parser.add_argument("--no-made", action="store_true", help="only the --pictures files")
    parser.add_argument("--per-suffix", type=int,
                        help="of the --pictures files, only the N largest of each file name ending")
    parser.add_argument("--formats", help="only these of the made formats (comma-separated names)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the summary")
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        if not args.no_made:
            names = args.formats.split(",") if args.formats else None
            result["made"] = made_rows(sides, Path(folder), print, names)
    if args.pictures:
        result["files"] = file_rows(args.pictures, print, args.per_suffix)
    print("\nper format: decoder's extra bytes per pixel (beyond Pillow's picture)")
    for name, entry in result.get("made", {}).items():
        print(f"  {name:<20} {entry['format']:<9} {entry['extra_per_pixel']:6.1f}  slope "
              f"{entry['slope_extra_per_pixel']}  over the estimate: {entry['over']}")
    for fmt, entry in sorted(result.get("files", {}).items()):
        print(f"  {fmt:<20} {entry['files']:>4} files, most extra {entry['most_extra_per_pixel']:6.1f}"
              f" B/px, most growth {entry['most_growth'] / 2**20:.1f} MiB, over the estimate: "
              f"{entry['over']} (worst: {entry['worst']})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
