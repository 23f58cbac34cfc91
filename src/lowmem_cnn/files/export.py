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

The opset: each node written below declares the oldest opset at which its operator
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
from lowmem_cnn.files import book_layout
from lowmem_cnn.engine.conv_pool import ConvolutionPooling
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.layers import Affine, BatchNormalization, Convolution, Dropout, MaxPooling, ReLU

# The graph's own declaration, as each node makes one: its weights are initializers
# that are not also graph inputs, which IR version 4 allows first, and IR 4's opset
# is 9. (onnx2torch 1.5.15 reads our operators from opset 9 on, not before: it has no
# converter for Flatten-1, MaxPool-1 or Gemm-7.)
GRAPH_OPSET = 9
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
                    class_names(network))


def newest_known(onnx, opset: int | None) -> int:
    """The installed onnx's newest opset; `opset` beyond it is refused."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > newest:
        raise LowmemError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up "
                          f"to {newest}; choose one up to {newest}, or upgrade onnx")
    return newest


def class_names(network) -> list:
    names = network.config.class_names
    return list(names) if names else [str(k) for k in range(network.classes)]


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

    keys = {(id(layer), name): key
            for key, layer, name in (*network.param_names(), *network.state_names())}
    nodes, weights = [], []
    declared = [GRAPH_OPSET]  # each node adds the oldest opset at which it means ours
    counter = iter(range(1, 1 << 30))

    def initializer(layer, name):
        value = getattr(layer, name)
        book = book_layout.to_book(layer, name, value) if name == "W" else value
        key = keys[id(layer), name]
        weights.append(numpy_helper.from_array(np.ascontiguousarray(book, np.float32), key))
        return key

    def node(op, since, inputs, **attributes):
        declared.append(since)
        output = f"{op.lower()}{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def convolution(x, layer, conv):
        k, s, p = conv.size, conv.stride, conv.pad
        # Conv-1: explicit kernel, strides and pads mean the same in every version
        return node("Conv", 1, [x, initializer(layer, "W"), initializer(layer, "b")],
                    kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def pooling(x, pool):
        k, s = pool.size, pool.stride
        # MaxPool-1: no pads, the output size rounded down (ceil_mode, from 10, is 0)
        return node("MaxPool", 1, [x], kernel_shape=[k, k], strides=[s, s])

    x = INPUT
    for layer in network.layers:
        if isinstance(layer, ConvolutionPooling):
            x = pooling(convolution(x, layer, layer.conv), layer.pool)
        elif isinstance(layer, Convolution):
            x = convolution(x, layer, layer)
        elif isinstance(layer, MaxPooling):
            x = pooling(x, layer)
        elif isinstance(layer, ReLU):
            x = node("Relu", 6, [x])  # Relu-6: Relu-1's consumed_inputs gone, the same max(0, x)
        elif isinstance(layer, Affine):
            if len(layer.in_shape) == 3:  # a map: C, then H, then W, as the book's rows
                x = node("Flatten", 1, [x], axis=1)  # Flatten-1 has axis
            # Gemm-7: the bias [units] broadcast over the rows (Gemm-6 needed broadcast=1)
            x = node("Gemm", 7, [x, initializer(layer, "W"), initializer(layer, "b")])
        elif isinstance(layer, Dropout):
            keep = f"keep{next(counter)}"
            weights.append(numpy_helper.from_array(np.array(1.0 - layer.ratio, np.float32), keep))
            x = node("Mul", 7, [x, keep])  # Mul-7: a scalar broadcast (Mul-6 needed broadcast=1)
        elif isinstance(layer, BatchNormalization):
            # BatchNormalization-9: per channel C of (N, C, ...) at any rank, running
            # statistics (before 9, `spatial` chose); from 14 training_mode, here 0
            x = node("BatchNormalization", 9,
                     [x, *(initializer(layer, name)
                           for name in ("gamma", "beta", "running_mean", "running_var"))],
                     epsilon=layer.EPS)
        else:
            raise LowmemError(f"{network.config.name}: its layer {_described(layer)} has no ONNX "
                              f"export (exported: {EXPORTED_KINDS})")
    output = PROBABILITIES if softmax else SCORES
    if softmax:
        # Softmax-1: on [N, classes] with axis 1, the same as Softmax-13's along axis 1
        node("Softmax", 1, [x], axis=1)
    nodes[-1].output[0] = output  # the last node's output is the graph's
    oldest, newest = max(declared), newest_known(onnx, opset)
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
        "classes": json.dumps(class_names(network)),
        "output": (f"'{output}': float32 [N, {network.classes}], "
                   + ("the probabilities" if softmax else "the scores (softmax gives the "
                      "probabilities)") + "; the class is the largest"),
        "opset": str(chosen),
        "config": network.config.name,
        "lowmem_cnn_version": __version__,
    })
    return model


def _described(layer) -> str:
    try:
        return f"{layer.describe()!r} ({type(layer).__name__})"
    except NotImplementedError:
        return type(layer).__name__
