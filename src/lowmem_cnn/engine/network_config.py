"""What a network is, as a config or a parameter file's description says it: the engine
builds a Network from this value (files/config.py reads and checks it)."""

from dataclasses import dataclass, replace

from lowmem_cnn.common.errors import LowmemError


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

    def named_classes(self, count: int) -> list:
        """The names of the network's `count` classes: the data's (a folder's), else their
        numbers, as MNIST's digits are named."""
        return list(self.class_names) if self.class_names else [str(k) for k in range(count)]
