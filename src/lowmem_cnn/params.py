"""Parameter files in the book's format: a pickled dict of NumPy arrays (W1, b1, ...).

A pickle can run code when it is loaded, so files are read with an unpickler that
resolves only the few names a pickled float array needs and refuses every other.
"""

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np

from lowmem_cnn.errors import LowmemError
from lowmem_cnn.files import atomic_write


def _dtype(spec, align=False, copy=False):
    # Pickled arrays rebuild their dtype as numpy.dtype('f8', False, True); allow
    # plain numbers only, so an object array cannot smuggle pickled objects in.
    dtype = np.dtype(spec)
    if dtype.kind not in "biufc" or dtype.fields is not None:
        raise _Refused(f"arrays of dtype {dtype} are not parameters")
    return dtype


def _reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise _Refused("only plain NumPy arrays are allowed")
    # NumPy pickles an array as an empty one whose state (shape and bytes, checked
    # against each other) is set after; any other shape here would be allocated as it
    # says, however huge, before anything could check it
    if tuple(shape) != (0,):
        raise _Refused(f"it declares an array of shape {tuple(shape)} outside its data, "
                       "which NumPy never writes")
    return np.ndarray.__new__(np.ndarray, (0,), _dtype(dtype))


# Everything a pickled dict of NumPy arrays names (older NumPy wrote numpy.core).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("collections", "OrderedDict"): dict,
}


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise _Refused(
                f"it asks to load {module}.{name}, which a parameter file never needs "
                "(refused: a pickle can run code)") from None


def read_params(path: Path, max_bytes: int) -> dict:
    """The dict of arrays in a parameter file, without running anything in it.

    `max_bytes` bounds the file's size (a parameter file is about the size of its
    arrays), so that a huge file cannot break the memory budget.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise LowmemError(f"{path}: {size:,} bytes is far more than this network's "
                              f"parameters need (at most {max_bytes:,})")
        data = path.read_bytes()
    except OSError as err:
        raise LowmemError(f"{path}: cannot read parameter file ({err.strerror})") from None
    if not data:
        raise LowmemError(f"{path}: empty file, not a parameter file")
    try:
        params = _ArrayUnpickler(io.BytesIO(data)).load()
    except _Refused as err:
        raise LowmemError(f"{path}: not a usable parameter file: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError,
            MemoryError, OverflowError, struct.error) as err:
        raise LowmemError(f"{path}: not a parameter file, or a damaged one "
                          f"({type(err).__name__}: {err})") from None
    if not isinstance(params, dict):
        raise LowmemError(f"{path}: holds a {type(params).__name__}, not a dict of arrays")
    return params


def check_params(path, params: dict, expected_shapes: dict):
    """Keys, shapes, dtypes and values fit the network; a clear error otherwise."""
    missing = [k for k in expected_shapes if k not in params]
    if missing:
        raise LowmemError(f"{path}: missing {', '.join(missing)} (this network has "
                          f"{', '.join(expected_shapes)})")
    extra = [str(k) for k in params if k not in expected_shapes]
    if extra:
        raise LowmemError(f"{path}: unexpected {', '.join(extra)} (this network has "
                          f"{', '.join(expected_shapes)})")
    for key, shape in expected_shapes.items():
        value = params[key]
        if not isinstance(value, np.ndarray):
            raise LowmemError(f"{path}: {key} is a {type(value).__name__}, not an array")
        if value.shape != tuple(shape):
            raise LowmemError(f"{path}: {key} has shape {value.shape}, expected {tuple(shape)}")
        if value.dtype.kind != "f":
            raise LowmemError(f"{path}: {key} has dtype {value.dtype}, expected floats")
        if not np.isfinite(value).all():
            raise LowmemError(f"{path}: {key} holds NaN or infinity")


def load_params(path, network):
    """Read, check and load a parameter file into `network`."""
    # float64 of every parameter, plus room for the pickle's own framing
    limit = 2 * network.param_bytes() * 8 // network.dtype.itemsize + (1 << 20)
    params = read_params(path, limit)
    check_params(path, params, network.expected_book_shapes())
    network.load_book_params(params)


def save_params(path, network, config: str | None = None):
    """Write the network's parameters in the book's format, atomically; for a network
    of named classes (trained on an image folder), their names, the input shape and
    the config (`config`) in a file beside it, PATH.json (see read_meta)."""
    path = Path(path)
    with atomic_write(path, "parameter file") as f:
        pickle.dump(network.book_params(), f, protocol=4)
    names = network.config.class_names
    if names is None:
        meta_path(path).unlink(missing_ok=True)  # a stale one would describe another network
        return
    meta = {"classes": list(names), "input_shape": list(network.config.input_shape), "config": config}
    with atomic_write(meta_path(path), "parameter file's classes") as f:
        f.write(json.dumps(meta, indent=1).encode())


def meta_path(path) -> Path:
    """Where the class names of a parameter file are: PATH.json. The pickle itself stays
    the book's format, which the book's load_params reads."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_meta(path) -> dict | None:
    """{"classes", "input_shape", "config"} written beside a parameter file by
    save_params, or None (the book's files, and networks of MNIST's digits)."""
    where = meta_path(path)
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LowmemError(f"{where}: cannot read the parameter file's classes ({err})") from None
    classes, shape = meta.get("classes") if isinstance(meta, dict) else None, None
    if isinstance(meta, dict):
        shape = meta.get("input_shape")
    if (not isinstance(classes, list) or not 2 <= len(classes) <= 256
            or not all(isinstance(name, str) for name in classes)
            or not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and v > 0 for v in shape)
            or not isinstance(meta.get("config"), (str, type(None)))):
        raise LowmemError(f"{where}: not a lowmem-cnn description of classes "
                          "(classes: 2 to 256 names, input_shape: [C, H, W], config)")
    return meta
