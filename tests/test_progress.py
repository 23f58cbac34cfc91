"""The progress line."""

import io

from lowmem_cnn.progress import Progress


def test_progress_line_shows_share_rate_and_note_then_clears():
    out = io.StringIO()
    with Progress(200, "epoch 1/2", "img", stream=out) as bar:
        bar.update(10)
        assert out.getvalue() == ""  # not redrawn within half a second
        bar._drawn -= 1
        bar.set_note("loss 0.1234")
        bar.update(40)
        line = out.getvalue()
        assert line.startswith("\repoch 1/2:  25% 50/200 img, ") and "img/s, loss 0.1234" in line
    assert out.getvalue().endswith(" " * len(line.strip("\r")) + "\r")


def test_progress_in_bytes_without_a_total():
    out = io.StringIO()
    bar = Progress(0, "file.gz", "B", in_bytes=True, stream=out)
    bar._drawn -= 1
    bar.update(3 * 2**20)
    assert "file.gz: 3.0 MiB, " in out.getvalue() and "%" not in out.getvalue()
