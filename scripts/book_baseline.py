"""The slow baseline: SimpleConvNet the book's way, written here for the benchmark.

Whole-batch im2col (zero-filled, transposed, copied), float64 weights, NCHW, pooling
through im2col too, the data set held whole in memory as float32. One training epoch
(batches of 100, Adam lr 0.001) and one forward pass over all 10,000 test images at
once, as the book's readers do it.

    python scripts/book_baseline.py DATA_DIR [--limit N]
Prints one JSON line: epoch_seconds, eval_seconds, test_accuracy.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from idx_arrays import mnist  # noqa: E402


def im2col(x, fh, fw, stride=1, pad=0):
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    col = np.zeros((n, c, fh, fw, oh, ow))
    for i in range(fh):
        for j in range(fw):
            col[:, :, i, j] = padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, -1)


def col2im(col, shape, fh, fw, stride=1, pad=0):
    n, c, h, w = shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    col = col.reshape(n, oh, ow, c, fh, fw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * pad + stride - 1, w + 2 * pad + stride - 1))
    for i in range(fh):
        for j in range(fw):
            img[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += col[:, :, i, j]
    return img[:, :, pad : h + pad, pad : w + pad]


class Net:
    def __init__(self, rng):
        self.p = {"W1": 0.01 * rng.standard_normal((30, 1, 5, 5)), "b1": np.zeros(30),
                  "W2": 0.01 * rng.standard_normal((4320, 100)), "b2": np.zeros(100),
                  "W3": 0.01 * rng.standard_normal((100, 10)), "b3": np.zeros(10)}

    def forward(self, x):
        p, n = self.p, len(x)
        self.x = x
        self.col = im2col(x, 5, 5)
        conv = (self.col @ p["W1"].reshape(30, -1).T + p["b1"]).reshape(n, 24, 24, 30).transpose(0, 3, 1, 2)
        self.relu1 = conv > 0
        conv = conv * self.relu1
        pcol = im2col(conv, 2, 2, 2).reshape(-1, 4)
        self.arg = pcol.argmax(axis=1)
        pooled = pcol.max(axis=1).reshape(n, 12, 12, 30).transpose(0, 3, 1, 2)
        self.flat = pooled.reshape(n, -1)
        h = self.flat @ p["W2"] + p["b2"]
        self.relu2 = h > 0
        self.h = h * self.relu2
        return self.h @ p["W3"] + p["b3"]

    def gradient(self, x, t):
        p, n = self.p, len(x)
        y = self.forward(x)
        y = np.exp(y - y.max(axis=1, keepdims=True))
        y /= y.sum(axis=1, keepdims=True)
        d = y.copy()
        d[np.arange(n), t] -= 1
        d /= n
        g = {"W3": self.h.T @ d, "b3": d.sum(0)}
        d = (d @ p["W3"].T) * self.relu2
        g["W2"], g["b2"] = self.flat.T @ d, d.sum(0)
        d = (d @ p["W2"].T).reshape(n, 30, 12, 12).transpose(0, 2, 3, 1)
        dmax = np.zeros((d.size, 4))
        dmax[np.arange(self.arg.size), self.arg] = d.ravel()
        d = col2im(dmax.reshape(n * 144, -1), (n, 30, 24, 24), 2, 2, 2) * self.relu1
        d = d.transpose(0, 2, 3, 1).reshape(-1, 30)
        g["W1"] = (self.col.T @ d).T.reshape(30, 1, 5, 5)
        g["b1"] = d.sum(0)
        return g


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--limit", type=int)
    options = parser.parse_args()
    train_x, train_t, test_x, test_t = mnist(options.data_dir)
    if options.limit:
        train_x, train_t = train_x[: options.limit], train_t[: options.limit]
    rng = np.random.default_rng(0)
    net = Net(rng)
    m = {k: np.zeros_like(v) for k, v in net.p.items()}
    v = {k: np.zeros_like(a) for k, a in net.p.items()}
    began = time.perf_counter()
    order = rng.permutation(len(train_x))
    for step, start in enumerate(range(0, len(train_x), 100), start=1):
        batch = order[start : start + 100]
        grads = net.gradient(train_x[batch], train_t[batch])
        lr_t = 0.001 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        for k in net.p:
            m[k] += 0.1 * (grads[k] - m[k])
            v[k] += 0.001 * (grads[k] ** 2 - v[k])
            net.p[k] -= lr_t * m[k] / (np.sqrt(v[k]) + 1e-7)
    epoch_seconds = time.perf_counter() - began
    began = time.perf_counter()
    predicted = net.forward(test_x).argmax(axis=1)  # all 10,000 at once
    eval_seconds = time.perf_counter() - began
    print(json.dumps({"epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
                      "test_accuracy": float((predicted == test_t).mean())}))


if __name__ == "__main__":
    main()
