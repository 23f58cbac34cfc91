"""Checkpoint files: everything needed to continue a training run exactly.

Layout (no pickle, so loading one runs nothing):

    MAGIC | version (u32) | header length (u64) | header (JSON) | array bytes | SHA-256

The header holds the run's metadata and, for each array, its dtype, shape and offset
in the array bytes; the SHA-256 covers everything before it. Arrays are streamed
from and into their own memory, never copied whole.

Checkpoints are shared like parameter files, so a checkpoint is untrusted input: the
SHA-256 finds damage, not a crafted file (whoever crafts one recomputes it). The header
is bounded and checked, every array's dtype, shape and place in the file, before
anything is allocated (read_checkpoint); what a run takes from the metadata and the
arrays is checked against the run (check_run_meta, check_run_arrays).
"""

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from lowmem_cnn.files.config import MAX_LAYERS, checked_classes, checked_input_shape
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.writing import HashingWriter, atomic_write
from lowmem_cnn.common.reading import open_regular, parse_json, shown, shown_name

MAGIC = b"LOWMEM-CNN CHECKPOINT\n"
# 2: the plan records tile sizes per tiled layer ("tiles"), fused layers included
VERSION = 2
_PREFIX = struct.Struct("<IQ")  # version, header length
_DIGEST = 32  # the SHA-256 at the end
_CHUNK = 1 << 20
# 1 MiB: a 2-epoch DeepConvNet run's header is 3,332 bytes and each further epoch adds
# about 190 bytes of history; 256 class names of 255 characters, each \u-escaped, twice
# (the run's and its network's), are 0.4 MiB: room for thousands of epochs. json.loads
# makes at most about 24 bytes of objects per byte of header (a list of {}), so even a
# crafted header costs at most about 24 MiB while it is read.
HEADER_LIMIT = 1 << 20
# header.meta.run.network.layers[i] is 5 levels deep; nothing in a header nests deeper
HEADER_NESTING = 8
# Up to 256 layers of at most 4 arrays (weights, biases, a normalization's 2
# statistics), each kept up to 4 times (the parameter, 2 optimizer slots, the best
# epoch's copy), and the epoch's order.
MAX_ARRAYS = 256 * 4 * 4 + 1
MAX_ARRAY_NAME = 100
MAX_DIMENSIONS = 8  # a parameter has at most 4 (a convolution's weights)
_HEADER = "a checkpoint's header"
_ARRAY_FIELDS = {"name", "dtype", "shape", "offset"}
# The dtypes a checkpoint's arrays may have, as the writer names them (dtype.str): real
# floats and integers and booleans, of either byte order; read as native ones.
_DTYPES = {np.dtype(order + code).str: np.dtype(order + code)
           for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")
           for order in "<>"}


def write_checkpoint(path: Path, meta: dict, arrays: dict):
    descriptors, offset = [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        descriptors.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape),
                            "offset": offset})
        offset += array.nbytes
    header = json.dumps({"meta": meta, "arrays": descriptors}).encode()
    if len(header) > HEADER_LIMIT:  # a checkpoint no reader would take
        raise LowmemError(f"cannot write checkpoint {path}: its header ({len(header):,} bytes) is "
                          f"over the {HEADER_LIMIT:,} a checkpoint holds")
    with atomic_write(Path(path), "checkpoint") as f:
        out = HashingWriter(f)
        out.write(MAGIC + _PREFIX.pack(VERSION, len(header)) + header)
        for array in arrays.values():
            out.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        f.write(out.sha256.digest())


