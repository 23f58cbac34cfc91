"""Decoding pictures within a byte budget (imaging.py)."""

import json
import textwrap

import numpy as np
import pytest

from conftest import need_module, run_python
from lowmem_cnn.data import open_directory
from lowmem_cnn.imaging import ImageRefused, is_color, mnist_style
from lowmem_cnn.planner import chosen_plan

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
    from lowmem_cnn.config import load_config
    from lowmem_cnn.model import Network
    from lowmem_cnn.params import load_params

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
    from lowmem_cnn.budget import map_large_arrays
    map_large_arrays()
    from PIL import Image
    Image.init()
    from lowmem_cnn import imaging
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
