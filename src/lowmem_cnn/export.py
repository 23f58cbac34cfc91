"""A trained network as an ONNX model, for onnxruntime and the tools that read ONNX.

The graph is the network of `Network.layers`, in the engine's order (a ReLU moved
behind the max-pooling after it, a convolution and its pooling fused: both give the
same values as the config's order), NCHW as ONNX's operators are:

    conv                     -> Conv (W in the book's (F, C, FH, FW), which is ONNX's OIHW)
    conv fused with its pool -> Conv, then MaxPool
    pool                     -> MaxPool (no padding, the output size rounded down)
    relu                     -> Relu
    affine                   -> Flatten (after a map: C, then H, then W, the book's order),
                                then Gemm (W in the book's row order)
    dropout                  -> Mul by 1 - ratio: the book's dropout scales at inference
                                (layers.Dropout), so the parameter files mean the same
    batchnorm                -> BatchNormalization with the running mean and variance
                                (per channel of a map, per unit of a vector), epsilon 1e-6
    --softmax                -> Softmax at the end (probabilities, not scores)

The input is float32 [N, C, H, W], N free: pixels / 255, as this tool feeds them. The
parameters are float32 (whatever the engine's dtype) and keep the parameter file's
names (W1, b1, gamma2, running_mean2, ...). The model's metadata says the class names,
the input shape, the preprocessing in words, and the version of this tool.

The `onnx` package (the onnx extra) is imported here only, when a model is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowmem_cnn import __version__, book_layout
from lowmem_cnn.conv_pool import ConvolutionPooling
from lowmem_cnn.errors import LowmemError
from lowmem_cnn.layers import Affine, BatchNormalization, Convolution, Dropout, MaxPooling, ReLU

# The highest opset the onnxruntime of the test extra runs: onnxruntime 1.32 loads
# models stamped up to opset 28 and refuses 29 at load ("only *guarantees* support for
# models stamped with official released onnx opset versions"), found by loading a
# Conv+MaxPool model at each opset. A model is stamped with the installed onnx's newest
# opset, capped at this. (The test extra asks for onnxruntime>=1.32, which runs it.)
ORT_MAX_OPSET = 28
INPUT = "input"
SCORES, PROBABILITIES = "scores", "probabilities"
EXPORTED_KINDS = "conv, pool, relu, affine, dropout, batchnorm"
INSTALL_HINT = "pip install 'lowmem-cnn[onnx]'"


def onnx_module():
    """The onnx package, or a one-line error that says how to install it."""
    try:
        import onnx
    except ImportError:
        raise LowmemError(f"exporting to ONNX needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def opset(onnx) -> int:
    """The installed onnx's newest opset, capped at what onnxruntime runs."""
    return min(onnx.defs.onnx_opset_version(), ORT_MAX_OPSET)


@dataclass(frozen=True)
class Exported:
    path: Path
    opset: int
    bytes: int
    input_shape: tuple  # (C, H, W)
    output: str  # SCORES or PROBABILITIES
    classes: list


def export_params(params, out, config_name=None, softmax: bool = False) -> Exported:
    """Write the network of the parameter file `params` (its config and classes as
    session.network_config finds them, or `config_name`) to `out` as an ONNX model."""
    from lowmem_cnn.model import Network
    from lowmem_cnn.params import load_params
    from lowmem_cnn.session import network_config

    onnx_module()  # missing: said before anything is read
    config, _ = network_config(config_name, params)
    network = Network(config, np.float32)
    load_params(params, network)
    return save_onnx(network, out, softmax)


def save_onnx(network, out, softmax: bool = False) -> Exported:
    """Write `network` (its parameters as they are now) to `out` as an ONNX model,
    checked by onnx.checker first; atomically: an existing file is replaced whole or
    not at all."""
    from lowmem_cnn.files import atomic_write

    onnx = onnx_module()
    model = build_model(network, softmax)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    out = Path(out)
    with atomic_write(out, "ONNX model") as f:
        f.write(data)
    c, h, w = network.config.input_shape
    return Exported(out, model.opset_import[0].version, len(data), (c, h, w),
                    PROBABILITIES if softmax else SCORES, class_names(network))


def class_names(network) -> list:
    names = network.config.class_names
    return list(names) if names else [str(k) for k in range(network.classes)]


