"""The careless and hostile uses of issue 26, each run as a user would, with what came of it.

    LOWMEM_CNN_DATA=/path/to/mnist python scripts/hostile_repro.py [--only NAME] [--skip NAME]
        [--pillow-images PILLOW_SDIST/Tests/images] [--keep DIR]

For each case, one JSON line: the exit status, the lines the command wrote on stderr (one
line is the promise; a traceback never), whether every file the user had is byte for byte
as before (SHA-256 of each), and the child's peak RSS from /usr/bin/time against the
--max-ram it was given. Linux, as root for the device-node case; Pillow for the pictures.
Before the fixes, threads_1e12 and config_dev_zero grow until the machine kills them:
--skip them there.
"""

import argparse
import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "tests" / "fixtures" / "book"
MIB = 1 << 20


def lowmem(*args):
    return [sys.executable, "-m", "lowmem_cnn", *map(str, args)]


def digests(paths):
    out = {}
    for p in paths:
        p = Path(p)
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else (
            "dev" if p.exists() and not p.is_dir() else None)
    return out


def run(argv, cwd, timeout=600):
    """(exit status, or what ended it, stderr, the child's own peak RSS in bytes).

    The peak is /usr/bin/time's: a child forked from this script would inherit this
    script's peak in its ru_maxrss (Linux keeps the old mm's high-water mark at exec)."""
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(["/usr/bin/time", "-f", "PEAK-KIB %M", *argv], cwd=cwd,
                                 stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        try:
            status = child.wait(timeout)
            hung = False
        except subprocess.TimeoutExpired:  # a hang is a finding, not a verdict
            child.kill()
            status, hung = child.wait(), True
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    peak = [int(line.split()[1]) * 1024 for line in lines if line.startswith("PEAK-KIB ")]
    ended = [line for line in lines if line.startswith("Command terminated by signal")]
    text = "\n".join(line for line in lines
                     if not line.startswith(("PEAK-KIB ", "Command terminated by signal", "Command exited")))
    if hung:
        code = f"hung {timeout} s (killed)"
    elif ended:
        code = f"signal {signal.Signals(int(ended[0].split()[-1])).name}"
    else:
        code = status
    return code, text, peak[0] if peak else 0


# --- the files the cases use ---------------------------------------------------------


def book_params(d):
    path = d / "params.pkl"
    shutil.copy(BOOK / "simple_convnet_params.pkl", path)
    return path


def small_run(d, name="run", extra=()):
    """A real parameter file and checkpoint: SimpleConvNet, 1 epoch on 300 images."""
    out, ckpt = d / f"{name}.pkl", d / f"{name}.ckpt"
    code, err, _ = run(lowmem("train", "--limit", 300, "--epochs", 1, "--max-ram", "1G", "--out", out,
                              "--checkpoint", ckpt, *extra), d)
    assert code == 0, err
    return out, ckpt


def stopped_run(d):
    """A checkpoint of an unfinished run: 2 epochs on 300 images, killed after update 4."""
    ckpt = d / "run.pkl.ckpt"
    subprocess.run([sys.executable, str(ROOT / "tests" / "crash_child.py"), "--at-update", "4", "--",
                    *map(str, ["train", "--limit", 300, "--epochs", 2, "--checkpoint-every", 1,
                               "--out", d / "run.pkl"])], cwd=d, capture_output=True)
    assert ckpt.exists()
    return ckpt


def crafted_checkpoint(src, dst, change):
    """`src` with its JSON header changed by `change` and the SHA-256 made right again."""
    data = src.read_bytes()
    magic = b"LOWMEM-CNN CHECKPOINT\n"
    version, n = struct.unpack("<IQ", data[len(magic):len(magic) + 12])
    start = len(magic) + 12
    header = json.loads(data[start:start + n])
    new = change(header)
    new = new if isinstance(new, bytes) else json.dumps(new).encode()
    body = magic + struct.pack("<IQ", version, len(new)) + new + data[start + n:-32]
    dst.write_bytes(body + hashlib.sha256(body).digest())
    return dst


def first_array(change):
    def edit(header):
        change(header["arrays"][0])
        return header
    return edit


def picture(path, fmt, size=(64, 64)):
    from PIL import Image
    y, x = np.indices((size[1], size[0]))  # smooth: large pictures encode in seconds
    image = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    (image.convert("P") if fmt == "BLP" else image).save(path, fmt)  # BLP holds palettes
    return path


def folder(d, fmt, ext, per_class=6, size=(48, 48)):
    root = d / "pictures"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(root / c / f"{i}.{ext}", fmt, size)
    return root


def idx_dir(d, train_images=None, bomb=False):
    """A copy of the MNIST directory, its training images replaced as asked."""
    src = Path(os.environ["LOWMEM_CNN_DATA"])
    out = d / "mnist"
    out.mkdir()
    for f in src.glob("*-ubyte.gz"):
        shutil.copy(f, out)
    if train_images is not None:
        with gzip.open(out / "train-images-idx3-ubyte.gz", "wb") as g:
            g.write(struct.pack(">IIII", 0x803, train_images, 28, 28))
            if bomb:  # 3 GB of zeros after a header that says 300 images
                block = bytes(64 * MIB)
                for _ in range(48):
                    g.write(block)
        with gzip.open(out / "train-labels-idx1-ubyte.gz", "wb") as g:
            g.write(struct.pack(">II", 0x801, train_images) + bytes(train_images))
    return out


# --- the cases: (files the user has, argv, --max-ram in bytes or None, expected exit) ---


def case_object_dtype_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "obj.ckpt", first_array(lambda a: a.update(dtype="|O")))
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl"), None