def _verify(f, path: Path, size: int):
    digest = hashlib.sha256()
    f.seek(0)
    left = size - _DIGEST
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise LowmemError(f"{path}: damaged checkpoint (truncated)")
        digest.update(chunk)
        left -= len(chunk)
    if f.read(_DIGEST) != digest.digest():
        raise LowmemError(f"{path}: damaged checkpoint (checksum mismatch); it cannot be resumed")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(metadata, arrays) of a checkpoint, after checking its format and checksum, and
    its header: the arrays' dtypes, shapes and places in the file, before any is made.
    Arrays of the other byte order are read as native ones."""
    path = Path(path)
    if not os.path.exists(path):
        raise LowmemError(f"{path}: no checkpoint there (train without --resume to start a run)")
    try:
        with open_regular(path, "a checkpoint") as f:
            return _read(f, path)
    except OSError as err:
        raise LowmemError(f"{path}: cannot read checkpoint ({err.strerror})") from None


def _read(f, path: Path) -> tuple[dict, dict]:
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + _PREFIX.size)
    if not head.startswith(MAGIC):
        raise LowmemError(f"{path}: not a lowmem-cnn checkpoint")
    if len(head) < len(MAGIC) + _PREFIX.size:
        raise LowmemError(f"{path}: damaged checkpoint (truncated)")
    version, header_len = _PREFIX.unpack(head[len(MAGIC):])
    if version != VERSION:
        raise LowmemError(f"{path}: checkpoint format version {version}, this lowmem-cnn reads {VERSION}")
    if header_len > HEADER_LIMIT:
        raise LowmemError(f"{path}: not a usable checkpoint: its header says it has {header_len:,} "
                          f"bytes, more than a checkpoint's ever holds ({HEADER_LIMIT:,})")
    start = len(MAGIC) + _PREFIX.size + header_len
    region = size - _DIGEST - start  # the bytes of the arrays
    if region < 0:
        raise LowmemError(f"{path}: damaged checkpoint (truncated)")
    _verify(f, path, size)
    f.seek(len(MAGIC) + _PREFIX.size)
    # a loss that diverged is NaN in the header (json.dumps writes it so)
    header = parse_json(path, f.read(header_len), _HEADER, HEADER_NESTING, constants=True)
    meta, descriptors = _check_header(path, header, region)
    arrays = {}
    for name, dtype, shape, offset in descriptors:
        array = np.empty(shape, dtype.newbyteorder("="))
        f.seek(start + offset)
        if f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
            raise LowmemError(f"{path}: damaged checkpoint (array {name} is short)")
        if not dtype.isnative:
            array.byteswap(inplace=True)
        arrays[name] = array
    return meta, arrays


def _whole(value, low=0, high=None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def _check_header(path: Path, header, region: int) -> tuple[dict, list]:
    """(metadata, [(name, dtype, shape, offset)]): every array a known dtype, its bytes
    inside the `region` bytes of arrays and apart from every other array's."""
    what = f"{path}: not a usable checkpoint"
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"}:
        raise LowmemError(f"{what}: its header is not an object of meta and arrays")
    meta, items = header["meta"], header["arrays"]
    if not isinstance(meta, dict):
        raise LowmemError(f"{what}: its meta is not an object")
    if not isinstance(items, list) or len(items) > MAX_ARRAYS:
        raise LowmemError(f"{what}: its arrays are not a list of at most {MAX_ARRAYS:,}")
    descriptors, names = [], set()
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or set(item) != _ARRAY_FIELDS:
            raise LowmemError(f"{what}: array {number} is not an object of name, dtype, shape "
                              "and offset")
        name, shape, offset = item["name"], item["shape"], item["offset"]
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_ARRAY_NAME or not name.isprintable():
            raise LowmemError(f"{what}: array {number}'s name {shown(name)} is not a printable "
                              f"text of 1 to {MAX_ARRAY_NAME} characters")
        if name in names:
            raise LowmemError(f"{what}: two arrays are called {name}")
        names.add(name)
        dtype = _DTYPES.get(item["dtype"]) if isinstance(item["dtype"], str) else None
        if dtype is None:
            raise LowmemError(f"{what}: array {name} has dtype {shown(item['dtype'])}, not one of "
                              "real floats, integers or booleans")
        # a dimension larger than the region is refused even in an array of no bytes
        if (not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS
                or not all(_whole(n, 0, region) for n in shape)):
            raise LowmemError(f"{what}: array {name} has shape {shown(shape)}, not a list of at "
                              f"most {MAX_DIMENSIONS} sizes the file has room for")
        nbytes = math.prod(shape) * dtype.itemsize
        if not _whole(offset) or offset + nbytes > region:
            raise LowmemError(f"{what}: array {name} ({nbytes:,} bytes at offset {shown(offset)}) is "
                              f"outside the file's {region:,} bytes of arrays")
        descriptors.append((name, dtype, tuple(shape), offset, nbytes))
    end = 0
    for name, _, _, offset, nbytes in sorted(descriptors, key=lambda d: d[3]):
        if nbytes and offset < end:
            raise LowmemError(f"{what}: array {name} overlaps another")
        end = max(end, offset + nbytes)
    return meta, [d[:4] for d in descriptors]


# --- what a training run takes from a checkpoint ---------------------------------------


def _number(value, low=-math.inf, high=math.inf, finite=True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):  # (isfinite of a huge int overflows)
        return not finite
    return low <= value <= high


def _text(value, most=4096) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= most and value.isprintable()


