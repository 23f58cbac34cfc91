"""Checkpoint files: everything needed to continue a training run exactly.

Layout (no pickle, so loading one runs nothing):

    MAGIC | version (u32) | header length (u64) | header (JSON) | array bytes | SHA-256

The header holds the run's metadata and, for each array, its dtype, shape and offset
in the array bytes; the SHA-256 covers everything before it. Arrays are streamed
from and into their own memory, never copied whole.
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from lowmem_cnn.errors import LowmemError
from lowmem_cnn.files import atomic_write

MAGIC = b"LOWMEM-CNN CHECKPOINT\n"
# 2: the plan records tile sizes per tiled layer ("tiles"), fused layers included
VERSION = 2
_CHUNK = 1 << 20


class _HashingWriter:
    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data):
        self.digest.update(data)
        self.f.write(data)


def write_checkpoint(path: Path, meta: dict, arrays: dict):
    descriptors, offset = [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        descriptors.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                            "offset": offset})
        offset += array.nbytes
    header = json.dumps({"meta": meta, "arrays": descriptors}).encode()
    with atomic_write(Path(path), "checkpoint") as f:
        out = _HashingWriter(f)
        out.write(MAGIC + struct.pack("<IQ", VERSION, len(header)) + header)
        for array in arrays.values():
            out.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        f.write(out.digest.digest())


def _verify(path: Path, size: int):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size - 32
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        if f.read(32) != digest.digest():
            raise LowmemError(f"{path}: damaged checkpoint (checksum mismatch); it cannot be resumed")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(metadata, arrays) of a checkpoint, after checking its format and checksum."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 12)
    except FileNotFoundError:
        raise LowmemError(f"{path}: no checkpoint there (train without --resume to start a run)") from None
    except OSError as err:
        raise LowmemError(f"{path}: cannot read checkpoint ({err.strerror})") from None
    if not head.startswith(MAGIC):
        raise LowmemError(f"{path}: not a lowmem-cnn checkpoint")
    if len(head) < len(MAGIC) + 12:
        raise LowmemError(f"{path}: damaged checkpoint (truncated)")
    version, header_len = struct.unpack("<IQ", head[len(MAGIC):])
    if version != VERSION:
        raise LowmemError(f"{path}: checkpoint format version {version}, this lowmem-cnn reads {VERSION}")
    if len(MAGIC) + 12 + header_len + 32 > size:
        raise LowmemError(f"{path}: damaged checkpoint (truncated)")
    _verify(path, size)
    with open(path, "rb") as f:
        f.seek(len(MAGIC) + 12)
        header = json.loads(f.read(header_len))
        start = f.tell()
        arrays = {}
        for item in header["arrays"]:
            array = np.empty(item["shape"], np.dtype(item["dtype"]))
            f.seek(start + item["offset"])
            if f.readinto(memoryview(array).cast("B")) != array.nbytes:
                raise LowmemError(f"{path}: damaged checkpoint (array {item['name']} is short)")
            arrays[item["name"]] = array
    return header["meta"], arrays
