"""A trained network as an ONNX model, for onnxruntime and the tools that read ONNX.

The graph is the network of `Network.layers`, in the engine's order (a ReLU moved
behind the max-pooling after it, a convolution and its pooling fused: both give the
same values as the config's order), NCHW as ONNX's operators are. Each layer writes
its own nodes (`Layer.onnx`: a convolution's W in the book's (F, C, FH, FW), which is
ONNX's OIHW; an affine layer's rows in the book's order, after a Flatten; dropout a Mul
by 1 - ratio, as the book's dropout at inference); a layer ONNX cannot express says
so. `--softmax` adds a Softmax at the end (probabilities, not scores).

The opset: each node written declares the oldest opset at which its operator
computes what the engine does (float32, with the attributes written here), and the
model is stamped with the highest of those, so that old runtimes load it too (a
runtime refuses a model whose IR version is newer than it knows: onnxruntime 1.16
knows up to 9; docs/onnx.md).
Its IR version is the lowest that opset allows. `opset=N` stamps N instead, between
that oldest and the installed onnx's newest: no operator written here changes its
float32 meaning in that range. The file's bytes depend on the network, the opset and
this tool's version, not on the installed onnx.

The input is float32 [N, C, H, W], N free: pixels / 255, as this tool feeds them. The
parameters are float32 (whatever the engine's dtype) and keep the parameter file's
names (W1, b1, gamma2, running_mean2, ...). The model's metadata says what a client
needs: the input, the class names, the preprocessing in words (none of it is in the
graph), the output, the opset and the version of this tool.

The `onnx` package (the onnx extra) is imported here only, when a model is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn import __version__
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.layer_types import LAYER_TYPES
from lowmem_cnn.engine.layers import Layer, NotExportable

# The graph's own declaration, as each node makes one: its weights are initializers
# that are not also graph inputs, which IR version 4 allows first, and IR 4's opset
# is 9. (onnx2torch 1.5.15 reads our operators from opset 9 on, not before: it has no
# converter for Flatten-1, MaxPool-1 or Gemm-7.)
GRAPH_OPSET = 9
INPUT = "input"
SCORES, PROBABILITIES = "scores", "probabilities"
# the layer types that say their ONNX nodes (Layer.onnx)
EXPORTED_KINDS = ", ".join(kind for kind, cls in LAYER_TYPES.items() if cls.onnx is not Layer.onnx)
INSTALL_HINT = "pip install 'lowmem-cnn[onnx]'"


def onnx_module():
    """The onnx package, or a one-line error that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise LowmemError(f"exporting to ONNX needs the onnx package: {INSTALL_HINT}") from None
    return onnx


@dataclass(frozen=True)
class Exported:
    path: Path
    opset: int
    ir_version: int
    bytes: int
    input_shape: tuple  # (C, H, W)
    output: str  # SCORES or PROBABILITIES
    classes: list


def export_params(params, out, config_name=None, softmax: bool = False, opset: int | None = None
                  ) -> Exported:
    """Write the network of the parameter file `params` (its config and classes as
    session.network_config finds them, or `config_name`) to `out` as an ONNX model,
    stamped with `opset` (None: the network's oldest)."""
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.files.params import load_params
    from lowmem_cnn.session import network_config

    onnx = onnx_module()  # missing: said before anything is read
    newest_known(onnx, opset)  # too new: said before anything is read
    config, _ = network_config(config_name, params)
    network = Network(config, np.float32)
    load_params(params, network)
    return save_onnx(network, out, softmax, opset)


def save_onnx(network, out, softmax: bool = False, opset: int | None = None) -> Exported:
    """Write `network` (its parameters as they are now) to `out` as an ONNX model,
    stamped with `opset` (None: the network's oldest), checked by onnx.checker first;
    atomically: an existing file is replaced whole or not at all."""
    from lowmem_cnn.common.writing import atomic_write

    onnx = onnx_module()
    model = build_model(network, softmax, opset)
    stamp = model.opset_import[0].version, model.ir_version
    data = model.SerializeToString()
    del model  # the checker reads the bytes: one copy of the weights fewer at its peak
    onnx.checker.check_model(data, full_check=True)
    out = Path(out)
    with atomic_write(out, "ONNX model") as f:
        f.write(data)
    c, h, w = network.config.input_shape
    return Exported(out, *stamp, len(data), (c, h, w), PROBABILITIES if softmax else SCORES,
                    network.config.named_classes(network.classes))