def _optional(check):
    return lambda value: value is None or check(value)


def _passes(check):
    """A test that `check` (one of config's, raising ValueError) lets a value through."""
    def passes(value) -> bool:
        try:
            check(value)
        except ValueError:
            return False
        return True
    return passes


MAX_THREADS = 1024  # a Network holds one workspace per thread
_COUNT = 2**53  # epochs, images, batches: far more than any run, still exact in a float


def _run_fields() -> dict:
    """What each field of training.Settings that run_options does not declare may hold."""
    return {
        "config": _text, "dtype": lambda v: v in ("float32", "float64"),
        "limit": _optional(lambda v: _whole(v, 1, _COUNT)), "out": _text,
        "max_ram": lambda v: _whole(v, 0, 2**63), "threads": lambda v: _whole(v, 1, MAX_THREADS),
        "train_images": _optional(lambda v: _whole(v, 1, _COUNT)), "data": _optional(_text),
        "input_shape": _optional(_passes(checked_input_shape)),
        "classes": _optional(_passes(checked_classes)),
        "test_fraction": _optional(lambda v: _number(v, 0, 1)), "strict": lambda v: isinstance(v, bool),
        "split_seed": _optional(lambda v: _whole(v, 0, 2**32 - 1)),
        "network": _optional(lambda v: isinstance(v, dict)),  # checked as a description when built
    }


def _rng_state(value) -> bool:
    """A PCG64's state, as numpy.random.Generator.bit_generator.state gives it."""
    if not isinstance(value, dict) or set(value) != {"bit_generator", "state", "has_uint32", "uinteger"}:
        return False
    state = value["state"]
    return (value["bit_generator"] == "PCG64" and isinstance(state, dict)
            and set(state) == {"state", "inc"} and all(_whole(v, 0, 2**128 - 1) for v in state.values())
            and value["has_uint32"] in (0, 1) and _whole(value["has_uint32"])
            and _whole(value["uinteger"], 0, 2**32 - 1))


def _plan(value) -> bool:
    from lowmem_cnn.engine.workspace import WHOLE

    return (isinstance(value, dict) and set(value) == {"micro_batch", "eval_micro_batch", "tiles", "threads"}
            and _whole(value["micro_batch"], 1, 2**31) and _whole(value["eval_micro_batch"], 1, 2**31)
            and isinstance(value["tiles"], list) and len(value["tiles"]) <= MAX_LAYERS
            and all(_whole(tile, 1, WHOLE) for tile in value["tiles"])
            and _whole(value["threads"], 1, MAX_THREADS))


_EPOCH_RECORD = {"epoch": _whole, "loss": lambda v: _number(v, finite=False),
                 "seconds": lambda v: _number(v, 0), "train_accuracy": lambda v: _number(v, 0, 1),
                 "test_accuracy": lambda v: _number(v, 0, 1), "train_sample": _whole,
                 "test_sample": _whole}
_VALIDATION_RECORD = {"val_accuracy": lambda v: _number(v, 0, 1), "val_sample": _whole}


def _epoch_record(value, epoch: int) -> bool:
    """A record of TrainingRun._end_epoch: its fields, and any other a later one adds, a
    number or null."""
    if not isinstance(value, dict):
        return False
    fields = _EPOCH_RECORD | (_VALIDATION_RECORD if "val_accuracy" in value else {})
    return (set(fields) <= set(value) and value["epoch"] == epoch
            and all(check(value[key]) for key, check in fields.items())
            and all(value[key] is None or _number(value[key], finite=False)
                    for key in value if key not in fields))


