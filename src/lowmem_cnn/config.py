"""Network and training settings from a TOML file in configs/ (or any path)."""

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from lowmem_cnn.errors import LowmemError
from lowmem_cnn.optimizers import OPTIMIZERS

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


@dataclass(frozen=True)
class Config:
    source: str
    network: NetworkConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)


def _read(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
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


def load_config(name_or_path: str = DEFAULT_CONFIG) -> Config:
    source, data = _read(name_or_path)
    try:
        net = data["network"]
        input_shape = tuple(int(v) for v in net["input_shape"])
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError("input_shape must be [channels, height, width]")
        layers = tuple(dict(layer) for layer in net["layers"])
        for number, layer in enumerate(layers, start=1):
            for key, value in layer.items():
                if key in ("ratio", "momentum"):
                    if isinstance(value, bool) or not isinstance(value, (int, float)) \
                            or not 0 <= value < 1:
                        raise ValueError(f"layer {number} ({layer.get('type')}): {key} = {value!r} "
                                         "is not a number in [0, 1)")
                elif key != "type" and (not isinstance(value, int) or isinstance(value, bool)
                                        or value < (0 if key == "pad" else 1)):
                    raise ValueError(f"layer {number} ({layer.get('type')}): {key} = {value!r} is "
                                     f"not a {'non-negative' if key == 'pad' else 'positive'} "
                                     "whole number")
        init = net.get("weight_init", 0.01)
        if init != "he" and not (isinstance(init, (int, float)) and init > 0):
            raise ValueError(f"weight_init = {init!r}: use \"he\" or a positive standard deviation")
        network = NetworkConfig(
            name=str(net.get("name", source)), input_shape=input_shape, layers=layers,
            weight_init=init,
        )
        train = data.get("training", {})
        training = TrainingConfig(**{k: train[k] for k in ("optimizer", "lr", "batch_size", "epochs")
                                     if k in train})
        if training.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {training.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    except KeyError as err:
        raise LowmemError(f"{source}: missing {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise LowmemError(f"{source}: {err}") from None
    return Config(source, network, training)
