"""Average pooling: the mean over each window (layers.Pooling: strided views, no column
matrix).

    out[i, j] = sum of x over the window at (stride i, stride j) / size^2
    dx = dout / size^2, given back to every value of the window
"""

import numpy as np

from lowmem_cnn.engine.layers import Pooling


class AveragePooling(Pooling):
    kind = "avgpool"

    def forward(self, x, ctx):
        out = ctx.ws.array(self, "out", (len(x), *self.out_shape), x.dtype)
        if ctx.dry:
            return out, None
        views = self._views(x)
        np.copyto(out, views[0])
        for view in views[1:]:
            out += view
        out *= 1.0 / (self.size * self.size)
        return out, None

    def backward(self, dout, saved, grads, ctx):
        if not self.need_input_grad:
            return None
        grad = ctx.ws.array(self, "grad", (len(dout), *self.in_shape), dout.dtype)
        share = ctx.ws.array(self, "share", dout.shape, dout.dtype)  # each value's part of the mean
        if ctx.dry:
            return grad
        np.multiply(dout, 1.0 / (self.size * self.size), out=share)
        if self.stride == self.size:  # the windows tile the input: each value is in one
            oh, ow, _ = self.out_shape
            grad[:, oh * self.stride :] = 0
            grad[:, :, ow * self.stride :] = 0
            for view in self._views(grad):
                np.copyto(view, share)
            return grad
        grad.fill(0)
        for view in self._views(grad):
            view += share
        return grad

    def onnx(self, graph, x):
        k, s = self.size, self.stride
        # AveragePool-1: no pads (so count_include_pad, from 7, changes nothing), the
        # output size rounded down (ceil_mode, from 10, is 0)
        return graph.node("AveragePool", 1, [x], kernel_shape=[k, k], strides=[s, s])

    def describe(self):
        return f"avgpool {self.size}x{self.size} stride {self.stride}"
