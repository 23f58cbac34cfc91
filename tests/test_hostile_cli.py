"""Hostile and broken input through the command line: exit status 1, a one-line message
naming the file, nothing executed, nothing the user had changed."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from idx_files import NAMES, write_dataset
from test_params import BROKEN, Boom, Evil, Exec, Sub, book_dict


def lowmem(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "lowmem_cnn", *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


PARAM_CASES = {f"malicious {type(p).__name__}": (p, "refused: a pickle can run code")
               for p in (Boom(), Evil(), Exec(), Sub())}
PARAM_CASES.update({case: (make, message) for case, (make, message) in BROKEN.items()})


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_hostile_parameter_files(tmp_path, case):
    payload, message = PARAM_CASES[case]
    data = write_dataset(tmp_path / "data")
    content = book_dict()
    if callable(payload):
        content = payload(content)
    else:
        content["W1"] = payload
    path = tmp_path / "params.pkl"
    path.write_bytes(pickle.dumps(content))
    before = snapshot(tmp_path)
    code, out, err = lowmem("eval", path, "--data-dir", data, "--max-ram", "1G", cwd=tmp_path)
    assert code == 1
    assert "Traceback" not in out + err
    error_lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and str(path) in error_lines[0]
    assert __import__("re").search(message, error_lines[0])
    assert not (tmp_path / "pwned").exists()
    assert snapshot(tmp_path) == before


DATA_CASES = {
    "truncated gzip": ("train_images", lambda b: b[: len(b) // 2], True, "damaged gzip"),
    "gzip of something else": ("test_images", lambda b: b"hello" * 100, True, "not an IDX images file"),
    "wrong magic": ("test_images", lambda b: b"\0\0\x08\x02" + b[4:], False, "magic number"),
    "labels and images disagree": ("train_labels", lambda b: b[:8][:4] + (49).to_bytes(4, "big")
                                   + b[8:-1], False, "50 images but"),
    "label 10": ("test_labels", lambda b: b[:-1] + b"\x0a", False, "outside 0..9"),
    "missing file": ("test_labels", lambda b: None, False, "missing t10k-labels-idx1-ubyte"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_broken_data(tmp_path, case):
    key, damage, gz, message = DATA_CASES[case]
    good = write_dataset(tmp_path / "good")
    original = (good / NAMES[key]).read_bytes()
    import gzip

    raw = damage(original)
    data = write_dataset(tmp_path / "data", gz=False, **{key: None})
    if raw is not None:
        target = data / (NAMES[key] + (".gz" if gz else ""))
        if gz:
            packed = gzip.compress(original)
            raw = damage(packed) if case == "truncated gzip" else gzip.compress(raw)
        target.write_bytes(raw)
    before = snapshot(data)
    code, out, err = lowmem("train", "--data-dir", data, "--epochs", "1", "--max-ram", "1G",
                            cwd=tmp_path)
    assert code == 1 and "Traceback" not in out + err
    assert message in err and NAMES[key] in err
    assert snapshot(data) == before
    assert not (tmp_path / "params.pkl").exists()


def test_images_of_a_data_set_are_never_written(tmp_path):
    data = write_dataset(tmp_path / "data", gz=True)
    os.chmod(data, 0o555)
    try:
        code, _, err = lowmem("train", "--data-dir", data, "--epochs", "1", "--max-ram", "1G",
                              cwd=tmp_path)
    finally:
        os.chmod(data, 0o755)
    assert code == 0, err
    assert sorted(os.listdir(data)) == sorted(n + ".gz" for n in NAMES.values())
    assert np.isfinite(pickle.loads((tmp_path / "params.pkl").read_bytes())["W1"]).all()
