"""A parameter file's description: PATH.json beside the pickle, which says the network
its parameters are for (its input shape, layers and classes), their dtype, the pickle's
SHA-256 and how they were trained. It travels with the pickle, so it is read as
untrusted input too (read_description).
"""

import json
import re
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import parse_json, read_small_regular_file, shown, shown_name
from lowmem_cnn.files.config import describe_network, network_from_description, shipped_configs
from lowmem_cnn.training.run_options import DESCRIBED_OPTIONS

# How a network was trained, recorded in its description for the reader (never used to
# build or run it): the options run_options declares `described` (augmentation, weight
# decay, schedule, validation share), and the epoch whose parameters these are.
TRAINING_FIELDS = (*(option.name for option in DESCRIBED_OPTIONS), "epoch")
# ... and of a network trained on a folder whose test pictures were drawn (folders.py):
# the share and the seed that chose them, so that eval tests on the same ones.
SPLIT_FIELDS = ("test_split", "split_seed")

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


def description_bytes(config, dtype, sha256: str, training: dict | None = None) -> bytes:
    """The description of the pickle whose SHA-256 is `sha256`: the network `config`
    describes, its dtype, and `training` (TRAINING_FIELDS, with SPLIT_FIELDS if it has
    them), as JSON."""
    description = {"version": DESCRIPTION_VERSION, **describe_network(config),
                   "dtype": np.dtype(dtype).name, "sha256": sha256}
    if training is not None:
        description["training"] = {key: training[key] for key in TRAINING_FIELDS}
        if "test_split" in training:
            description["training"].update({key: training[key] for key in SPLIT_FIELDS})
    return json.dumps(description, indent=1).encode()


def read_description(path) -> dict | None:
    """The description beside the parameter file `path` (params.write_params), every field
    checked, or None when there is none (the book's files). Read as untrusted input: at
    most DESCRIPTION_LIMIT bytes of a regular file, nesting bounded before parsing, no
    path in it ever opened. Anything else is a LowmemError that names the file."""
    found = description_and_config(path)
    return None if found is None else found[0]


def description_and_config(path) -> tuple[dict, object] | None:
    """(the checked description, the NetworkConfig it says, or None for an earlier
    lowmem-cnn's, which names a config), or None."""
    from lowmem_cnn.engine.model import Network

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
    """The optional record of how the parameters were trained (TRAINING_FIELDS, and
    SPLIT_FIELDS for a network trained on a folder whose split was drawn), each value
    checked by its option's declaration (run_options): what train accepts, this reads."""
    from lowmem_cnn.training.run_options import MAX_EPOCHS, OPTIONS, SPLIT_SEED, TEST_SPLIT

    if (not isinstance(training, dict) or not set(TRAINING_FIELDS) <= set(training)
            or set(training) - set(TRAINING_FIELDS) not in (set(), set(SPLIT_FIELDS))):
        raise ValueError(f"training is not an object of {', '.join(TRAINING_FIELDS)} (and "
                         f"optionally {', '.join(SPLIT_FIELDS)})")
    try:
        for key in TRAINING_FIELDS[:-1]:
            OPTIONS[key].check(training[key])
        if "test_split" in training:
            TEST_SPLIT.check(training["test_split"])
            SPLIT_SEED.check(training["split_seed"])
    except ValueError as err:
        raise ValueError(f"training's {err}") from None
    epoch = training["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= MAX_EPOCHS):
        raise ValueError(f"training's epoch {shown(epoch)} is not a whole number from 1 to "
                         f"{MAX_EPOCHS:,}")

