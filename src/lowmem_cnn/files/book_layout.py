"""The book's layout of the parameters, against the engine's.

The book stores a convolution's W as (F, C, FH, FW); the engine's columns are in
(FH, FW, C) order, so its W is (FH*FW*C, F). The book flattens maps in (C, H, W)
order, the engine in (H, W, C): an affine layer after a map has its rows in another
order. Every other array has the same shape and order in both. The axes are said once,
in `engine_view`; the copies both ways go through it.
"""

import math

import numpy as np

from lowmem_cnn.engine.conv_pool import ConvolutionPooling
from lowmem_cnn.engine.layers import Affine, Convolution


def engine_view(layer, name: str, array: np.ndarray) -> np.ndarray:
    """`array`, the layer's `name` in the engine's layout, seen with the book's axes: a
    view, so writing into it writes the engine's array. Its shape is the book's, except
    an affine layer after a map: (C, H, W, units) where the book has (C*H*W, units)."""
    if name == "W" and isinstance(layer, (Convolution, ConvolutionPooling)):
        conv = layer.conv if isinstance(layer, ConvolutionPooling) else layer
        return array.reshape(conv.size, conv.size, conv.in_shape[2], conv.filters).transpose(3, 2, 0, 1)
    if name == "W" and isinstance(layer, Affine) and len(layer.in_shape) == 3:
        h, w, c = layer.in_shape
        return array.reshape(h, w, c, layer.units).transpose(2, 0, 1, 3)
    return array


def book_shape(layer, name: str) -> tuple:
    if name == "W" and isinstance(layer, (Convolution, ConvolutionPooling)):
        conv = layer.conv if isinstance(layer, ConvolutionPooling) else layer
        return (conv.filters, conv.in_shape[2], conv.size, conv.size)
    return tuple({**layer.param_shapes, **layer.state_shapes}[name])


def to_book(layer, name: str, array: np.ndarray) -> np.ndarray:
    """A contiguous copy of the engine's `array` in the book's layout."""
    return np.ascontiguousarray(engine_view(layer, name, array)).reshape(book_shape(layer, name))


def from_book(layer, name: str, array: np.ndarray, dtype) -> np.ndarray:
    """A new engine array of `dtype` holding `array`, given in the book's layout."""
    shape = {**layer.param_shapes, **layer.state_shapes}[name]
    engine = np.empty(shape, dtype)
    view = engine_view(layer, name, engine)
    np.copyto(view, np.reshape(array, view.shape), casting="unsafe")
    return engine


def size(layer, name: str) -> int:
    return math.prod(book_shape(layer, name))
