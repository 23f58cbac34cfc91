"""Gradients can only be written or added to: a layer written naively fails loudly."""

import numpy as np
import pytest

from lowmem_cnn.engine.layers import Gradients, Layer
from lowmem_cnn.engine.workspace import Context, Workspace


class _NaiveAffine(Layer):
    """An affine layer written as the book writes it: `grads["W"] += ...`."""

    def __init__(self, in_shape, units):
        self.in_shape, self.out_shape = tuple(in_shape), (units,)
        self.param_shapes = {"W": (in_shape[0], units), "b": (units,)}

    def forward(self, x, ctx):
        return x @ self.W + self.b, x

    def backward(self, dout, x, grads, ctx):
        grads["W"] += x.T @ dout
        grads["b"] += dout.sum(axis=0)
        return dout @ self.W.T


def test_a_naive_layer_fails_loudly():
    layer = _NaiveAffine((3,), 2)
    layer.W, layer.b = np.ones((3, 2)), np.zeros(2)
    grads = Gradients({"W": np.zeros((3, 2)), "b": np.zeros(2)})
    grads.restart()
    x = np.ones((4, 3))
    out, saved = layer.forward(x, Context(Workspace(), True))
    with pytest.raises(TypeError):
        layer.backward(np.ones_like(out), saved, grads, Context(Workspace(), True))


def test_what_a_layer_reads_cannot_be_added_to():
    grads = Gradients({"W": np.zeros(3)})
    with pytest.raises(ValueError):
        grads.value("W")[:] += 1
    with pytest.raises(ValueError):
        view = grads.value("W")
        view += 1


def test_the_first_write_of_an_update_overwrites_then_writes_add():
    array = np.full(3, 7.0)  # the previous mini-batch's gradient
    grads = Gradients({"W": array})
    grads.restart()
    assert grads.fresh("W")
    grads.add("W", np.array([1.0, 2.0, 3.0]))
    assert not grads.fresh("W")
    grads.add("W", np.array([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(array, [2.0, 3.0, 4.0])
    grads.add("W", np.array([5.0]), rows=(1, 2))  # a slice of rows, once written whole
    np.testing.assert_array_equal(array, [2.0, 8.0, 4.0])


def test_a_product_is_written_whole_only_as_the_first_write():
    grads = Gradients({"W": np.full((2, 2), 7.0)})
    grads.restart()
    np.dot(np.eye(2), np.ones((2, 2)), out=grads.out("W"))
    np.testing.assert_array_equal(grads.value("W"), np.ones((2, 2)))
    with pytest.raises(RuntimeError, match="add to it"):
        grads.out("W")  # it would drop what the earlier micro-batches added


def test_a_first_write_of_some_rows_only_is_refused():
    grads = Gradients({"W": np.full((4, 2), 7.0)})
    grads.restart()
    with pytest.raises(RuntimeError, match="whole"):
        grads.add("W", np.ones((2, 2)), rows=(0, 2))  # rows 2-3 would keep the old batch's


def test_a_value_of_another_shape_and_the_same_size_adds_into_its_view():
    array = np.zeros((4, 3))
    grads = Gradients({"W": array})
    grads.add("W", np.ones((2, 2, 3)))  # e.g. a (k, k, c, f) filter into (k*k*c, f)
    np.testing.assert_array_equal(array, np.ones((4, 3)))
