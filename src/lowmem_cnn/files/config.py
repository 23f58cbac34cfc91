"""Network and training settings from a TOML file in configs/ (or any path)."""

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, make_dataclass
from importlib import resources
from pathlib import Path

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.reading import read_small_regular_file, shown, shown_name
from lowmem_cnn.engine.layer_types import LAYER_TYPES
from lowmem_cnn.engine.layers import REQUIRED, SAME_AS_SIZE
from lowmem_cnn.engine.network_config import NetworkConfig
from lowmem_cnn.training.run_options import CONFIG_OPTIONS

DEFAULT_CONFIG = "simple_convnet"


# A config's [training]: the run options declared `in_config` (run_options), with their
# defaults (a recipe such as configs/photos.toml sets its own).
TrainingConfig = make_dataclass(
    "TrainingConfig", [(option.name, option.kind, field(default=option.default))
                       for option in CONFIG_OPTIONS], frozen=True)
TRAINING_KEYS = tuple(option.name for option in CONFIG_OPTIONS)


@dataclass(frozen=True)
class Config:
    source: str
    network: NetworkConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)


# 64 KiB: the shipped configs are 0.8 to 2 KiB; MAX_LAYERS conv layers written out in
# full take 19 KiB. tomllib's peak on 64 KiB: 6.7 MiB for 10,000 empty tables, 1.4 MiB
# for an array of 21,000 inline tables (tracemalloc).
CONFIG_BYTES = 64 * 1024
# 8: a config nests 4 deep at most ([[network.layers]] with a dotted key); tomllib
# recurses once a level of brackets (some hundred end in RecursionError), and keeps a
# tuple of every prefix of a dotted key (a.a.a... = 1 of 3,000 parts took 39 MB).
CONFIG_NESTING = 8
_TOML_TOKEN = re.compile(r'"""|\'\'\'|["\'#\[\]{}.=,\n]')
_TOML_END = {'"': re.compile(r'\\.|["\n]'), "'": re.compile(r"['\n]"), "#": re.compile(r"\n"),
             '"""': re.compile(r'\\.|"{3,5}', re.S), "'''": re.compile(r"'{3,5}")}


def toml_nesting(text: str, most: int) -> int:
    """How deep a TOML text nests (strings and comments aside): its inline arrays and
    tables, and the parts of its dotted keys, counted up to `most` + 1. A table header
    ([a] or [[a]]) counts too, and a float's dot: they only make the count larger."""
    depth = deepest = dots = at = 0
    while (token := _TOML_TOKEN.search(text, at)) is not None:
        kind, at = token.group(), token.end()
        if kind == ".":
            dots += 1
        elif kind in "[{":
            depth, dots = depth + 1, 0
        elif kind in "]}":
            depth, dots = depth - 1, 0
        elif kind in "=,\n":
            dots = 0
        else:  # a string or a comment: skip to its end (an escape is two characters)
            while (end := _TOML_END[kind].search(text, at)) is not None:
                at = end.end()
                if not end.group().startswith("\\"):
                    break
            else:
                break  # not closed: tomllib says so
            if kind == "#":
                dots = 0
        deepest = max(deepest, depth + dots)
        if deepest > most:
            break
    return deepest


