"""Parameter files in the book's format: a pickled dict of NumPy arrays (W1, b1, ...),
and beside each, PATH.json, the description of its network (write_params).

A pickle can run code when it is loaded, so files are read with an unpickler that
resolves only the few names a pickled float array needs and refuses every other. The
description travels with the pickle, so it is untrusted input too (read_description).
"""

import hashlib
import io
import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np

from lowmem_cnn.config import DEFAULT_CONFIG, canonical_layers, shown, shown_name
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.files import atomic_write
from lowmem_cnn.reading import parse_json, read_small_regular_file


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
    return _read_pickle(path, max_bytes)[0]


def _read_pickle(path: Path, max_bytes: int) -> tuple[dict, str]:
    """(read_params, the SHA-256 of the file's bytes: what its description names)."""
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
    return params, hashlib.sha256(data).hexdigest()


def _key_problem(params: dict, expected_shapes: dict, listing: bool = True) -> str | None:
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


def _check_arrays(path, params: dict):
    for key, value in params.items():
        if not isinstance(value, np.ndarray):
            raise LowmemError(f"{path}: {shown_name(key)} is a {type(value).__name__}, not an array")


def check_params(path, params: dict, expected_shapes: dict):
    """Keys, shapes, dtypes and values fit the network; a clear error otherwise."""
    problem = _key_problem(params, expected_shapes)
    if problem:
        raise LowmemError(f"{path}: {problem}")
    _check_arrays(path, params)
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
    params, digest = _read_pickle(path, max_bytes)
    found = _description(path)
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
    from lowmem_cnn.model import Network

    where = meta_path(path)
    for key, shape in Network(config).expected_book_shapes().items():
        value = params.get(key)
        have = getattr(value, "shape", None)
        if have != tuple(shape):
            said = "no " + key if value is None else f"{key} of shape {have}"
            raise LowmemError(f"{where}: its input shape and layers make {key} {tuple(shape)}, but "
                              f"{Path(path).name} has {said}")


# --- writing: the pickle and its description, together --------------------------------


class _Hashing:
    """A file that also hashes what is written to it (pickle streams the arrays through)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)


def save_params(path, network, training: dict | None = None):
    """Write the network's parameters in the book's format, and its description beside
    them (see write_params); `training`: how they were trained (see TRAINING_FIELDS)."""
    write_params(path, network.book_params(), network.config, network.dtype, training)


# How a network was trained, recorded in its description for the reader (never used to
# build or run it): the run's augmentation, weight decay, schedule, validation share, and
# the epoch whose parameters these are.
TRAINING_FIELDS = ("augment", "weight_decay", "lr_schedule", "warmup", "val_split", "epoch")


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
    from lowmem_cnn.config import describe_network

    path = Path(path)
    with atomic_write(path, "parameter file") as f:
        hashing = _Hashing(f)
        pickle.dump(params, hashing, protocol=4)
        f.flush()
        os.fsync(f.fileno())  # now, not after the description is in place
        description = {"version": DESCRIPTION_VERSION, **describe_network(config),
                       "dtype": np.dtype(dtype).name, "sha256": hashing.sha256.hexdigest()}
        if training is not None:
            description["training"] = {key: training[key] for key in TRAINING_FIELDS}
        with atomic_write(meta_path(path), "parameter file's description") as g:
            g.write(json.dumps(description, indent=1).encode())


# --- reading the description: untrusted, like the pickle --------------------------------

# A description is a few kilobytes; one of a network with 256 classes of long names, 200.
DESCRIPTION_LIMIT = 1 << 20
# The format nests three deep (the layers); json.loads recurses once per bracket.
DESCRIPTION_NESTING = 8
DESCRIPTION_VERSION = 1
_DESCRIPTION = "a parameter file's description"
_FIELDS = ("version", "name", "input_shape", "layers", "classes", "dtype", "sha256")
# What an earlier lowmem-cnn wrote beside a network trained on a folder: its config by name.
_EARLIER_FIELDS = ("classes", "input_shape", "config")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def meta_path(path) -> Path:
    """Where the description of a parameter file is: PATH.json. The pickle itself stays
    the book's format, which the book's load_params reads."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_description(path) -> dict | None:
    """The description beside the parameter file `path` (write_params), every field
    checked, or None when there is none (the book's files). Read as untrusted input: at
    most DESCRIPTION_LIMIT bytes of a regular file, nesting bounded before parsing, no
    path in it ever opened. Anything else is a LowmemError that names the file."""
    found = _description(path)
    return None if found is None else found[0]


