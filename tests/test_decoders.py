"""Every path keeps the budget: --threads beyond the cores, decoders that take more
than a picture's header says, decoders that write to stderr, and predict's arguments
(a FIFO, one bad file among good ones). The per-format figures are measured by
scripts/measure_decoders.py; these tests check the rules with small pictures."""

import json
import os
import struct
from io import BytesIO

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import need_module, run_lowmem, run_python
from lowmem_cnn.memory.budget import check_threads, usable_cores
from lowmem_cnn.common.errors import LowmemError

MIB = 2**20


# --- threads --------------------------------------------------------------------------


def test_threads_beyond_the_cores_are_refused_before_anything_is_made(tmp_path):
    too_many = usable_cores() + 1
    done = run_lowmem("train", "--limit", 100, "--epochs", 1, "--max-ram", "256M",
                      "--threads", too_many, "--out", tmp_path / "p.pkl")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--threads {too_many:,}" in lines[0]
    assert f"the {usable_cores()} CPU core" in lines[0]
    assert not (tmp_path / "p.pkl").exists()
    # refused before the network made a workspace and gradients for each thread: the
    # peak is the interpreter's and its imports' (a run that plans reaches 60 MiB)
    assert done.peak_rss < 48 * MIB


def test_the_book_classes_refuse_threads_beyond_the_cores_too():
    from lowmem_cnn.book import SimpleConvNet

    with pytest.raises(LowmemError, match=r"^threads=\d+: more threads than the \d+ CPU core"):
        SimpleConvNet(threads=usable_cores() + 1, max_ram="512M")
    for wrong in (0, -1, True, "2", 1.5):
        with pytest.raises(LowmemError, match="whole number of threads"):
            check_threads(wrong)
    assert check_threads(np.int64(1)) == 1


def test_every_threads_gradient_set_is_counted_before_the_parameters_exist(tmp_path):
    from lowmem_cnn.memory.budget import current_rss
    from lowmem_cnn.files.config import load_config
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.memory.planner import BudgetError, check_parameters_fit

    config = tmp_path / "wide.toml"
    config.write_text('[network]\nname = "wide"\ninput_shape = [1, 28, 28]\n'
                      'layers = [{type = "affine", units = 8192}, {type = "relu"},\n'
                      '          {type = "affine", units = 10}]\n')
    spec = load_config(str(config)).network

    def fits(threads, budget):
        try:
            check_parameters_fit(Network(spec, np.float32, threads), budget, optimizer_copies=2)
        except BudgetError:
            return False
        return True

    params = Network(spec).param_bytes()  # 25.9 MiB: made only once the check passes
    # room for the parameters, Adam's two copies and one thread's gradients, not two's
    budget = current_rss() + params * 4 + params // 2 + 8 * MIB
    assert fits(1, budget)
    assert not fits(2, budget)


# --- decoders -------------------------------------------------------------------------

# In a fresh process: decode a picture within a budget, and say the growth of the peak
# RSS (VmHWM, reset just before) over the resident set before decoding.
DECODE_AND_MEASURE = r"""
import json, sys
from lowmem_cnn.memory.budget import map_large_arrays
map_large_arrays()
from lowmem_cnn.data import imaging
def status(field):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

path, room = sys.argv[1], int(sys.argv[2])
try:  # the imports and the plug-in, made before measuring
    imaging.image_row(path, (32, 32), 3, 1)
except imaging.ImageRefused:
    pass
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
try:
    imaging.image_row(path, (32, 32), 3, room)
    refused = None
except imaging.ImageRefused as err:
    refused = err.reason
print(json.dumps({"growth": status("VmHWM") - before, "refused": refused}))
"""


def _decode_in_child(path, room):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    done = run_python("-c", DECODE_AND_MEASURE, path, room)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _pillow():
    need_module("PIL")
    from PIL import Image

    return Image


def _gradient(w, h):
    y, x = np.indices((h, w))
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def test_a_jpeg2000_is_planned_with_what_openjpeg_takes(tmp_path):
    Image = _pillow()
    path = tmp_path / "big.jp2"
    Image.fromarray(_gradient(1000, 1000)).save(path)
    # OpenJPEG holds an int32 per component and pixel: 20 MiB measured for 1000x1000,
    # where the plan once counted 12.5 MiB. Within 16 MiB: refused, or decoded in it.
    seen = _decode_in_child(path, 16 * MIB)
    assert seen["refused"] is not None or seen["growth"] <= 16 * MIB, seen
    assert "would take about" in seen["refused"]


