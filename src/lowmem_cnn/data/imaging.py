"""Pictures decoded with Pillow within a memory budget, made into network input rows.

Two uses:
- `mnist_style`: your own digit picture made to look like MNIST's, for
  `lowmem-cnn predict`. MNIST's digits are white on black, scaled (keeping their
  aspect ratio) to fit a 20x20 box, and placed in a 28x28 image so that their centre
  of mass is at its centre.
- `image_row`: any picture as one row of an image-folder data set (folders.py):
  gray ("L") or RGB, its shorter side scaled to the target, centre-cropped to H x W.

Every decode is planned before any pixel is decoded: `Image.open` reads only the
header, so the size and pixel format are known first. JPEGs are decoded at a reduced
scale (`Image.draft`) when the target is smaller, and a picture whose decoded bytes
(estimated from the header, see `decode_bytes`) exceed the caller's budget is refused
with `ImageRefused`, as is what Pillow takes for a decompression bomb. What a format's
decoder holds besides Pillow's image was measured for each format by
scripts/measure_decoders.py (docs/memory.md#decoding-pictures). On Linux the decoding
runs under RLIMIT_DATA as well (`_data_limit`): a file holding a picture larger than
its header says fails to decode rather than break the budget. Only regular files are
opened, and what decoders write to stderr goes into the reason of a refused picture.
Pillow is the optional images extra (`pip install 'lowmem-cnn[images]'`), imported
only here and only inside functions.
"""

import io
import math
import os
import stat
import sys
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError

BOX = 20
SIZE = 28
# What a decode may take unless the caller gives a budget (the CLI gives the room its
# plan leaves).
DEFAULT_MAX_DECODE_BYTES = 256 * 2**20
# mnist_style finds the digit in a copy at most this many pixels on its longer side:
# its float64 arrays then stay under 8 MiB each, however large the picture.
WORK_SIDE = 1024
# What a format's decoder holds besides Pillow's image, in bytes per pixel of the
# declared size, planned from the peak RSS growth measured in a fresh process by
# scripts/measure_decoders.py (docs/memory.md has the table; the figures below are the
# growth per pixel of the whole decode, Pillow's image and the resampling included).
# The decoders of JPEG, PNG, GIF, BMP, PPM, TGA, PCX, IM, MSP, XBM, DDS and QOI write
# straight into Pillow's image (measured at most 4.4 B/px for RGB, 8.2 for RGBA).
_DECODER_BYTES_PER_PIXEL = {
    "TIFF": 4,  # libtiff's strip or tile buffers: 7.6 B/px LZW RGB, 8.1 deflate RGBA
    "WEBP": 16,  # libwebp's RGBA buffer and the bytes handed over: 18.0 B/px lossless
    "AVIF": 12,  # libavif's YUV planes and RGB copy: 10.0 B/px (18.1 at 0.2 Mpx)
    "JPEG2000": 20,  # OpenJPEG's int32 per component: 19.7 B/px (22.2 at 0.2 Mpx)
    "BLP": 8,  # a Python bytearray of the pixels, then Pillow's: 6.9 B/px
    "SGI": 4,  # its RLE rows: 5.9 B/px RGB
    "SPIDER": 8,  # float32 pixels: 9.1 B/px
    "MPO": 4, "ICNS": 8, "ICO": 8, "CUR": 8, "PSD": 8, "FLI": 8, "DCX": 4,
}
_STREAMING_FORMATS = {"PNG", "JPEG", "GIF", "BMP", "PPM", "DIB", "TGA", "PCX", "IM", "MSP",
                      "XBM", "DDS", "QOI"}
# A format Pillow opens that was not measured (or is rare): as much as the worst measured.
_UNMEASURED_BYTES_PER_PIXEL = 24
# Copies of the whole file a decoder reads into memory, whatever the size it declares:
# WebP and AVIF hand the file to their library; BLP reads the declared length (at most
# the file) and expands each palette byte to 4 in a bytearray; ICO, CUR and ICNS read
# the picture inside.
_FILE_COPIES = {"WEBP": 1, "AVIF": 1, "BLP": 7, "ICO": 2, "CUR": 2, "ICNS": 2}
# Modes that Pillow resizes without a full-size copy of the picture first
# (LA and RGBA are premultiplied into a copy; P and "1" cannot be resampled).
_RESIZABLE = {"L", "RGB"}
# A decoder's working state and the rest (measured: 2.4 MiB for a 6000x4000 JPEG drawn
# at 1/8 scale, whose pixels took 0.4 MiB).
_FIXED_BYTES = 3 * 2**20
_ORIENTATION_TAG = 0x0112