def _deepest(value, most: int) -> int:
    """How deep tables and arrays nest in parsed TOML, counted up to `most` + 1, without
    recursing: a table header's parts and a dotted key's add up, which toml_nesting
    counts apart."""
    deepest, stack = 0, [(value, 0)]
    while stack and deepest <= most:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_config(where, data: bytes) -> dict:
    """The TOML of a config file's bytes: UTF-8 text, nested no deeper than a config
    needs; a one-line LowmemError naming `where` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LowmemError(f"{where}: not a config: not UTF-8 text (byte {err.start})") from None
    if toml_nesting(text, CONFIG_NESTING) > CONFIG_NESTING:
        raise LowmemError(f"{where}: not a config: it nests deeper than {CONFIG_NESTING} levels")
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LowmemError(f"{where}: not valid TOML ({err})") from None  # one line
    except RecursionError:  # what toml_nesting let through (it should let nothing)
        raise LowmemError(f"{where}: not a config: it nests too deep") from None
    if _deepest(parsed, CONFIG_NESTING) > CONFIG_NESTING:
        raise LowmemError(f"{where}: not a config: its keys nest deeper than {CONFIG_NESTING} levels")
    return parsed


def _read(name_or_path: str, shipped_only: bool = False) -> tuple[str, dict]:
    path = Path(name_or_path)
    if not shipped_only and (path.suffix == ".toml" or os.path.lexists(path)):
        data = read_small_regular_file(path, CONFIG_BYTES, "a config")
        if data is None:
            raise LowmemError(f"{path}: no such config file")
        return str(path), parse_config(path, data)
    names = shipped_configs()
    if name_or_path not in names:  # a name, never a path out of configs/
        raise LowmemError(f"no config {shown(name_or_path)}: give a .toml path or one of "
                          f"{', '.join(names)}")
    shipped = resources.files("lowmem_cnn") / "configs" / f"{name_or_path}.toml"
    return name_or_path, parse_config(name_or_path, shipped.read_bytes())


def load_config(name_or_path: str = DEFAULT_CONFIG, shipped_only: bool = False) -> Config:
    """`shipped_only`: a name in configs/ only, never a path (nor a file of that name here)."""
    source, data = _read(name_or_path, shipped_only)
    try:
        _refuse_unknown("the config", data, ("network", "training"))
        network = _network(data, source)
        train = data.get("training", {})
        if not isinstance(train, dict):
            raise ValueError("training is not a table ([training])")
        _refuse_unknown("[training]", train, TRAINING_KEYS)
        training = TrainingConfig(**train)
        for option in CONFIG_OPTIONS:  # the bounds train's flags have, and every reader
            try:
                option.check(getattr(training, option.name))
            except ValueError as err:
                raise ValueError(f"[training] {err}") from None
    except KeyError as err:
        raise LowmemError(f"{source}: missing {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise LowmemError(f"{source}: {err}") from None
    return Config(source, network, training)


NETWORK_KEYS = ("name", "input_shape", "weight_init", "layers")


def _refuse_unknown(where: str, table: dict, known, besides=()):
    """ValueError for the first key of `table` not in `known` nor `besides` (keys taken
    that are not named among what it takes: a layer's type), naming the nearest one (a
    typo such as strid is refused, not trained as a layer of stride 1)."""
    for key in table:
        if key not in known and key not in besides:
            near = _nearest(key, (*besides, *known))
            hint = f": did you mean {near[0]}?" if near else ""
            raise ValueError(f"{where} has no {shown_name(key)}{hint} (it takes "
                             f"{', '.join(known) or 'no setting'})")


def _network(data: dict, source: str) -> NetworkConfig:
    """The config's [network], every key and value checked as in a description
    (network_from_description); whether the layers fit is for model.Network to say."""
    net = data.get("network")
    if not isinstance(net, dict):
        raise ValueError("missing [network]" if net is None else "network is not a table ([network])")
    _refuse_unknown("[network]", net, NETWORK_KEYS)
    name = net.get("name", source)  # without one, the config's path or name
    if "name" in net and (not isinstance(name, str) or not name or not name.isprintable()):
        raise ValueError(f"name = {shown(name)} is not a printable text")
    shape = checked_input_shape(net.get("input_shape"))
    layers = net.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"[network] layers is not a list of 1 to {MAX_LAYERS} layers "
                         "([[network.layers]] tables)")
    for number, layer in enumerate(layers, start=1):
        if not isinstance(layer, dict):
            raise ValueError(f"layer {number} is not a table ([[network.layers]])")
        kind = layer.get("type")
        if not isinstance(kind, str) or kind not in LAYER_SETTINGS:
            near = _nearest(kind, LAYER_SETTINGS) if isinstance(kind, str) else []
            raise ValueError(f"layer {number} ({shown_name(kind)}): unknown layer type"
                             f"{f': did you mean {near[0]}?' if near else ''} "
                             f"({', '.join(LAYER_SETTINGS)})")
        _refuse_unknown(f"layer {number} ({kind})", layer, LAYER_SETTINGS[kind], besides=("type",))
        _check_layer_values(number, kind, layer)
    init = net.get("weight_init", 0.01)
    if init != "he" and not (isinstance(init, (int, float)) and not isinstance(init, bool)
                             and 0 < init < math.inf):
        raise ValueError(f"weight_init = {shown(init)}: use \"he\" or a positive standard deviation")
    return NetworkConfig(name=name, input_shape=tuple(shape), layers=tuple(dict(layer) for layer in layers),
                         weight_init=init)


# --- a network described as data: beside a parameter file (description.py), in a checkpoint

# The settings of each layer type, with their defaults, as the layer classes declare them.
LAYER_SETTINGS = {name: cls.settings for name, cls in LAYER_TYPES.items()}
# Bounds on a description, which may come from a downloaded file: far beyond any network
# this tool can train, and small enough that nothing made from them is absurd.
MAX_LAYERS = 256
MAX_WHOLE = 1 << 16  # any size: filters, units, strides, pads, the input's sides
MAX_CHANNELS = 64
MAX_CLASSES = 256  # as folders.MAX_CLASSES: labels are one byte
MAX_CLASS_NAME = 255  # a folder name's length on the usual filesystems
MAX_NAME = 100


def _nearest(word: str, known) -> list:
    """The known word a typo most likely meant (`strid`: stride), if any."""
    import difflib  # only when a key is unknown

    return difflib.get_close_matches(word, known, n=1)


def _check_setting(number, kind, key, value, most=None):
    """One setting of a layer, as the layer declares it (layers.Setting)."""
    problem = LAYER_SETTINGS[kind][key].problem(value, most)
    if problem:
        raise ValueError(f"layer {number} ({shown_name(kind)}): {shown_name(key)} = {shown(value)} {problem}")


def checked_input_shape(shape) -> list:
    """A network's input shape (a config's, a description's, a checkpoint's):
    [channels, height, width], bounded."""
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or not 1 <= shape[0] <= MAX_CHANNELS or not all(1 <= v <= MAX_WHOLE for v in shape[1:])):
        raise ValueError(f"input_shape = {shown(shape)} is not [channels, height, width] (at most "
                         f"{MAX_CHANNELS} channels, sides of 1 to {MAX_WHOLE:,})")
    return shape


def checked_classes(classes) -> list:
    """A network's class names (a description's, a checkpoint's): 2 to MAX_CLASSES
    printable names, none twice."""
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"classes is not null or a list of 2 to {MAX_CLASSES} names")
    for label in classes:
        if (not isinstance(label, str) or not 1 <= len(label) <= MAX_CLASS_NAME
                or not label.isprintable()):
            raise ValueError(f"class {shown(label)} is not a printable name of 1 to "
                             f"{MAX_CLASS_NAME} characters")
    if len(set(classes)) != len(classes):
        raise ValueError("classes names a class twice")
    return classes


def _check_layer_values(number, kind, layer: dict):
    """The values of a layer of a known type whose keys are its own: each setting
    bounded (_check_setting), none that it needs missing."""
    for key, value in layer.items():
        if key != "type":
            _check_setting(number, kind, key, value, MAX_WHOLE)
    missing = [key for key, setting in LAYER_SETTINGS[kind].items()
               if setting.default is REQUIRED and key not in layer]
    if missing:
        raise ValueError(f"layer {number} ({kind}): missing {', '.join(missing)}")


def canonical_layers(layers) -> list:
    """Each layer with all its settings, defaults filled in, in one order: two configs of
    the same network say the same. A layer of unknown type stays as it is (building the
    network says what is wrong with it)."""
    result = []
    for layer in layers:
        settings = LAYER_SETTINGS.get(layer.get("type"))
        if settings is None:
            result.append(dict(layer))
            continue
        full = {"type": layer["type"]}
        for key, setting in settings.items():
            value = layer.get(key, layer.get("size") if setting.default is SAME_AS_SIZE else setting.default)
            if value is not REQUIRED and value is not None:
                full[key] = float(value) if setting.fraction else value
        result.append(full)
    return result


def describe_network(config: NetworkConfig) -> dict:
    """The network as data (see network_from_description): its name, input shape (C, H,
    W), layers and class names (None: the digits of MNIST-style data). Not the config's
    name or path: the description stands alone."""
    name = str(config.name)
    if "/" in name or "\\" in name or name.endswith(".toml"):  # a config without a name
        name = Path(name).stem or "network"
    name = "".join(c if c.isprintable() else "?" for c in name)[:MAX_NAME]
    return {"name": name, "input_shape": [int(v) for v in config.input_shape],
            "layers": canonical_layers(config.layers),
            "classes": None if config.class_names is None else list(config.class_names)}


def network_from_description(data) -> NetworkConfig:
    """The network a description says (describe_network), every field checked, as data
    from a file anyone may have written: ValueError says what is wrong. Whether the layers
    fit the input and the classes the scores is for model.Network to say."""
    if not isinstance(data, dict):
        raise ValueError("not a description of a network")
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise ValueError(f"name {shown(name)} is not a printable text of 1 to {MAX_NAME} characters")
    shape = checked_input_shape(data.get("input_shape"))
    layers = data.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"layers is not a list of 1 to {MAX_LAYERS} layers")
    for number, layer in enumerate(layers, start=1):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if not isinstance(kind, str) or kind not in LAYER_SETTINGS:
            raise ValueError(f"layer {number}: not a layer of type {', '.join(LAYER_SETTINGS)}")
        settings = LAYER_SETTINGS[kind]
        unknown = [key for key in layer if key != "type" and key not in settings]
        if unknown:
            raise ValueError(f"layer {number} ({kind}): no setting {shown_name(unknown[0])} (it takes "
                             f"{', '.join(settings) or 'none'})")
        _check_layer_values(number, kind, layer)
    classes = data.get("classes")
    if classes is not None:
        checked_classes(classes)
    # the weights' initialisation is not described: they come from the parameter file
    return NetworkConfig(name, tuple(shape), tuple(dict(layer) for layer in layers), "he",
                         None if classes is None else tuple(classes))


def shipped_configs() -> list:
    """The names of the configs that come with lowmem-cnn (configs/*.toml)."""
    shipped_dir = resources.files("lowmem_cnn") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in shipped_dir.iterdir()
                  if p.name.endswith(".toml"))