def _description(path) -> tuple[dict, object] | None:
    """(the checked description, the NetworkConfig it says, or None for an earlier
    lowmem-cnn's, which names a config), or None."""
    from lowmem_cnn.config import network_from_description, shipped_configs
    from lowmem_cnn.model import Network

    where = meta_path(path)
    data = read_small_regular_file(where, DESCRIPTION_LIMIT, _DESCRIPTION)
    if data is None:
        return None
    description = parse_json(where, data, _DESCRIPTION, DESCRIPTION_NESTING)
    what = f"{where}: not a usable description of {Path(path).name}"
    if not isinstance(description, dict):
        raise LowmemError(f"{what}: not a JSON object")
    if "version" not in description and set(description) == set(_EARLIER_FIELDS):
        config = description["config"]
        if config is not None and config not in shipped_configs():  # never opened: a path
            raise LowmemError(f"{what}: it names the config {shown(config)}, which is not one "
                              "that comes with lowmem-cnn and is not read; give --config")
        try:  # its classes and input shape are checked as a description's
            network_from_description({"name": "network", "input_shape": description["input_shape"],
                                      "layers": [{"type": "relu"}], "classes": description["classes"]})
        except ValueError as err:
            raise LowmemError(f"{what}: {err}") from None
        if description["classes"] is None:
            raise LowmemError(f"{what}: it names no classes")
        return description, None
    version = description.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > DESCRIPTION_VERSION:
        raise LowmemError(f"{what}: it is of format {version}, from a newer lowmem-cnn")
    try:
        unknown = [shown_name(key) for key in description
                   if key not in _FIELDS and key != "training"]
        if unknown:
            raise ValueError(f"unknown field {', '.join(unknown[:3])} (it has {', '.join(_FIELDS)})")
        missing = [key for key in _FIELDS if key not in description]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if version != DESCRIPTION_VERSION or isinstance(version, bool):
            raise ValueError(f"version {shown(version)} is not {DESCRIPTION_VERSION}")
        if description["dtype"] not in ("float32", "float64"):
            raise ValueError(f"dtype {shown(description['dtype'])} is not float32 or float64")
        sha256 = description["sha256"]
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"sha256 {shown(sha256)} is not 64 hexadecimal digits")
        if "training" in description:
            _check_training(description["training"])
        config = network_from_description(description)
    except ValueError as err:
        raise LowmemError(f"{what}: {err}") from None
    try:  # the layers fit the input shape, and the classes the scores
        network = Network(config)
    except LowmemError as err:
        raise LowmemError(f"{what}: {err}") from None
    if config.class_names is not None and len(config.class_names) != network.classes:
        raise LowmemError(f"{what}: it names {len(config.class_names)} classes for "
                          f"{network.classes} scores")
    return description, config