def case_huge_shape_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "huge.ckpt", first_array(lambda a: a.update(shape=[10**6] * 4)))
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl",
                         "--max-ram", "256M"), 256 * MIB


def case_negative_shape_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "neg.ckpt", first_array(lambda a: a.update(shape=[-5, 3])))
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl"), None


def case_nested_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "deep.ckpt", lambda h: b"[" * 100_000 + b"]" * 100_000)
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl"), None


def case_no_meta_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "nometa.ckpt", lambda h: {"arrays": h["arrays"]})
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl"), None


def case_not_json_checkpoint(d):
    _, ckpt = small_run(d)
    bad = crafted_checkpoint(ckpt, d / "text.ckpt", lambda h: b"\xff\xfe not json")
    return [bad], lowmem("train", "--resume", "--checkpoint", bad, "--out", d / "z.pkl"), None


def case_eval_misclassified_over_input(d):
    p = book_params(d)
    return [p], lowmem("eval", p, "--misclassified", p), None


def case_export_over_input(d):
    p = book_params(d)
    return [p], lowmem("export", p, p), None


def case_train_plot_over_out(d):
    out, _ = small_run(d)
    return [out], lowmem("train", "--limit", 300, "--epochs", 1, "--out", out, "--plot", out), None


def case_export_to_device(d):
    p = book_params(d)
    dev = d / "full"
    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 7))  # a character device like /dev/full
    return [p, dev], lowmem("export", p, dev), None


def case_diverged_run_keeps_out(d):
    out, _ = small_run(d)
    # --weight-decay 1e300 is refused up front now; this one diverges in epoch 2
    return [out], lowmem("train", "--limit", 300, "--epochs", 2, "--out", out, "--optimizer", "sgd",
                         "--lr", 1, "--weight-decay", 1000, "--checkpoint", d / "div.ckpt"), None


def case_threads_1000(d):
    return [], lowmem("train", "--limit", 2000, "--epochs", 1, "--max-ram", "256M", "--threads", 1000,
                      "--out", d / "t.pkl"), 256 * MIB


def case_threads_1e12(d):
    return [], lowmem("train", "--limit", 2000, "--epochs", 1, "--max-ram", "256M", "--threads",
                      10**12, "--out", d / "t.pkl"), 256 * MIB


def pillow_tests():
    """The Pillow sdist's Tests/images, where --pillow-images names it (or None)."""
    return Path(os.environ["PILLOW_TEST_IMAGES"]) if os.environ.get("PILLOW_TEST_IMAGES") else None


