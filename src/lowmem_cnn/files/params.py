"""Parameter files in the book's format: a pickled dict of NumPy arrays (W1, b1, ...),
and beside each, PATH.json, the description of its network (description.py): written
together (write_params), and read and checked against the network they are loaded into
(read_checked). The pickle is read without running it (pickles.py).
"""

import os
import pickle
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import shown_name
from lowmem_cnn.common.writing import HashingWriter, atomic_write
from lowmem_cnn.files.description import description_and_config, description_bytes, meta_path
from lowmem_cnn.files.pickles import read_pickle


# --- reading: the arrays, checked against the network and the description ---------------


def key_problem(params: dict, expected_shapes: dict, listing: bool = True) -> str | None:
    """What keeps the file's keys and array shapes from being the network's, if anything
    (`listing`: say the network's keys)."""
    keys = f" (this network has {', '.join(expected_shapes)})" if listing else ""
    missing = [k for k in expected_shapes if k not in params]
    if missing:
        return f"missing {', '.join(missing)}{keys}"
    extra = [shown_name(k) for k in params if k not in expected_shapes]
    if extra:
        return f"unexpected {', '.join(extra[:5])}{keys}"
    for key, shape in expected_shapes.items():
        value = params[key]
        if isinstance(value, np.ndarray) and value.shape != tuple(shape):
            return f"{key} has shape {value.shape}, expected {tuple(shape)}"
    return None


def check_arrays(path, params: dict):
    for key, value in params.items():
        if not isinstance(value, np.ndarray):
            raise LowmemError(f"{path}: {shown_name(key)} is a {type(value).__name__}, not an array")


def check_params(path, params: dict, expected_shapes: dict):
    """Keys, shapes, dtypes and values fit the network; a clear error otherwise."""
    problem = key_problem(params, expected_shapes)
    if problem:
        raise LowmemError(f"{path}: {problem}")
    check_arrays(path, params)
    for key in expected_shapes:
        value = params[key]
        if value.dtype.kind != "f":
            raise LowmemError(f"{path}: {key} has dtype {value.dtype}, expected floats")
        if not np.isfinite(value).all():
            raise LowmemError(f"{path}: {key} holds NaN or infinity")


def param_file_limit(network) -> int:
    """The largest parameter file `network`'s parameters can make: float64 of every
    parameter, twice over, plus room for the pickle's own framing."""
    return 2 * network.param_bytes() * 8 // network.dtype.itemsize + (1 << 20)


def load_params(path, network):
    """Read, check and load a parameter file into `network`."""
    network.load_book_params(read_checked(path, network.expected_book_shapes(),
                                          param_file_limit(network)))


def read_checked(path, expected_shapes: dict, max_bytes: int) -> dict:
    """The arrays of a parameter file, checked against the shapes of the network they are
    for and, when it has a description beside it, against that: it must have been written
    with these very bytes, and its network must have these parameters. The one reader of
    the CLI's commands and of the book's load_params."""
    params, digest = read_pickle(path, max_bytes)
    found = description_and_config(path)
    if found is not None:
        description, config = found
        where = meta_path(path)
        if description.get("sha256") not in (None, digest):
            raise LowmemError(f"{where}: describes another version of {Path(path).name} (its "
                              f"SHA-256 differs): the two files are out of step; copy them "
                              f"together, or remove {where.name} and give --config")
        if config is not None:
            _check_described_shapes(path, config, params)
    check_params(path, params, expected_shapes)
    return params


def _check_described_shapes(path, config, params: dict):
    from lowmem_cnn.engine.model import Network

    where = meta_path(path)
    for key, shape in Network(config).expected_book_shapes().items():
        value = params.get(key)
        have = getattr(value, "shape", None)
        if have != tuple(shape):
            said = "no " + key if value is None else f"{key} of shape {have}"
            raise LowmemError(f"{where}: its input shape and layers make {key} {tuple(shape)}, but "
                              f"{Path(path).name} has {said}")


# --- writing: the pickle and its description, together --------------------------------


def save_params(path, network, training: dict | None = None):
    """Write the network's parameters in the book's format, and its description beside
    them (see write_params); `training`: how they were trained (see description.TRAINING_FIELDS)."""
    write_params(path, network.book_params(), network.config, network.dtype, training)


def write_params(path, params: dict, config, dtype, training: dict | None = None):
    """Write `params` (the book's layout) as the book does, a pickled dict of arrays, and
    beside it PATH.json: the network `config` describes, its dtype and the pickle's
    SHA-256, so that the two files alone say how to use the parameters.

    Two files cannot be replaced in one step, so the order is chosen: both temporary
    files are written and fsynced, then the description is renamed into place, then the
    pickle. A failure while writing leaves both old files; a crash between the two
    renames leaves the new description beside the old pickle, which every reader refuses
    (the SHA-256 differs), never a new pickle taken for what an old description says.
    """
    path = Path(path)
    with atomic_write(path, "parameter file") as f:
        hashing = HashingWriter(f)
        pickle.dump(params, hashing, protocol=4)
        f.flush()
        os.fsync(f.fileno())  # now, not after the description is in place
        description = description_bytes(config, dtype, hashing.sha256.hexdigest(), training)
        with atomic_write(meta_path(path), "parameter file's description") as g:
            g.write(description)