def _check_training(training):
    """The optional record of how the parameters were trained (TRAINING_FIELDS)."""
    from lowmem_cnn.augment import Augmentation
    from lowmem_cnn.schedule import SCHEDULES

    def number(value, low, high=float("inf")):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and low <= value <= high)

    if not isinstance(training, dict) or set(training) != set(TRAINING_FIELDS):
        raise ValueError(f"training is not an object of {', '.join(TRAINING_FIELDS)}")
    augment = training["augment"]
    if not isinstance(augment, str) or len(augment) > 100:
        raise ValueError(f"training's augment {shown(augment)} is not a short text")
    try:
        Augmentation.parse(augment)
    except LowmemError:
        raise ValueError(f"training's augment {shown(augment)} is not one this lowmem-cnn knows") from None
    if training["lr_schedule"] not in SCHEDULES:
        raise ValueError(f"training's lr_schedule {shown(training['lr_schedule'])} is not one of "
                         f"{', '.join(SCHEDULES)}")
    for key, low, high in (("weight_decay", 0, 1e6), ("warmup", 0, 1e6), ("val_split", 0, 1)):
        if not number(training[key], low, high):
            raise ValueError(f"training's {key} {shown(training[key])} is not a number from "
                             f"{low} to {high:g}")
    epoch = training["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= 10**6):
        raise ValueError(f"training's epoch {shown(epoch)} is not a whole number from 1")


# --- the network of a parameter file ----------------------------------------------------


def network_for(path, config_name=None) -> tuple:
    """The network the parameter file `path` was trained as, and its description (None
    without one): (NetworkConfig, description). The shared start of eval, predict,
    profile-memory and export (through session.network_config).

    With a description, it says the network; `config_name`, if given, must be the same
    network. Without one (the book's files): the config named, else the shipped config
    whose parameter names and shapes are exactly the file's, else a one-line error
    naming the closest."""
    from lowmem_cnn.config import load_config

    found = _description(path)
    if found is None:
        if config_name:
            return load_config(config_name).network, None
        return _shipped_match(Path(path)), None
    description, config = found
    if config is None:  # an earlier lowmem-cnn's description: a shipped config by name
        config = (load_config(config_name) if config_name
                  else load_config(description["config"] or DEFAULT_CONFIG, shipped_only=True))
        config = config.network.for_data(description["input_shape"], description["classes"])
        return config, description
    if config_name:
        given = load_config(config_name).network
        if config.class_names is not None:
            given = given.for_data(config.input_shape, config.class_names)
        if (tuple(given.input_shape), canonical_layers(given.layers)) != \
                (tuple(config.input_shape), canonical_layers(config.layers)):
            raise LowmemError(f"{path}: it was trained as another network than --config "
                              f"{config_name} ({meta_path(path).name} describes it); leave "
                              "out --config")
    _check_fits_file(Path(path), config)
    return config, description


def _check_fits_file(path: Path, config):
    """A description whose network has more values than the parameter file has bytes for
    is refused before the network's memory is planned (a float is 2 bytes at least)."""
    from lowmem_cnn.model import Network

    try:
        size = path.stat().st_size
    except OSError:
        return  # reading the parameter file will say
    values = Network(config).param_bytes() // np.dtype(np.float32).itemsize
    if 2 * values > size:
        raise LowmemError(f"{meta_path(path)}: describes a network of {values:,} parameters, "
                          f"more than {path.name}'s {size:,} bytes hold")


def _shipped_match(path: Path):
    """The shipped config whose parameter names and shapes are exactly the file's."""
    from lowmem_cnn.config import load_config, shipped_configs
    from lowmem_cnn.model import Network

    shipped = {}
    for name in shipped_configs():
        network = Network(load_config(name, shipped_only=True).network)
        shipped[name] = (network.config, network.expected_book_shapes(), param_file_limit(network))
    how = (f"nothing beside it says how it was built (no {meta_path(path).name}); give the "
           "config it was trained with: --config NAME or --config FILE.toml")
    limit = max(limit for _, _, limit in shipped.values())
    try:
        if path.stat().st_size > limit:
            raise LowmemError(f"{path}: larger than the parameters of every shipped config; {how}")
    except OSError:
        pass  # reading it will say
    params = read_params(path, limit)
    _check_arrays(path, params)
    matches = [name for name, (_, shapes, _) in shipped.items()
               if _key_problem(params, shapes) is None]
    if len(matches) == 1:
        return shipped[matches[0]][0]
    if matches:
        raise LowmemError(f"{path}: the shipped configs {', '.join(matches)} all have its "
                          f"parameters; {how}")
    # closest: the most parameters of the same name and shape
    common = {name: sum(key in params and params[key].shape == tuple(shape)
                        for key, shape in shapes.items())
              for name, (_, shapes, _) in shipped.items()}
    best = max(common.values())
    closest = [name for name, n in common.items() if n == best]
    difference = _key_problem(params, shipped[closest[0]][1], listing=False)
    also = f"; as close: {', '.join(closest[1:])}" if len(closest) > 1 else ""
    raise LowmemError(f"{path}: no shipped config has its parameters (closest: {closest[0]}, "
                      f"against which {difference}{also}); {how}")