def case_blp_folder(d):
    root = folder(d, "PNG", "png")
    if pillow_tests():  # the crafted BLP files of Pillow's tests
        for f in pillow_tests().glob("*.blp"):
            shutil.copy(f, root / "a")
    else:
        picture(root / "a" / "big.blp", "BLP", (512, 512))  # Pillow encodes BLP in Python: slow
    return [], lowmem("train", "--data-dir", root, "--image-size", 28, "--epochs", 1, "--max-ram", "100M",
                      "--out", d / "b.pkl"), 100 * MIB


def case_jpeg2000_predict(d):
    p = book_params(d)
    jp2 = picture(d / "big.jp2", "JPEG2000", (3000, 3000))  # planned at about 90 MiB before
    return [p, jp2], lowmem("predict", p, jp2, "--max-ram", "160M"), 160 * MIB


def pillow_folder(d):
    """Pillow's test pictures (every file, whatever it is) in two class folders."""
    root = d / "pillow"
    files = sorted(f for f in pillow_tests().rglob("*") if f.is_file())
    for i, f in enumerate(files):
        target = root / "ab"[i % 2] / f"{i:04d}_{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return root, files


def case_pillow_tests_train(d):
    if not pillow_tests():
        return None
    root, _ = pillow_folder(d)
    return [], lowmem("train", "--data-dir", root, "--image-size", 32, "--epochs", 1, "--max-ram", "256M",
                      "--out", d / "p.pkl"), 256 * MIB


def case_pillow_tests_predict(d):
    if not pillow_tests():
        return None
    p = book_params(d)
    _, files = pillow_folder(d)
    return [p], lowmem("predict", p, *sorted((d / "pillow").rglob("*")), "--max-ram", "256M"), 256 * MIB


def case_config_dev_zero(d):
    return [], lowmem("train", "--config", "/dev/zero", "--limit", 300, "--epochs", 1,
                      "--max-ram", "256M", "--out", d / "z.pkl"), 256 * MIB


def case_gzip_bomb(d):
    data = idx_dir(d, train_images=300, bomb=True)
    code = lowmem("train", "--data-dir", data, "--epochs", 1, "--max-ram", "256M", "--out", d / "z.pkl")
    return [], code, 256 * MIB


def case_warmup_written_then_refused(d):
    out = d / "w.pkl"
    code, err, _ = run(lowmem("train", "--limit", 300, "--epochs", 1, "--warmup", "1e308", "--out", out), d)
    if code != 0:  # refused up front: nothing written, nothing to read back
        return [], lowmem("train", "--limit", 300, "--epochs", 1, "--warmup", "1e308", "--out", out), None
    return [out], lowmem("eval", out), None


def case_big_endian_pickle(d):
    params = pickle.loads((BOOK / "simple_convnet_params.pkl").read_bytes())
    p = d / "big_endian.pkl"
    p.write_bytes(pickle.dumps({k: v.astype(v.dtype.newbyteorder(">")) for k, v in params.items()}))
    return [p], lowmem("eval", p), None


def case_pickle_protocol_2(d):
    params = pickle.loads((BOOK / "simple_convnet_params.pkl").read_bytes())
    p = d / "p2.pkl"
    p.write_bytes(pickle.dumps(params, protocol=2))
    return [p], lowmem("eval", p), None


def case_pickle_protocol_5(d):
    params = pickle.loads((BOOK / "simple_convnet_params.pkl").read_bytes())
    p = d / "p5.pkl"
    p.write_bytes(pickle.dumps(params, protocol=5))
    return [p], lowmem("eval", p), None


def _config(d, text):
    path = d / "net.toml"
    path.write_text(text)
    return path


SIMPLE = (ROOT / "src" / "lowmem_cnn" / "configs" / "simple_convnet.toml")


def case_config_typo(d):
    c = _config(d, SIMPLE.read_text().replace("stride", "strid", 1))
    return [c], lowmem("train", "--config", c, "--limit", 300, "--epochs", 1, "--out", d / "z.pkl"), None


def case_config_unknown_network_key(d):
    c = _config(d, SIMPLE.read_text().replace("[network]", "[network]\ncolour = 3", 1))
    return [c], lowmem("train", "--config", c, "--limit", 300, "--epochs", 1, "--out", d / "z.pkl"), None


def case_config_binary(d):
    c = d / "net.toml"
    c.write_bytes(bytes(range(256)) * 10)
    return [c], lowmem("train", "--config", c, "--limit", 300, "--epochs", 1, "--out", d / "z.pkl"), None