class ImageRefused(LowmemError):
    """A file that is not a picture that can be decoded within the budget: not an image,
    damaged, a decompression bomb, or too large. `needed` is the estimated decode size
    in bytes when the picture was refused for its size (else None). `kind` says which:
    "unidentified" (Pillow knows no format with this content: not a picture, or one
    damaged beyond recognition), "too large" (for the budget, or a decompression bomb)
    or "damaged" (a picture that cannot be read, decoded or converted)."""

    def __init__(self, path, reason: str, needed: int | None = None, kind: str | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.needed = path, reason, needed
        self.kind = kind or ("too large" if needed is not None else "damaged")

    def add_detail(self, detail: str):
        self.reason = f"{self.reason} ({detail})"
        self.args = (f"{self.path}: {self.reason}",)


def _image_module():
    try:
        from PIL import Image
    except ImportError:
        raise LowmemError("reading images needs Pillow: pip install 'lowmem-cnn[images]'") from None
    return Image


def require_pillow():
    """Raise LowmemError, saying how to install it, when Pillow is missing."""
    _image_module()


@contextmanager
def open_image(path: Path):
    """The picture at `path`, opened lazily (header only), as a context manager.

    Only a regular file is opened: a FIFO, a device or a socket is refused from its
    stat, before anything reads it (reading a FIFO waits for a writer forever). What
    decoders and Pillow say meanwhile (libtiff's warnings, a DecompressionBombWarning,
    palette notes) does not reach the terminal (see `_decoder_messages`): it ends up in
    the reason of a picture refused, and the caller's byte budget decides what is
    decoded.
    """
    Image = _image_module()
    with _decoder_messages() as said:
        try:
            with _regular_file(path) as file:
                with _opened(Image, path, file) as picture:
                    yield picture
        except ImageRefused as err:
            if said():
                err.add_detail(f"the decoder said: {said()}")
            raise


@contextmanager
def _opened(Image, path, file):
    try:
        picture = Image.open(file)
    except Image.DecompressionBombError as err:
        raise ImageRefused(path, f"refused as a possible decompression bomb ({err})",
                           kind="too large") from None
    except OSError as err:  # UnidentifiedImageError is an OSError
        if getattr(err, "strerror", None):
            raise ImageRefused(path, f"cannot read ({err.strerror})") from None
        reason = "an empty file" if _is_empty(file) else "not an image Pillow can read"
        raise ImageRefused(path, reason, kind="unidentified") from None
    except Exception as err:  # noqa: BLE001 - a hostile header can make a plugin raise anything
        raise ImageRefused(path, f"not an image Pillow can read ({type(err).__name__})",
                           kind="unidentified") from None
    with picture:
        yield picture


def _regular_file(path):
    """`path` opened for reading if it is a regular file, else ImageRefused, from its
    stat alone (a FIFO is not opened: that would wait for a writer). A file object is
    used as it is."""
    if hasattr(path, "read"):
        return nullcontext(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageRefused(path, "no such file") from None
    except OSError as err:
        raise ImageRefused(path, f"cannot read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageRefused(path, "a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRefused(path, f"not a regular file (a {_file_type(info.st_mode)}), not read",
                           kind="unidentified")
    try:
        # O_NONBLOCK: should the file have become a FIFO since the stat, the open does
        # not wait; the fstat below then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise ImageRefused(path, f"cannot read ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageRefused(path, "not a regular file, not read", kind="unidentified")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _is_empty(file) -> bool:
    try:
        return os.fstat(file.fileno()).st_size == 0
    except (OSError, AttributeError, ValueError):  # a file object without a descriptor
        return file.seek(0, os.SEEK_END) == 0


def _file_type(mode) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


# What a decoder wrote to stderr, kept for the reason of a refused picture: at most
# this many characters (a hostile file can make libtiff warn about every tag).
DECODER_MESSAGE_CHARS = 300


@contextmanager
def _decoder_messages():
    """Within: what C libraries write to the process's stderr (file descriptor 2:
    libtiff's warnings, libjpeg's notes) goes to a temporary file instead of the
    terminal; yields a function giving it as one line. The decoding runs on the
    calling thread while the others wait, so nothing of the run's own is caught; the
    run's messages are written after. Where fd 2 cannot be redirected, nothing is."""
    global _sink
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        if not hasattr(os, "pread"):  # Windows: messages stay where they are
            raise OSError
        if _sink is None:
            # a bare descriptor of an unlinked file: kept for the process's life, with
            # no file object to be reported unclosed at exit
            with tempfile.TemporaryFile() as file:
                _sink = os.dup(file.fileno())
        os.ftruncate(_sink, 0)
        os.lseek(_sink, 0, os.SEEK_SET)  # fd 2 will share this offset: write from the start
        saved = os.dup(2)
    except OSError:
        yield lambda: ""
        return
    text = None

    try:
        os.dup2(_sink, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            caught = []

            def keep(message, *args, **kwargs):  # the first few: a file can warn on and on
                if len(caught) < 4:
                    caught.append(str(message))

            warnings.showwarning = keep

            def said():
                nonlocal text
                if text is None:
                    raw = os.pread(_sink, DECODER_MESSAGE_CHARS * 4, 0).decode("utf-8", "replace")
                    # one printable line: a file name or a tag's bytes may be anything
                    raw = "".join(c if c.isprintable() else " " for c in " ".join([raw, *caught]))
                    text = " ".join(raw.split())[:DECODER_MESSAGE_CHARS]
                return text

            yield said
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_sink = None


def _storage(mode: str) -> int:
    """Bytes a pixel of `mode` takes in Pillow's memory (RGB is stored in 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _sixteen_bit(mode: str) -> bool:
    # Pillow's convert("L") clips these at 255 instead of scaling: 16-bit pictures
    # would come out white. "I" is what older Pillow versions open 16-bit PNGs as.
    return mode.startswith("I;16") or mode == "I"


def _coefficient_bytes(picture, stored) -> int:
    """A progressive JPEG's coefficients, which libjpeg keeps whole (16 bits each, per
    8x8 block of each component, at the stored size whatever the draft)."""
    width, height, bands = stored
    layers = getattr(picture, "layer", None)  # (id, horizontal, vertical sampling, table)
    if not layers:
        return width * height * bands * 2
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    blocks = sum(math.ceil(width * layer[1] / h_max / 8) * math.ceil(height * layer[2] / v_max / 8)
                 for layer in layers)
    return blocks * 64 * 2


def decode_bytes(picture, mode: str, out_size: tuple[int, int], stored=None) -> int:
    """Estimated peak bytes of decoding `picture` (after any draft) and making it a
    `mode` picture of `out_size` (width, height): the decoded pixels at Pillow's
    storage size; what the format's decoder holds besides (_DECODER_BYTES_PER_PIXEL,
    and the copies of the file some read whole); a progressive JPEG's coefficients
    (`stored` is (width, height, bands) before the draft); the full-size copies a
    conversion makes; the resampling's intermediate images. Checked against measured
    peaks for PNG (gray, RGB, RGBA, palette, 16-bit), JPEG (baseline and progressive),
    GIF, WebP, BMP and TIFF pictures of 24 to 81 million pixels, and by
    scripts/measure_decoders.py for every format Pillow writes and Pillow's own test
    pictures: each estimate was above the measured peak."""
    w, h = picture.size
    pixels = w * h
    s = _storage(picture.mode)
    total = _FIXED_BYTES + pixels * s
    if picture.format not in _STREAMING_FORMATS:
        total += pixels * _DECODER_BYTES_PER_PIXEL.get(picture.format,
                                                       _UNMEASURED_BYTES_PER_PIXEL)
    total += _file_bytes(picture) * _FILE_COPIES.get(picture.format, 0)
    if picture.format == "JPEG" and picture.info.get("progressive"):
        total += _coefficient_bytes(picture, stored or (w, h, len(picture.getbands())))
    if picture.mode not in _RESIZABLE:
        if _sixteen_bit(picture.mode):
            total += pixels * (2 * s + 1)  # Pillow's bytes of it, the array, the 8-bit copy
            if mode != "L":
                total += pixels * _storage(mode)
        else:
            total += pixels * _storage(mode)
        s = _storage(mode)
    out_w, out_h = out_size
    # reducing_gap: a box-reduced copy of at most a quarter of the pixels, then one
    # resampling pass into an image out_w wide
    total += pixels * s // 4 + (out_w * max(h, out_h) + out_w * out_h) * s
    return total


def _file_bytes(picture) -> int:
    fp = getattr(picture, "fp", None)
    try:
        return os.fstat(fp.fileno()).st_size
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        pass
    try:  # a BytesIO
        return fp.getbuffer().nbytes
    except (AttributeError, ValueError, TypeError):
        return 0


def _load(picture, path):
    try:
        picture.load()
    except MemoryError:
        raise
    except OSError as err:
        detail = err.strerror or str(err) or type(err).__name__
        raise ImageRefused(path, f"damaged or truncated image ({detail})") from None
    except Exception as err:  # noqa: BLE001 - decoders of damaged files raise many types
        raise ImageRefused(path, f"damaged image ({type(err).__name__}: {err})") from None


def _in_mode(picture, mode: str):
    """`picture` as a `mode` ("L" or "RGB") picture; 16-bit values scaled to 8 bits."""
    Image = _image_module()
    if picture.mode == mode:
        return picture
    if _sixteen_bit(picture.mode):
        values = np.array(picture)
        np.clip(values, 0, 65535, out=values)
        eight = np.empty(values.shape, np.uint8)
        np.right_shift(values, 8, out=eight, casting="unsafe")
        del values
        picture = Image.fromarray(eight)
        if mode == "L":
            return picture
    return picture.convert(mode)


def _transpose(picture, orientation):
    """Undo an EXIF orientation (a phone photo stored sideways)."""
    Image = _image_module()
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return picture if method is None else picture.transpose(method)


def _orientation(picture) -> int | None:
    """The EXIF orientation; call after load (a PNG's EXIF may follow its pixels)."""
    try:
        return picture.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - damaged EXIF: use the picture as stored
        return None


def _render(picture, path, mode: str, layout, draft_size, max_bytes, later_bytes=0):
    """Decode `picture` within `max_bytes` and resample it into a `mode` picture,
    turned the way its EXIF orientation says.

    `layout(size, sideways)` gives the source box and the output (width, height), both
    in the stored frame, for a picture of `size` that is or is not stored sideways.
    `draft_size` is the least size a JPEG may be drawn at (None: full size).
    `later_bytes`: what the caller's own work on the result will take (after the
    decoded picture is freed), checked against the budget as well.
    """
    Image = _image_module()
    stored = (*picture.size, len(picture.getbands()))
    if draft_size is not None and picture.format == "JPEG":
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale for next to nothing; gray straight
        # from its luminance.
        picture.draft("L" if mode == "L" else "RGB", draft_size)
    out_w, out_h = layout(picture.size, False)[1]
    needed = max(decode_bytes(picture, mode, (max(out_w, out_h),) * 2, stored),
                 _FIXED_BYTES + later_bytes)
    if max_bytes is not None and needed > max_bytes:
        raise ImageRefused(path, f"{stored[0]}x{stored[1]} pixels: decoding it would take about "
                                 f"{needed / 2**20:,.1f} MiB, more than the {max_bytes / 2**20:,.1f} "
                                 "MiB allowed", needed)
    try:
        with _data_limit(max_bytes):
            _load(picture, path)
            orientation = _orientation(picture)
            try:
                if picture.mode not in _RESIZABLE:
                    picture = _in_mode(picture, mode)
                box, out = layout(picture.size, orientation in (5, 6, 7, 8))
                if out != picture.size or box != (0, 0, *picture.size):
                    picture = picture.resize(out, Image.Resampling.LANCZOS, box=box,
                                             reducing_gap=3.0)
                return _in_mode(_transpose(picture, orientation), mode)
            except (ValueError, OSError) as err:
                raise ImageRefused(path, f"cannot convert this image ({err})") from None
    except MemoryError:
        if max_bytes is None:
            raise ImageRefused(path, "out of memory while decoding it", kind="too large") from None
        raise ImageRefused(path, f"{stored[0]}x{stored[1]} pixels: its decoder took more than the "
                                 f"{max_bytes / 2**20:,.1f} MiB allowed (more than its header "
                                 "says)", max_bytes + 1) from None


@contextmanager
def _data_limit(max_bytes):
    """Within: the process may map at most `max_bytes` more of private memory (Linux's
    RLIMIT_DATA, set to what it maps now plus that), so that a decoder that takes more
    than its estimate fails with a MemoryError rather than break the budget. That
    happens when a file holds a picture larger than its header says (a BLP's JPEG, an
    ICO's PNG: their own headers are read only when decoding). Elsewhere, or without a
    budget, nothing is limited."""
    resource = _resource()
    mapped = _mapped_data_bytes() if resource is not None and max_bytes is not None else None
    if mapped is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = mapped + max_bytes
    for given in (soft, hard):
        if given != resource.RLIM_INFINITY and given >= 0:
            limit = min(limit, given)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _resource():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import resource
    except ImportError:
        return None
    return resource if hasattr(resource, "RLIMIT_DATA") else None


def _mapped_data_bytes() -> int | None:
    """VmData: the private writable memory the process maps, which RLIMIT_DATA limits."""
    try:
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cover_box(size, out_size):
    """The centre region of `size` with the shape of `out_size`: the picture scaled so
    that it covers `out_size` (its shorter side to the target's), then centre-cropped."""
    (w, h), (out_w, out_h) = size, out_size
    scale = max(out_w / w, out_h / h)
    crop_w, crop_h = out_w / scale, out_h / scale
    if (crop_w, crop_h) == (w, h):
        return (0, 0, w, h)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    # out_w / (out_w / w) need not come back as w: the box could stick out of the
    # picture by a rounding error (a 317x187 JPEG drawn at 159x94 for 48x48: top -7e-15),
    # which Pillow refuses. Clamping changes only such boxes, which failed before: a box
    # that worked is the same to the bit, and so are the rows decoded with it.
    return (max(left, 0.0), max(top, 0.0), min(left + crop_w, w), min(top + crop_h, h))


def image_row(path: Path, size: tuple[int, int], channels: int,
              max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """The picture at `path` as one row of C*H*W uint8 values, channel by channel (all
    of channel 0's H*W values row by row, then channel 1's...), as `Network.to_input`
    takes them.

    `size` is (H, W); `channels` 1 (gray) or 3 (RGB). The picture is scaled so that it
    covers H x W (its shorter side to the target's, for a square target), then
    centre-cropped; one of exactly H x W is used as it is, pixel for pixel. Alpha is
    dropped, 16-bit values are scaled to 8 bits, EXIF orientation is applied.
    Raises ImageRefused for a file that is not a usable image or would take more than
    `max_decode_bytes` to decode (None: no limit but Pillow's decompression-bomb one).
    """
    height, width = size
    mode = {1: "L", 3: "RGB"}[channels]
    with open_image(path) as picture:
        w, h = picture.size
        if w < 1 or h < 1:
            raise ImageRefused(path, f"a {w}x{h} image has no pixels")
        # the draft must keep the cover scale's size in either orientation
        scale = max(height, width) / min(w, h)
        draft = (math.ceil(w * scale), math.ceil(h * scale))

        def cover(size, sideways):
            out = (height, width) if sideways else (width, height)
            return _cover_box(size, out), out

        small = _render(picture, path, mode, cover, draft, max_decode_bytes)
    pixels = np.asarray(small, np.uint8)
    if channels == 3:
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels).reshape(-1)


def is_color(path: Path) -> bool | None:
    """Whether the picture at `path` is in colour, from its header alone (no pixels are
    decoded): its pixel format is a colour one, or a palette with a colour entry.
    None when the file is not an image Pillow can open."""
    try:
        with open_image(path) as picture:
            mode = picture.mode
            if mode in ("P", "PA"):
                palette = getattr(picture.palette, "palette", None)
                if not palette or picture.palette.mode != "RGB":
                    return True
                rgb = np.frombuffer(bytes(palette), np.uint8)
                rgb = rgb[: len(rgb) // 3 * 3].reshape(-1, 3)
                return bool((rgb != rgb[:, :1]).any())
            return mode not in ("1", "L", "LA", "La", "I", "F") and not mode.startswith("I;16")
    except ImageRefused:
        return None


def mnist_style(path: Path, max_decode_bytes: int | None = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """The picture at `path` as one MNIST-like row of 784 uint8 values.

    Raises LowmemError (ImageRefused) for a file that is missing, not an image, damaged,
    a decompression bomb, or that would take more than `max_decode_bytes` to decode;
    and for a blank picture.
    """
    Image = _image_module()
    with open_image(path) as picture:
        w, h = picture.size
        if w < 1 or h < 1:
            raise ImageRefused(path, f"a {w}x{h} image has no pixels")
        # The digit is found in a copy at most WORK_SIDE pixels on its longer side.
        scale = min(1.0, WORK_SIDE / max(w, h))
        work = (max(1, round(w * scale)), max(1, round(h * scale)))

        def fit(size, sideways):  # the whole picture, box-averaged down to `work`
            return (0, 0, *size), work

        # the float64 arrays looking for the digit: the picture, its inverse, the ink mask
        analysis = work[0] * work[1] * (2 * 8 + 2)
        small = _render(picture, path, "L", fit, work if scale < 1 else None, max_decode_bytes,
                        analysis)
    gray = np.asarray(small, dtype=np.float64)
    del small
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
