"""Network and training settings from a TOML file in configs/ (or any path)."""

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from lowmem_cnn.augment import Augmentation
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.layers import FRACTIONS, LAYER_TYPES, REQUIRED, SAME_AS_SIZE
from lowmem_cnn.optimizers import OPTIMIZERS
from lowmem_cnn.schedule import SCHEDULES

DEFAULT_CONFIG = "simple_convnet"


@dataclass(frozen=True)
class NetworkConfig:
    name: str
    input_shape: tuple  # (C, H, W), as the book writes it
    layers: tuple
    weight_init: str | float  # "he" (std sqrt(2 / inputs of the layer)) or a fixed std
    class_names: tuple | None = None  # set for data with named classes (image folders)

    def for_data(self, input_shape, class_names) -> "NetworkConfig":
        """This network for other data: its input shape (C, H, W), and as many scores as
        the data has classes (the last affine layer's units)."""
        layers = [dict(layer) for layer in self.layers]
        last = max((i for i, layer in enumerate(layers) if layer.get("type") == "affine"),
                   default=None)
        if last is None:
            raise LowmemError(f"{self.name}: has no affine layer to give the classes' scores")
        layers[last]["units"] = len(class_names)
        return replace(self, input_shape=tuple(input_shape), layers=tuple(layers),
                       class_names=tuple(class_names))


@dataclass(frozen=True)
class TrainingConfig:
    optimizer: str = "adam"
    lr: float = 0.001
    batch_size: int = 100
    epochs: int = 20
    # a recipe's defaults (configs/photos.toml); none for the book's networks
    augment: str = "none"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup: float = 0.0


TRAINING_KEYS = ("optimizer", "lr", "batch_size", "epochs", "augment", "weight_decay",
                 "lr_schedule", "warmup")


@dataclass(frozen=True)
class Config:
    source: str
    network: NetworkConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)


def _read(name_or_path: str, shipped_only: bool = False) -> tuple[str, dict]:
    path = Path(name_or_path)
    if not shipped_only and (path.suffix == ".toml" or path.exists()):
        try:
            return str(path), tomllib.loads(path.read_text())
        except OSError as err:
            raise LowmemError(f"{path}: cannot read config ({err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise LowmemError(f"{path}: not valid TOML ({err})") from None
    shipped_dir = resources.files("lowmem_cnn") / "configs"
    shipped = shipped_dir / f"{name_or_path}.toml"
    if not shipped.is_file():
        names = sorted(p.name.removesuffix(".toml") for p in shipped_dir.iterdir()
                       if p.name.endswith(".toml"))
        raise LowmemError(f"no config {name_or_path!r}: give a .toml path or one of {', '.join(names)}")
    return name_or_path, tomllib.loads(shipped.read_text())


def load_config(name_or_path: str = DEFAULT_CONFIG, shipped_only: bool = False) -> Config:
    """`shipped_only`: a name in configs/ only, never a path (nor a file of that name here)."""
    source, data = _read(name_or_path, shipped_only)
    try:
        net = data["network"]
        input_shape = tuple(int(v) for v in net["input_shape"])
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError("input_shape must be [channels, height, width]")
        layers = tuple(dict(layer) for layer in net["layers"])
        for number, layer in enumerate(layers, start=1):
            for key, value in layer.items():
                if key != "type":
                    _check_setting(number, layer.get("type"), key, value)
        init = net.get("weight_init", 0.01)
        if init != "he" and not (isinstance(init, (int, float)) and init > 0):
            raise ValueError(f"weight_init = {init!r}: use \"he\" or a positive standard deviation")
        network = NetworkConfig(
            name=str(net.get("name", source)), input_shape=input_shape, layers=layers,
            weight_init=init,
        )
        train = data.get("training", {})
        training = TrainingConfig(**{k: train[k] for k in TRAINING_KEYS if k in train})
        unknown = sorted(set(train) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"[training] has no {', '.join(unknown)} (it takes {', '.join(TRAINING_KEYS)})")
        if training.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {training.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if training.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule {training.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        Augmentation.parse(training.augment)
    except KeyError as err:
        raise LowmemError(f"{source}: missing {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise LowmemError(f"{source}: {err}") from None
    return Config(source, network, training)


# --- a network described as data: beside a parameter file (params.py), in a checkpoint ----

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


def shown(value, most: int = 40) -> str:
    """A value from an untrusted file as a message may print it: escaped, and short."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def shown_name(value) -> str:
    """A name (a layer type, a setting) as a message says it: as it is if it prints."""
    return value if isinstance(value, str) and value.isprintable() and len(value) <= 40 else shown(value)


def _check_setting(number, kind, key, value, most=None):
    """One setting of a layer: a fraction in [0, 1) or a whole number (at most `most`)."""
    where = f"layer {number} ({shown_name(kind)}): {shown_name(key)} = {shown(value)}"
    if key in FRACTIONS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{where} is not a number in [0, 1)")
    elif (not isinstance(value, int) or isinstance(value, bool)
          or value < (0 if key == "pad" else 1) or (most is not None and value > most)):
        raise ValueError(f"{where} is not a {'non-negative' if key == 'pad' else 'positive'} "
                         "whole number" + (f" up to {most:,}" if most else ""))


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
        for key, default in settings.items():
            value = layer.get(key, layer.get("size") if default is SAME_AS_SIZE else default)
            if value is not REQUIRED and value is not None:
                full[key] = float(value) if key in FRACTIONS else value
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
    shape = data.get("input_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or not 1 <= shape[0] <= MAX_CHANNELS or not all(1 <= v <= MAX_WHOLE for v in shape[1:])):
        raise ValueError(f"input_shape {shown(shape)} is not [channels, height, width] (at most "
                         f"{MAX_CHANNELS} channels, sides of 1 to {MAX_WHOLE:,})")
    layers = data.get("layers")
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"layers is not a list of 1 to {MAX_LAYERS} layers")
    for number, layer in enumerate(layers, start=1):
        kind = layer.get("type") if isinstance(layer, dict) else None
        if not isinstance(kind, str) or kind not in LAYER_SETTINGS:
            raise ValueError(f"layer {number}: not a layer of type {', '.join(LAYER_SETTINGS)}")
        settings = LAYER_SETTINGS[kind]
        for key, value in layer.items():
            if key != "type" and key not in settings:
                raise ValueError(f"layer {number} ({kind}): no setting {shown_name(key)} (it takes "
                                 f"{', '.join(settings) or 'none'})")
            if key != "type":
                _check_setting(number, kind, key, value, MAX_WHOLE)
        missing = [key for key, default in settings.items() if default is REQUIRED and key not in layer]
        if missing:
            raise ValueError(f"layer {number} ({kind}): missing {', '.join(missing)}")
    classes = data.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
            raise ValueError(f"classes is not null or a list of 2 to {MAX_CLASSES} names")
        for label in classes:
            if (not isinstance(label, str) or not 1 <= len(label) <= MAX_CLASS_NAME
                    or not label.isprintable()):
                raise ValueError(f"class {shown(label)} is not a printable name of 1 to "
                                 f"{MAX_CLASS_NAME} characters")
        if len(set(classes)) != len(classes):
            raise ValueError("classes names a class twice")
    # the weights' initialisation is not described: they come from the parameter file
    return NetworkConfig(name, tuple(shape), tuple(dict(layer) for layer in layers), "he",
                         None if classes is None else tuple(classes))


def shipped_configs() -> list:
    """The names of the configs that come with lowmem-cnn (configs/*.toml)."""
    shipped_dir = resources.files("lowmem_cnn") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in shipped_dir.iterdir()
                  if p.name.endswith(".toml"))