def case_config_nested(d):
    c = _config(d, "x = " + "[" * 5000 + "]" * 5000 + "\n")
    return [c], lowmem("train", "--config", c, "--limit", 300, "--epochs", 1, "--out", d / "z.pkl"), None


def case_config_units_7(d):
    text = SIMPLE.read_text()
    last = text.rindex("units")
    end = text.index("\n", last)
    c = _config(d, text[:last] + "units = 7" + text[end:])
    return [c], lowmem("train", "--config", c, "--limit", 300, "--epochs", 1, "--out", d / "z.pkl"), None


def case_resume_ignores_options(d):
    ckpt = stopped_run(d)
    # more epochs extend the run; another learning rate, augmentation or network contradict it
    return [ckpt], lowmem("train", "--resume", "--checkpoint", ckpt, "--epochs", 3,
                          "--lr", "0.5", "--augment", "flip", "--config", "deep_convnet"), None


def case_val_split_nan(d):
    return [], lowmem("train", "--limit", 300, "--epochs", 1, "--val-split", "nan",
                      "--out", d / "z.pkl"), None


def case_resume_mnist_with_folder(d):
    ckpt = stopped_run(d)
    root = folder(d, "PNG", "png")
    return [ckpt], lowmem("train", "--resume", "--checkpoint", ckpt, "--data-dir", root), None


def case_idx_zero_training_images(d):
    data = idx_dir(d, train_images=0)
    return [], lowmem("train", "--data-dir", data, "--epochs", 1, "--out", d / "z.pkl"), None


def case_empty_out(d):
    return [], lowmem("train", "--limit", 300, "--epochs", 1, "--out", ""), None


def case_empty_eval_path(d):
    return [], lowmem("eval", ""), None


def case_empty_checkpoint(d):
    return [], lowmem("train", "--limit", 300, "--epochs", 1, "--checkpoint", "", "--out", d / "z.pkl"), None


def case_predict_fifo(d):
    p = book_params(d)
    fifo = d / "pipe.png"
    os.mkfifo(fifo)
    return [p], lowmem("predict", p, fifo), None


def case_predict_one_bad_among_good(d):
    p = book_params(d)
    good = [picture(d / f"{i}.png", "PNG", (28, 28)) for i in range(2)]
    bad = d / "bad.png"
    bad.write_bytes(b"not a picture")
    return [p, *good, bad], lowmem("predict", p, good[0], bad, good[1]), None


def case_missing_plot_folder(d):
    return [], lowmem("train", "--limit", 300, "--epochs", 1, "--out", d / "z.pkl",
                      "--plot", d / "no" / "such" / "plot.png"), None


def case_out_is_checkpoint(d):
    return [], lowmem("train", "--limit", 300, "--epochs", 1, "--out", d / "x", "--checkpoint", d / "x"), None


CASES = {name[5:]: f for name, f in globals().items() if name.startswith("case_")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only these cases (repeatable)")
    parser.add_argument("--pillow-images", type=Path, help="the Pillow sdist's Tests/images folder")
    parser.add_argument("--skip", action="append", default=[], help="leave these cases out")
    parser.add_argument("--keep", type=Path, help="keep each case's folder under this one")
    args = parser.parse_args()
    if "LOWMEM_CNN_DATA" not in os.environ:
        sys.exit("set LOWMEM_CNN_DATA to the MNIST directory")
    if args.pillow_images:
        os.environ["PILLOW_TEST_IMAGES"] = str(args.pillow_images.resolve())
    rows = []
    for name, make in CASES.items():
        if (args.only and name not in args.only) or name in args.skip:
            continue
        d = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=args.keep))
        made = make(d)
        if made is None:  # needs what was not given (--pillow-images)
            continue
        files, argv, budget = made
        before = digests(files)
        code, err, peak = run(argv, d, timeout=120)
        after = digests(files)
        lines = [line for line in err.splitlines() if line.strip()]
        row = {"case": name, "exit": code, "stderr_lines": len(lines),
               "traceback": "Traceback" in err, "files_intact": before == after,
               "peak_mib": round(peak / MIB, 1), "budget_mib": budget and budget // MIB,
               "last_line": lines[-1][:160] if lines else ""}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
