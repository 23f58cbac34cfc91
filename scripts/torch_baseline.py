"""The same SimpleConvNet in PyTorch, trained and evaluated as a PyTorch user would:
whole data set in memory as tensors, batch 100, Adam lr 0.001, float32, CPU.

Run with a Python that has torch (never a dependency of lowmem-cnn):
    python scripts/torch_baseline.py DATA_DIR [--limit N]
Prints one JSON line: epoch_seconds, eval_seconds, test_accuracy.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from idx_arrays import mnist  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--limit", type=int)
    options = parser.parse_args()
    train_x, train_t, test_x, test_t = (torch.from_numpy(np.ascontiguousarray(a))
                                        for a in mnist(options.data_dir))
    if options.limit:
        train_x, train_t = train_x[: options.limit], train_t[: options.limit]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 30, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4320, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0, 0.01)
                module.bias.zero_()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    loss_fn = nn.CrossEntropyLoss()

    began = time.perf_counter()
    order = torch.randperm(len(train_x))
    for start in range(0, len(train_x), 100):
        batch = order[start : start + 100]
        optimizer.zero_grad()
        loss_fn(model(train_x[batch]), train_t[batch]).backward()
        optimizer.step()
    epoch_seconds = time.perf_counter() - began

    began = time.perf_counter()
    with torch.no_grad():
        predicted = model(test_x).argmax(dim=1)  # all 10,000 at once
    eval_seconds = time.perf_counter() - began
    print(json.dumps({"epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
                      "test_accuracy": float((predicted == test_t).float().mean()),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
