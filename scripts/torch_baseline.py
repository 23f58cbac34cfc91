"""The same network in PyTorch, built from the same TOML config as lowmem-cnn's, trained
and evaluated as a PyTorch user would: whole data set in memory as tensors, the
config's optimizer, learning rate and batch size, float32, CPU.

Run with a Python that has torch (never a dependency of lowmem-cnn):
    python scripts/torch_baseline.py DATA_DIR [--config NAME_OR_TOML] [--limit N] [--serve]
Prints one JSON line: epoch_seconds, eval_seconds, test_accuracy, threads.

With --serve it trains in segments for scripts/bench_interleaved.py instead: after a
line "ready", each line it reads on stdin is a number of batches to train (the epoch
goes on where the last segment stopped, a new order when it ends), and it answers with
the seconds they took.
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from idx_arrays import mnist  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "src", "lowmem_cnn", "configs")


class BookDropout(nn.Module):
    """The book's dropout: training zeroes with probability `ratio` and does not scale;
    inference scales by 1 - ratio (nn.Dropout scales in training instead)."""

    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        if self.training:
            return x * (torch.rand_like(x) > self.ratio)
        return x * (1.0 - self.ratio)


def read_config(name):
    path = name if name.endswith(".toml") else os.path.join(CONFIGS, f"{name}.toml")
    with open(path, "rb") as f:
        return tomllib.load(f)


def build(network):
    """nn.Sequential of the config's layers, weights drawn as lowmem-cnn draws them."""
    c, h, w = network["input_shape"]
    init = network.get("weight_init", 0.01)
    modules, shape = [], (c, h, w)
    for spec in network["layers"]:
        kind = spec["type"]
        if kind == "conv":
            stride, pad, size = spec.get("stride", 1), spec.get("pad", 0), spec["size"]
            modules.append(nn.Conv2d(shape[0], spec["filters"], size, stride, pad))
            shape = (spec["filters"], (shape[1] + 2 * pad - size) // stride + 1,
                     (shape[2] + 2 * pad - size) // stride + 1)
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "pool":
            size, stride = spec["size"], spec.get("stride", spec["size"])
            modules.append(nn.MaxPool2d(size, stride))
            shape = (shape[0], (shape[1] - size) // stride + 1, (shape[2] - size) // stride + 1)
        elif kind == "affine":
            if len(shape) == 3:
                modules.append(nn.Flatten())
            modules.append(nn.Linear(math.prod(shape), spec["units"]))
            shape = (spec["units"],)
        elif kind == "dropout":
            modules.append(BookDropout(spec["ratio"]))
    model = nn.Sequential(*modules)
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, math.sqrt(2.0 / fan_in) if init == "he" else init)
                module.bias.zero_()
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--config", default="simple_convnet")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--eval-batch", type=int, default=1000,
                        help="test images per forward pass (0: all at once)")
    parser.add_argument("--serve", action="store_true",
                        help="train the batch counts read on stdin (see above)")
    options = parser.parse_args()
    config = read_config(options.config)
    training = {"optimizer": "adam", "lr": 0.001, "batch_size": 100, **config.get("training", {})}
    train_x, train_t, test_x, test_t = (torch.from_numpy(np.ascontiguousarray(a))
                                        for a in mnist(options.data_dir))
    if options.limit:
        train_x, train_t = train_x[: options.limit], train_t[: options.limit]
    torch.manual_seed(0)
    model = build(config["network"])
    optimizers = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                  "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    extra = {"momentum": 0.9} if training["optimizer"] == "momentum" else {}
    optimizer = optimizers[training["optimizer"]](model.parameters(), lr=training["lr"], **extra)
    loss_fn = nn.CrossEntropyLoss()
    batch = training["batch_size"]

    def train(chosen):
        optimizer.zero_grad()
        loss_fn(model(train_x[chosen]), train_t[chosen]).backward()
        optimizer.step()

    model.train()
    if options.serve:
        serve(train, len(train_x), batch)
        return
    began = time.perf_counter()
    order = torch.randperm(len(train_x))
    for start in range(0, len(train_x), batch):
        train(order[start : start + batch])
    epoch_seconds = time.perf_counter() - began

    model.eval()
    step = options.eval_batch or len(test_x)
    began = time.perf_counter()
    with torch.no_grad():
        predicted = torch.cat([model(test_x[i : i + step]).argmax(dim=1)
                               for i in range(0, len(test_x), step)])
    eval_seconds = time.perf_counter() - began
    print(json.dumps({"epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
                      "test_accuracy": float((predicted == test_t).float().mean()),
                      "threads": torch.get_num_threads(), "config": options.config,
                      "eval_batch": step}))


def serve(train, count, batch):
    order, start = torch.randperm(count), 0
    print("ready", flush=True)
    for line in sys.stdin:
        began = time.perf_counter()
        for _ in range(int(line)):
            if start >= count:
                order, start = torch.randperm(count), 0
            train(order[start : start + batch])
            start += batch
        print(time.perf_counter() - began, flush=True)


if __name__ == "__main__":
    main()
