"""Decoding pictures within a byte budget (imaging.py)."""

import io
import json
import textwrap

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import need_module, run_python
from lowmem_cnn.data.idx import open_directory
from lowmem_cnn.data.imaging import ImageRefused, _cover_box, image_row, is_color, mnist_style
from lowmem_cnn.memory.planner import chosen_plan

need_module("PIL")
from PIL import Image  # noqa: E402


def digit_page(mnist_dir, index, size, ink=(0, 0, 0)):
    """Test digit `index` drawn large, in `ink` on white paper, centred on a 4:3 page."""
    test = open_directory(mnist_dir).test
    digit = test.images.read_range(index, index + 1).reshape(28, 28)
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
    alpha = big[..., None] / 255.0
    page = np.full((size * 3 // 2, size * 2, 3), 255.0)
    top, left = size // 4, size // 2
    page[top : top + size, left : left + size] = 255 * (1 - alpha) + np.array(ink) * alpha
    return Image.fromarray(page.round().astype(np.uint8)), int(test.labels[index])


def test_big_photo_of_a_digit_within_a_small_budget(tmp_path, mnist_dir, book_params):
    from lowmem_cnn.files.config import load_config
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.files.params import load_params

    network = Network(load_config().network)
    load_params(book_params, network)
    rows, labels = [], []
    for index in range(3):
        page, label = digit_page(mnist_dir, index, 1500, ink=(20, 30, 140))  # 3000x2250, blue ink
        page.save(tmp_path / "photo.jpg", quality=90)
        page.resize((400, 300)).save(tmp_path / "small.png")
        # Whole, the JPEG would decode to 3000 x 2250 x 4 bytes = 26 MiB; drawn at half
        # scale as gray, 1.6 MiB (and the digit is looked for in 1024 x 768).
        row = mnist_style(tmp_path / "photo.jpg", max_decode_bytes=24 * 2**20)
        small = mnist_style(tmp_path / "small.png")
        assert np.abs(row.astype(int) - small).mean() < 8
        rows.append(row)
        labels.append(label)
    assert network.predict(np.stack(rows), chosen_plan(network, 3)).tolist() == labels
    page.save(tmp_path / "photo.png", compress_level=1)
    with pytest.raises(ImageRefused, match="3000x2250 pixels: decoding it would take"):
        mnist_style(tmp_path / "photo.png", max_decode_bytes=24 * 2**20)


def test_is_color_from_the_header(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray).save(tmp_path / "gray.gif")  # a palette of grays
    Image.fromarray(np.stack([gray, gray[::-1], gray.T], 2)).save(tmp_path / "rgb.jpg")
    Image.fromarray(np.stack([gray, gray[::-1], gray.T], 2)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "colour.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    (tmp_path / "notes.png").write_text("not a picture")
    assert [is_color(tmp_path / name) for name in
            ("gray.png", "gray.gif", "rgb.jpg", "colour.png", "deep.png", "notes.png")] == [
        False, False, True, True, False, None]


MEASURE = textwrap.dedent("""
    import json, resource, sys
    from lowmem_cnn.memory.budget import map_large_arrays
    map_large_arrays()
    from PIL import Image
    Image.init()
    from lowmem_cnn.data import imaging
    needed = {}
    real = imaging.decode_bytes
    def spy(*args, **kwargs):
        needed["bytes"] = real(*args, **kwargs)
        return needed["bytes"]
    imaging.decode_bytes = spy
    before = int(open("/proc/self/statm").read().split()[1]) * 4096
    imaging.image_row(sys.argv[1], (28, 28), 3, max_decode_bytes=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"estimate": needed["bytes"], "measured": peak - before}))
""")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_decode_estimate_is_above_the_measured_peak(tmp_path):
    y, x = np.mgrid[0:1500, 0:2000]
    photo = Image.fromarray(np.stack([(x // 7) % 256, (y // 5) % 256, ((x + y) // 9) % 256],
                                     axis=2).astype(np.uint8))
    photo.save(tmp_path / "p.png", compress_level=1)
    photo.save(tmp_path / "p.webp", quality=80)  # libwebp and Pillow keep copies of their own
    photo.save(tmp_path / "p.jpg", quality=85, progressive=True)  # coefficients kept whole
    photo.convert("RGBA").save(tmp_path / "p4.png", compress_level=1)
    (tmp_path / "measure.py").write_text(MEASURE)
    for name in ("p.png", "p.webp", "p.jpg", "p4.png"):
        done = run_python(tmp_path / "measure.py", tmp_path / name)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["measured"] < result["estimate"], (name, result)


# --- the crop box of a folder's pictures ------------------------------------------------------

sides = st.integers(1, 5000)
# (H, W): squares the CLI is given, and HxW targets wider, taller and far from square
targets = st.one_of(st.sampled_from([(28, 28), (48, 48), (64, 64), (128, 128), (224, 224), (24, 32),
                                     (32, 24), (1, 1), (1, 300), (300, 1)]),
                    st.tuples(st.integers(1, 512), st.integers(1, 512)))


def old_cover_box(size, out_size):
    """The box as computed before issue 19 (floats only, no clamp)."""
    (w, h), (out_w, out_h) = size, out_size
    scale = max(out_w / w, out_h / h)
    crop_w, crop_h = out_w / scale, out_h / scale
    if (crop_w, crop_h) == (w, h):
        return (0, 0, w, h)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


@settings(max_examples=3000, deadline=None)
@given(sides, sides, targets)
@example(159, 94, (48, 48))  # a 317x187 JPEG drawn at half scale: the box's top was -7e-15
@example(188, 451, (48, 48))  # left was -1.4e-14
@example(1, 5000, (128, 128))
@example(5000, 1, (24, 32))
def test_cover_box_lies_inside_the_picture(w, h, target):
    out_h, out_w = target
    left, top, right, bottom = _cover_box((w, h), (out_w, out_h))
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    crop_w, crop_h = right - left, bottom - top
    # it covers: one side is the whole picture's, the box has the target's shape, centred
    assert crop_w == pytest.approx(w, rel=1e-9) or crop_h == pytest.approx(h, rel=1e-9)
    assert crop_w * out_h == pytest.approx(crop_h * out_w, rel=1e-9)
    assert left == pytest.approx(w - right, abs=1e-9 * w)
    assert top == pytest.approx(h - bottom, abs=1e-9 * h)
    # a box that worked before is the same to the bit (parameter files trained on a folder
    # see the same rows)
    old = old_cover_box((w, h), (out_w, out_h))
    if 0 <= old[0] and 0 <= old[1] and old[2] <= w and old[3] <= h:
        assert (left, top, right, bottom) == old


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 700), st.integers(1, 700), targets)
@example(159, 94, (48, 48))
@example(188, 451, (48, 48))
def test_pillow_takes_the_box_and_gives_the_target_size(w, h, target):
    from PIL import Image

    out_h, out_w = target
    box = _cover_box((w, h), (out_w, out_h))
    small = Image.new("RGB", (w, h)).resize((out_w, out_h), Image.Resampling.LANCZOS, box=box,
                                            reducing_gap=3.0)
    assert small.size == (out_w, out_h)


# The JPEGs of the folder that were skipped ("box offset can't be negative"), and
# other awkward sizes: thin, one pixel, far from the target's shape.
AWKWARD = [(317, 187), (188, 451), (494, 375), (373, 388), (262, 187), (1, 1), (1, 499), (499, 1),
           (4999, 3), (3, 4999), (47, 49), (48, 48), (97, 95)]


@pytest.mark.parametrize("target", [(48, 48), (64, 64), (24, 32), (32, 24), (28, 28)])
def test_awkward_sizes_decode_to_the_target_size(target):
    rng = np.random.default_rng(19)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the box is taken in the stored frame
    for w, h in AWKWARD:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        files = {"jpg": {"quality": 90}, "png": {}, "turned.jpg": {"exif": exif}}
        for name, options in files.items():
            data = io.BytesIO()
            Image.fromarray(pixels).save(data, "JPEG" if name.endswith("jpg") else "PNG", **options)
            for channels in (1, 3):
                data.seek(0)
                row = image_row(data, target, channels)
                assert row.shape == (channels * target[0] * target[1],), (w, h, name)