def check_run_meta(path: Path, meta: dict):
    """The metadata of a training checkpoint (TrainingRun.checkpoint_state), every field
    training.resume reads: a LowmemError that names the field otherwise."""
    from dataclasses import MISSING, fields

    from lowmem_cnn.training.run_options import check_settings
    from lowmem_cnn.training.run import Settings

    what = f"{path}: not a usable training checkpoint"
    run = meta.get("run")
    if not isinstance(run, dict):
        raise LowmemError(f"{path}: not a training checkpoint")
    checks = _run_fields()
    known = {field.name: field for field in fields(Settings)}
    for key, value in run.items():
        if key not in known:
            raise LowmemError(f"{what}: its run has the unknown setting {shown_name(key)}")
        if key in checks and not checks[key](value):
            raise LowmemError(f"{what}: its run's {key} {shown(value)} is not one a run has")
    try:  # the options train takes, as train checks them
        check_settings(run)
    except ValueError as err:
        raise LowmemError(f"{path}: its settings: {err}") from None
    missing = [key for key, field in known.items() if key not in run
               and field.default is MISSING and field.default_factory is MISSING]
    if missing:
        raise LowmemError(f"{what}: its run lacks {', '.join(missing)}")
    epochs = run["epochs"]
    top = {"epochs_done": lambda v: _whole(v, 0, epochs), "position": lambda v: _whole(v, 0, _COUNT),
           "loss_sum": lambda v: _number(v, finite=False), "seconds": lambda v: _number(v, 0),
           "rng": _rng_state, "optimizer_steps": lambda v: _whole(v, 0, 2**63),
           "run": lambda v: True, "history": lambda v: isinstance(v, list),
           "finished": lambda v: isinstance(v, bool), "plan": _plan,
           "best": _optional(lambda v: isinstance(v, dict) and set(v) == {"epoch", "val_accuracy"}
                             and _whole(v["epoch"], 1, epochs) and _number(v["val_accuracy"], 0, 1))}
    unknown = [shown_name(key) for key in meta if key not in top]
    if unknown:
        raise LowmemError(f"{what}: unknown field {', '.join(unknown[:3])}")
    for key, check in top.items():
        if key not in meta and key != "best":  # (a checkpoint from before --keep best)
            raise LowmemError(f"{what}: it lacks {key}")
        if key not in meta:
            continue
        if not check(meta[key]):
            raise LowmemError(f"{what}: its {key} {shown(meta[key])} is not one a run has")
    history = meta["history"]
    if len(history) != meta["epochs_done"]:
        raise LowmemError(f"{what}: its history has {len(history):,} epochs, not the "
                          f"{meta['epochs_done']:,} done")
    for epoch, record in enumerate(history, start=1):
        if not _epoch_record(record, epoch):
            raise LowmemError(f"{what}: its history's epoch {epoch} is {shown(record)}")


def network_arrays(network) -> dict:
    """The network's parameters and statistics as a checkpoint names them (param/W1,
    state/...): the network's own arrays, so that copying into them sets the network."""
    return {**{f"param/{key}": value for key, value in network.params().items()},
            **{f"state/{key}": value for key, value in network.state().items()}}


def check_run_arrays(path: Path, meta: dict, arrays: dict, run):
    """The arrays of a training checkpoint are those of the training.TrainingRun `run`: the
    network's parameters and statistics (their shapes and its dtype), the optimizer's
    state (all of it or none), the best epoch's copy (all or none) and the epoch's order
    (a permutation of the training images, when an epoch is under way)."""
    network, optimizer, loop = run.network, run.optimizer, run.loop
    what = f"{path}: not a usable training checkpoint"
    kept = network_arrays(network)
    for name, value in kept.items():
        found = arrays.get(name)
        if found is None or found.shape != value.shape:  # a checkpoint from before `network`
            raise LowmemError(f"{path}: the run trained another network than "
                              f"{run.settings.config} describes now ({name.partition('/')[2]})")
    slots = {f"optimizer/{slot}{key}": value for slot in optimizer.slots
             for key, value in network.params().items()}
    best = {f"best/{name}": value for name, value in kept.items()}
    for group, expected in (("optimizer state", slots), ("best epoch's copy", best)):
        present = [name for name in expected if name in arrays]
        if present and len(present) != len(expected):
            raise LowmemError(f"{what}: its {group} lacks "
                              f"{next(name for name in expected if name not in arrays)}")
        kept.update({name: expected[name] for name in present})
    for name, array in arrays.items():
        if name == "order":
            continue
        if name not in kept:
            raise LowmemError(f"{what}: it has an array {name} this run does not")
        if array.shape != kept[name].shape or array.dtype != network.dtype:
            raise LowmemError(f"{what}: {name} is {array.dtype} of shape {array.shape}, not "
                              f"{network.dtype} of shape {kept[name].shape}")
    order, position = arrays.get("order"), meta["position"]
    if order is None:
        if position:
            raise LowmemError(f"{what}: it is at update {position:,} of an epoch, without the "
                              "epoch's order")
        return
    training = np.arange(loop.count) if loop.indices is None else loop.indices
    if (order.dtype.kind not in "iu" or order.shape != training.shape
            or not np.array_equal(np.sort(order), training)):
        raise LowmemError(f"{what}: its order is not an order of the {loop.count:,} training images")
    if position > loop.updates_per_epoch:
        raise LowmemError(f"{what}: it is at update {position:,} of an epoch of "
                          f"{loop.updates_per_epoch:,}")