def newest_known(onnx, opset: int | None) -> int:
    """The installed onnx's newest opset; `opset` beyond it is refused."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise LowmemError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up "
                          f"to {newest}; choose one up to {newest}, or upgrade onnx")
    return newest


def input_description(config) -> str:
    c, h, w = config.input_shape
    channels = "R, G, B" if c == 3 else "gray" if c == 1 else f"{c} channels"
    return (f"'{INPUT}': float32 [N, {c}, {h}, {w}] (NCHW: images, channels ({channels}), rows, "
            f"columns), pixels / 255 in [0, 1]")


def preprocessing(config) -> str:
    """How a picture becomes the input, in words: none of it is in the graph."""
    c, h, w = config.input_shape
    if config.class_names:  # trained on a folder of pictures (imaging.image_row)
        return (f"not in the graph, do it before: {'RGB' if c == 3 else 'grayscale'}; scaled to "
                f"cover {h}x{w} and centre-cropped, EXIF "
                f"orientation applied, alpha dropped; then pixels / 255 (as predict does: "
                f"lowmem_cnn.data.imaging.image_row(path, ({h}, {w}), {c}) gives the pixels)")
    if (c, h, w) == (1, 28, 28):  # MNIST's digits (imaging.mnist_style, as predict does)
        return ("not in the graph, do it before: made to look like MNIST's digits: grayscale, "
                "white on black (inverted if dark on light), scaled to fit 20x20 and centred by "
                "its centre of mass in 28x28; then pixels / 255 (as predict does: "
                "lowmem_cnn.data.imaging.mnist_style(path) gives the pixels). MNIST's own images "
                "are already so")
    return "not in the graph, do it before: pixels / 255"


def build_model(network, softmax: bool = False, opset: int | None = None):
    """The ONNX ModelProto of `network`, stamped with `opset` (None: the oldest that
    its nodes declare)."""
    onnx = onnx_module()
    from onnx import TensorProto, helper, numpy_helper

    built = Graph(network, helper, numpy_helper)
    x = INPUT
    for layer in network.layers:
        try:
            x = layer.onnx(built, x)
        except NotExportable as err:
            raise LowmemError(f"{network.config.name}: {err} (exported: {EXPORTED_KINDS})") from None
    nodes, weights, node = built.nodes, built.weights, built.node
    output = PROBABILITIES if softmax else SCORES
    if softmax:
        # Softmax-1: on [N, classes] with axis 1, the same as Softmax-13's along axis 1
        node("Softmax", 1, [x], axis=1)
    nodes[-1].output[0] = output  # the last node's output is the graph's
    oldest, newest = max(built.declared), newest_known(onnx, opset)
    if opset is not None and opset < oldest:
        raise LowmemError(f"--opset {opset}: {network.config.name} can be written at opsets "
                          f"{oldest} to {newest} (its oldest is {oldest}, the installed onnx's "
                          f"newest {newest})")
    chosen = oldest if opset is None else opset
    c, h, w = network.config.input_shape
    graph = helper.make_graph(
        nodes, network.config.name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", network.classes])],
        weights,
        doc_string=f"{network.config.name}: input pixels / 255 (NCHW), output "
                   f"{'the probabilities' if softmax else 'the scores'} of {network.classes} classes")
    opsets = [helper.make_opsetid("", chosen)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lowmem-cnn",
                              producer_version=__version__)
    # the oldest readers that can: the same for one opset in every onnx release
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, {
        "input": input_description(network.config),
        "input_shape": json.dumps([c, h, w]),  # channels, height, width
        "preprocessing": preprocessing(network.config),
        "classes": json.dumps(network.config.named_classes(network.classes)),
        "output": (f"'{output}': float32 [N, {network.classes}], "
                   + ("the probabilities" if softmax else "the scores (softmax gives the "
                      "probabilities)") + "; the class is the largest"),
        "opset": str(chosen),
        "config": network.config.name,
        "lowmem_cnn_version": __version__,
    })
    return model


class Graph:
    """What a layer adds its ONNX nodes to (Layer.onnx): nodes, with the oldest opset at
    which each computes what the engine does, and the parameters as initializers."""

    def __init__(self, network, helper, numpy_helper):
        self._helper, self._numpy_helper = helper, numpy_helper
        self._keys = {(id(layer), name): key
                      for key, layer, name in (*network.param_names(), *network.state_names())}
        self.nodes, self.weights = [], []
        self.declared = [GRAPH_OPSET]  # each node adds the oldest opset at which it means ours
        self._counter = iter(range(1, 1 << 30))

    def node(self, op: str, since: int, inputs: list, **attributes) -> str:
        """Add an `op` node that means ours from opset `since`; its output's name."""
        self.declared.append(since)
        output = f"{op.lower()}{next(self._counter)}"
        self.nodes.append(self._helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def param(self, layer, name: str) -> str:
        """`layer`'s parameter or state `name`, in the book's layout, as float32 under the
        parameter file's key."""
        key = self._keys[id(layer), name]
        book = layer.to_book(name, getattr(layer, name))
        self.weights.append(self._numpy_helper.from_array(np.ascontiguousarray(book, np.float32), key))
        return key

    def constant(self, prefix: str, value: float) -> str:
        """A float32 scalar."""
        name = f"{prefix}{next(self._counter)}"
        self.weights.append(self._numpy_helper.from_array(np.array(value, np.float32), name))
        return name
