"""Which network a parameter file holds: the one its description says, else the shipped
config whose parameters are exactly the file's (the book's files have no description)."""

from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.files.config import DEFAULT_CONFIG, canonical_layers, load_config, shipped_configs
from lowmem_cnn.files.description import description_and_config, meta_path
from lowmem_cnn.files.params import check_arrays, key_problem, param_file_limit
from lowmem_cnn.files.pickles import read_params


def network_for(path, config_name=None) -> tuple:
    """The network the parameter file `path` was trained as, and its description (None
    without one): (NetworkConfig, description). The shared start of eval, predict,
    profile-memory and export (through session.network_config).

    With a description, it says the network; `config_name`, if given, must be the same
    network. Without one (the book's files): the config named, else the shipped config
    whose parameter names and shapes are exactly the file's, else a one-line error
    naming the closest."""
    found = description_and_config(path)
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
    from lowmem_cnn.engine.model import Network

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
    from lowmem_cnn.engine.model import Network

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
    check_arrays(path, params)
    matches = [name for name, (_, shapes, _) in shipped.items()
               if key_problem(params, shapes) is None]
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
    difference = key_problem(params, shipped[closest[0]][1], listing=False)
    also = f"; as close: {', '.join(closest[1:])}" if len(closest) > 1 else ""
    raise LowmemError(f"{path}: no shipped config has its parameters (closest: {closest[0]}, "
                      f"against which {difference}{also}); {how}")
