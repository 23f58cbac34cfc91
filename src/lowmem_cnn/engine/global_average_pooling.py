"""Global average pooling: each channel's mean over the whole map, a vector of C values.

    out[c] = sum over (h, w) of x[h, w, c] / (H W)
    dx[h, w, c] = dout[c] / (H W)

In place of the flatten into an affine layer: for 128-px photos, that affine layer is
the largest thing in the network (see configs/photos_gap.toml).
"""

import numpy as np

from lowmem_cnn.engine.layers import Layer


class GlobalAveragePooling(Layer):
    kind = "global_avgpool"
    takes_map = True

    def __init__(self, in_shape):
        h, w, c = in_shape
        self.in_shape = (h, w, c)
        self.out_shape = (c,)

    def forward(self, x, ctx):
        h, w, c = self.in_shape
        out = ctx.ws.array(self, "out", (len(x), c), x.dtype)
        if ctx.dry:
            return out, None
        np.sum(x.reshape(len(x), h * w, c), axis=1, out=out)
        out *= 1.0 / (h * w)
        return out, None

    def backward(self, dout, saved, grads, ctx):
        h, w, c = self.in_shape
        if not self.need_input_grad:
            return None
        grad = ctx.ws.array(self, "grad", (len(dout), h, w, c), dout.dtype)
        share = ctx.ws.array(self, "share", dout.shape, dout.dtype)  # each value's part of the mean
        if ctx.dry:
            return grad
        np.multiply(dout, 1.0 / (h * w), out=share)
        np.copyto(grad, share[:, None, None, :])
        return grad

    def onnx(self, graph, x):
        # GlobalAveragePool-1 gives [N, C, 1, 1]; Flatten-1 (axis 1) makes it [N, C], this
        # layer's vector
        return graph.node("Flatten", 1, [graph.node("GlobalAveragePool", 1, [x])], axis=1)

    def describe(self):
        h, w, c = self.in_shape
        return f"global avgpool {h}x{w}"