def _blp1_holding(jpeg: bytes, declared=(64, 64)) -> bytes:
    """A BLP1 file saying it is `declared` pixels, holding a JPEG of its own size."""
    header = b"BLP1" + struct.pack("<iIIIiI", 0, 0, *declared, 5, 0)  # JPEG, no alpha
    offsets = [28 + 128 + 4] + [0] * 15  # after the mip tables and the JPEG header size
    lengths = [len(jpeg)] + [0] * 15
    return header + struct.pack("<16I", *offsets) + struct.pack("<16I", *lengths) + \
        struct.pack("<I", 0) + jpeg


def test_a_decoder_taking_more_than_its_header_says_is_stopped_within_the_budget(tmp_path):
    Image = _pillow()
    jpeg = BytesIO()
    Image.fromarray(_gradient(2000, 2000)).save(jpeg, "JPEG")
    path = tmp_path / "small_outside.blp"
    path.write_bytes(_blp1_holding(jpeg.getvalue()))
    with Image.open(path) as picture:
        assert picture.size == (64, 64)  # what the plan sees
    # the 2000x2000 JPEG inside takes about 45 MiB to decode
    seen = _decode_in_child(path, 24 * MIB)
    assert seen["refused"] is not None and "its decoder took more" in seen["refused"], seen
    assert seen["growth"] <= 24 * MIB


def _tiff_libtiff_cannot_decode(path):
    """A TIFF whose compression libtiff names but was built without (WebP, 50001):
    libtiff writes its error to file descriptor 2."""
    Image = _pillow()
    Image.fromarray(_gradient(16, 16)).save(path, compression="tiff_adobe_deflate")
    data = bytearray(path.read_bytes())
    start = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[start : start + 2])[0]):
        entry = start + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:  # Compression
            data[entry + 8 : entry + 10] = struct.pack("<H", 50001)
    path.write_bytes(bytes(data))


DECODE_AND_SAY = r"""
import sys
from lowmem_cnn.data import imaging
try:
    imaging.image_row(sys.argv[1], (8, 8), 3)
except imaging.ImageRefused as err:
    print(err.reason)
print("the run's own message", file=sys.stderr)
"""


def test_decoder_messages_go_into_the_reason_not_to_stderr(tmp_path):
    _pillow()
    from PIL import features

    if not features.check("libtiff"):
        pytest.skip("needs Pillow with libtiff")
    path = tmp_path / "webp_inside.tif"
    _tiff_libtiff_cannot_decode(path)
    done = run_python("-c", DECODE_AND_SAY, path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "the run's own message\n"
    assert "the decoder said:" in done.stdout  # libtiff's words, whichever they are


# --- predict --------------------------------------------------------------------------


def _digit(path):
    Image = _pillow()
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255  # a one
    Image.fromarray(pixels).save(path)
    return path


def test_predict_refuses_a_fifo_without_reading_it(tmp_path, book_params):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    good = _digit(tmp_path / "one.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    # nobody writes to the FIFO: reading it would wait forever (the timeout ends a hang)
    done = run_lowmem("predict", book_params, fifo, good, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == f"Error: {fifo}: not a regular file (a FIFO), not read"
    assert done.stdout.startswith(f"{good}: ")


def test_predict_gives_a_line_for_each_picture_and_fails_if_one_failed(tmp_path, book_params):
    from lowmem_cnn.cli import main

    good = [_digit(tmp_path / f"{i}.png") for i in range(2)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    result = CliRunner().invoke(main, ["predict", str(book_params), str(good[0]), str(bad),
                                       str(good[1]), str(tmp_path)])
    assert result.exit_code == 1, result.output
    out = result.stdout.splitlines()
    assert [line.split(":")[0] for line in out] == [str(good[0]), str(good[1])]
    errors = result.stderr.splitlines()
    assert errors == [f"Error: {bad}: not an image Pillow can read",
                      f"Error: {tmp_path}: a directory, not an image file"]
    as_json = CliRunner().invoke(main, ["predict", str(book_params), str(bad), str(good[0]),
                                        "--json"])
    assert as_json.exit_code == 1
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [sorted(line) for line in lines] == [["error", "image"],
                                                ["class", "digit", "image", "probabilities"]]