def preprocessing(config) -> str:
    """How a picture becomes the input, in words."""
    c, h, w = config.input_shape
    values = (f"float32 pixels / 255 in [0, 1], as an NCHW array [N, {c}, {h}, {w}] "
              + ("(channels R, G, B)" if c == 3 else "(gray)" if c == 1 else f"({c} channels)"))
    if config.class_names:  # trained on a folder of pictures (imaging.image_row)
        return (f"{'RGB' if c == 3 else 'grayscale'}; scaled to cover {h}x{w} (a square's shorter "
                f"side to {h}) and centre-cropped, EXIF orientation applied, alpha dropped; then "
                + values)
    if (c, h, w) == (1, 28, 28):  # MNIST's digits (imaging.mnist_style, as predict does)
        return ("made to look like MNIST's digits: grayscale, white on black (inverted if dark on "
                "light), scaled to fit 20x20 and centred by its centre of mass in 28x28; then "
                + values)
    return values


def build_model(network, softmax: bool = False):
    """The ONNX ModelProto of `network` (not yet checked)."""
    onnx = onnx_module()
    from onnx import TensorProto, helper, numpy_helper

    keys = {(id(layer), name): key
            for key, layer, name in (*network.param_names(), *network.state_names())}
    nodes, weights = [], []
    counter = iter(range(1, 1 << 30))

    def initializer(layer, name):
        value = getattr(layer, name)
        book = book_layout.to_book(layer, name, value) if name == "W" else value
        key = keys[id(layer), name]
        weights.append(numpy_helper.from_array(np.ascontiguousarray(book, np.float32), key))
        return key

    def node(op, inputs, **attributes):
        output = f"{op.lower()}{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def convolution(x, layer, conv):
        k, s, p = conv.size, conv.stride, conv.pad
        return node("Conv", [x, initializer(layer, "W"), initializer(layer, "b")],
                    kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def pooling(x, pool):
        k, s = pool.size, pool.stride
        return node("MaxPool", [x], kernel_shape=[k, k], strides=[s, s])

    x = INPUT
    for layer in network.layers:
        if isinstance(layer, ConvolutionPooling):
            x = pooling(convolution(x, layer, layer.conv), layer.pool)
        elif isinstance(layer, Convolution):
            x = convolution(x, layer, layer)
        elif isinstance(layer, MaxPooling):
            x = pooling(x, layer)
        elif isinstance(layer, ReLU):
            x = node("Relu", [x])
        elif isinstance(layer, Affine):
            if len(layer.in_shape) == 3:  # a map: C, then H, then W, as the book's rows
                x = node("Flatten", [x], axis=1)
            x = node("Gemm", [x, initializer(layer, "W"), initializer(layer, "b")])
        elif isinstance(layer, Dropout):
            keep = f"keep{next(counter)}"
            weights.append(numpy_helper.from_array(np.array(1.0 - layer.ratio, np.float32), keep))
            x = node("Mul", [x, keep])
        elif isinstance(layer, BatchNormalization):
            x = node("BatchNormalization",
                     [x, *(initializer(layer, name)
                           for name in ("gamma", "beta", "running_mean", "running_var"))],
                     epsilon=layer.EPS)
        else:
            raise LowmemError(f"{network.config.name}: its layer {_described(layer)} has no ONNX "
                              f"export (exported: {EXPORTED_KINDS})")
    if softmax:
        nodes.append(helper.make_node("Softmax", [x], [PROBABILITIES], name="softmax", axis=1))
    else:  # the last node's output is the graph's
        nodes[-1].output[0] = SCORES
    output = PROBABILITIES if softmax else SCORES
    c, h, w = network.config.input_shape
    graph = helper.make_graph(
        nodes, network.config.name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", network.classes])],
        weights,
        doc_string=f"{network.config.name}: input pixels / 255 (NCHW), output "
                   f"{'the probabilities' if softmax else 'the scores'} of {network.classes} classes")
    opsets = [helper.make_opsetid("", opset(onnx))]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lowmem-cnn",
                              producer_version=__version__)
    model.ir_version = helper.find_min_ir_version_for(opsets)  # the oldest readers that can
    helper.set_model_props(model, {
        "classes": json.dumps(class_names(network)),
        "input_shape": json.dumps([c, h, w]),  # channels, height, width
        "preprocessing": preprocessing(network.config),
        "output": (f"{output} [N, {network.classes}]: the class is the largest"
                   + ("" if softmax else "; softmax gives the probabilities")),
        "config": network.config.name,
        "lowmem_cnn_version": __version__,
    })
    return model


def _described(layer) -> str:
    try:
        return f"{layer.describe()!r} ({type(layer).__name__})"
    except NotImplementedError:
        return type(layer).__name__
