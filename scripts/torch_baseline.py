"""The same network in PyTorch, built from the same TOML config as lowmem-cnn's, trained
and evaluated as a PyTorch user would: whole data set in memory as tensors, the
config's optimizer, learning rate and batch size, float32, CPU.

Run with a Python that has torch (never a dependency of lowmem-cnn):
    python scripts/torch_baseline.py DATA_DIR [--config NAME_OR_TOML] [--limit N] [--serve]
Prints one JSON line: epoch_seconds, eval_seconds, test_accuracy, threads, peak_rss_bytes.

With --recipe NAME (e.g. photos) it trains the config's whole recipe instead, as
`lowmem-cnn train --config NAME` does: its [training] table's epochs (or --epochs),
augmentation (flip, crop:P), the book's L2 weight decay on the conv and affine weights
only, its learning-rate schedule per update (schedule.py's arithmetic), Adam with the
book's eps 1e-7; test accuracy and accuracy on the first 10,000 training images after
each epoch. It prints one JSON line: seconds_per_epoch (training updates only, as
lowmem-cnn counts them), test_accuracy_per_epoch, test_accuracy (the last), the OS's
peak RSS (getrusage ru_maxrss, and /proc's VmHWM), the torch version and threads.
Batch normalization normalizes by each batch's statistics, as PyTorch does (lowmem-cnn
by each micro-batch's: 50 images when its plan runs 2 threads).
    python scripts/torch_baseline.py DATA_DIR --recipe photos

With --serve it trains in segments for scripts/bench_interleaved.py instead: after a
line "ready", each line it reads on stdin is a number of batches to train (the epoch
goes on where the last segment stopped, a new order when it ends), and it answers with
the seconds they took.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
import tomllib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from idx_arrays import mnist  # noqa: E402

CONFIGS = os.path.join(HERE, "..", "src", "lowmem_cnn", "configs")
BN_EPS = 1e-6  # lowmem-cnn's BatchNormalization.EPS (the book's 10e-7)
TRAIN_SAMPLE = 10_000  # training images measured after each epoch, as lowmem-cnn's


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
        elif kind == "batchnorm":
            # per channel after a convolution, per unit after an affine layer; the book's
            # momentum is the share the running value keeps, PyTorch's the share it takes
            norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            modules.append(norm(shape[0], eps=BN_EPS, momentum=1.0 - spec.get("momentum", 0.9)))
        else:
            raise ValueError(f"layer type {kind!r} is not known here")
    model = nn.Sequential(*modules)
    with torch.no_grad():
        for module in model:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, math.sqrt(2.0 / fan_in) if init == "he" else init)
                module.bias.zero_()
            # (batch normalization starts as lowmem-cnn's: gamma 1, beta 0, mean 0, var 1)
    return model


def weight_groups(model, weight_decay):
    """The parameters in two groups: the conv and affine weights, with the book's L2
    weight decay (lambda W added to the gradient, as torch's Adam/SGD weight_decay
    does), and the rest (biases, batch normalization's gamma and beta) without."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    chosen = {id(p) for p in weights}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def schedule_rate(kind, lr, epochs, updates_per_epoch, warmup, epoch, update):
    """lowmem_cnn/training/schedule.py's Schedule.rate, the same arithmetic."""
    if kind == "constant":
        return lr
    if kind == "step":
        return lr * 0.1 ** ((epoch >= epochs / 2) + (epoch >= epochs * 3 / 4))
    if kind != "cosine":
        raise ValueError(f"learning-rate schedule {kind!r}")
    step = epoch * updates_per_epoch + update
    total = epochs * updates_per_epoch
    warm = round(min(warmup, epochs / 2) * updates_per_epoch)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def parse_augment(text):
    """(flip, crop pixels) of 'flip,crop:2' (lowmem_cnn/data/augment.py's syntax)."""
    flip, crop = False, 0
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition(":")
        if name == "flip" and not value:
            flip = True
        elif name == "crop" and value.isdigit():
            crop = int(value)
        elif part != "none":
            raise ValueError(f"augmentation {part!r}")
    return flip, crop


def augment(x, flip, crop):
    """The batch x (n, C, H, W) changed as lowmem_cnn/data/augment.py changes pictures: each
    mirrored left to right with probability 1/2, then moved by -crop..crop pixels each
    way (padding of `crop` zeros, a random crop of the picture's size), zeros coming in.
    Done on the whole batch at once, as a PyTorch user would on tensors."""
    n, c, h, w = x.shape
    if flip:
        mirrored = torch.rand(n) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    if crop:
        padded = F.pad(x, (crop, crop, crop, crop))
        rows = torch.randint(0, 2 * crop + 1, (n, 1)) + torch.arange(h)  # (n, h)
        cols = torch.randint(0, 2 * crop + 1, (n, 1)) + torch.arange(w)  # (n, w)
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    return x


class Trainer:
    """Mini-batch updates over a fresh permutation each epoch, stoppable after any update
    (for --serve); the rate of each update from the schedule."""

    def __init__(self, model, optimizer, train_x, train_t, batch, epochs, schedule=("constant", 0.0),
                 flip=False, crop=0):
        self.model, self.optimizer = model, optimizer
        self.x, self.t, self.batch, self.epochs = train_x, train_t, batch, epochs
        self.kind, self.warmup = schedule
        self.lr = optimizer.param_groups[0]["lr"]
        self.flip, self.crop = flip, crop
        self.loss_fn = nn.CrossEntropyLoss()
        self.updates_per_epoch = -(-len(train_x) // batch)
        self.epoch, self.position, self.order = 0, 0, None
        self.loss_sum = torch.zeros(())

    def step(self):
        """One update; True when it ended an epoch."""
        if self.order is None:
            self.order, self.position, self.loss_sum = torch.randperm(len(self.x)), 0, torch.zeros(())
        chosen = self.order[self.position * self.batch : (self.position + 1) * self.batch]
        x = self.x[chosen]
        if self.flip or self.crop:
            x = augment(x, self.flip, self.crop)
        if self.kind != "constant":
            rate = schedule_rate(self.kind, self.lr, self.epochs, self.updates_per_epoch,
                                 self.warmup, self.epoch, self.position)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(x), self.t[chosen])
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(chosen)
        self.position += 1
        if self.position < self.updates_per_epoch:
            return False
        self.order, self.epoch = None, self.epoch + 1
        return True


def accuracy(model, x, t, step):
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + step]).argmax(dim=1) for i in range(0, len(x), step)])
    model.train()
    return float((predicted == t).float().mean())


def peak_rss():
    """(ru_maxrss in bytes, /proc's VmHWM in bytes or None): the OS's peak RSS."""
    hwm = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, hwm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--config", default="simple_convnet")
    parser.add_argument("--recipe", metavar="NAME_OR_TOML",
                        help="train the config's whole recipe, all its epochs (see above)")
    parser.add_argument("--epochs", type=int, help="with --recipe: instead of the config's")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch", type=int, default=1000,
                        help="test images per forward pass (0: all at once)")
    parser.add_argument("--serve", action="store_true",
                        help="train the batch counts read on stdin (see above)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    config = read_config(options.recipe or options.config)
    training = {"optimizer": "adam", "lr": 0.001, "batch_size": 100, "epochs": 20,
                "augment": "none", "weight_decay": 0.0, "lr_schedule": "constant", "warmup": 0.0,
                **config.get("training", {})}
    if options.recipe and options.epochs:
        training["epochs"] = options.epochs
    train_x, train_t, test_x, test_t = (torch.from_numpy(np.ascontiguousarray(a))
                                        for a in mnist(options.data_dir))
    if options.limit:
        train_x, train_t = train_x[: options.limit], train_t[: options.limit]
    torch.manual_seed(options.seed)
    model = build(config["network"])
    optimizers = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adagrad": torch.optim.Adagrad,
                  "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    name = training["optimizer"].lower()
    extra = {"momentum": 0.9} if name == "momentum" else {}
    if options.recipe:
        if name == "adam":
            # The book adds 1e-7 to sqrt(v) and folds both bias corrections into the
            # rate; PyTorch adds eps to sqrt(v / (1 - beta2^t)). The book's 1e-7 is eps =
            # 1e-7 / sqrt(1 - beta2^t) in PyTorch's terms: 3.2e-6 at the first update,
            # 1.3e-7 at the 1,000th, within 1% of 1e-7 after 3,900 (of the recipe's
            # 12,000). Close enough: both are far below sqrt(v) of a weight that learns.
            extra["eps"] = 1e-7
        params = weight_groups(model, training["weight_decay"])
    else:
        params = model.parameters()  # as this baseline always was (PyTorch's eps)
    optimizer = optimizers[name](params, lr=training["lr"], **extra)
    batch = training["batch_size"]
    step = options.eval_batch or len(test_x)
    model.train()
    if not options.recipe:
        trainer = Trainer(model, optimizer, train_x, train_t, batch, 1)
        if options.serve:
            serve(trainer)
            return
        began = time.perf_counter()
        while not trainer.step():
            pass
        epoch_seconds = time.perf_counter() - began
        began = time.perf_counter()
        test_accuracy = accuracy(model, test_x, test_t, step)
        eval_seconds = time.perf_counter() - began
        print(json.dumps({"epoch_seconds": epoch_seconds, "eval_seconds": eval_seconds,
                          "test_accuracy": test_accuracy, "threads": torch.get_num_threads(),
                          "config": options.config, "eval_batch": step,
                          "peak_rss_bytes": peak_rss()[0]}))
        return

    flip, crop = parse_augment(training["augment"])
    trainer = Trainer(model, optimizer, train_x, train_t, batch, training["epochs"],
                      (training["lr_schedule"], training["warmup"]), flip, crop)
    if options.serve:
        serve(trainer)
        return
    history = []
    for epoch in range(1, training["epochs"] + 1):
        began = time.perf_counter()
        while not trainer.step():
            pass
        seconds = time.perf_counter() - began
        record = {"epoch": epoch, "loss": float(trainer.loss_sum) / len(train_x), "seconds": seconds,
                  "train_accuracy": accuracy(model, train_x[:TRAIN_SAMPLE], train_t[:TRAIN_SAMPLE], step),
                  "test_accuracy": accuracy(model, test_x, test_t, step)}
        history.append(record)
        print(f"epoch {epoch}/{training['epochs']}: {seconds:.2f} s, loss {record['loss']:.4f}, "
              f"train accuracy {record['train_accuracy']:.4f}, test accuracy "
              f"{record['test_accuracy']:.4f}", file=sys.stderr, flush=True)
    maxrss, hwm = peak_rss()
    print(json.dumps({
        "recipe": options.recipe, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "epochs": training["epochs"], "train_images": len(train_x), "batch_size": batch,
        "optimizer": name, "lr": training["lr"], "weight_decay": training["weight_decay"],
        "lr_schedule": training["lr_schedule"], "warmup": training["warmup"],
        "augment": training["augment"],
        "seconds_per_epoch": [h["seconds"] for h in history],
        "test_accuracy_per_epoch": [h["test_accuracy"] for h in history],
        "train_accuracy": history[-1]["train_accuracy"], "test_accuracy": history[-1]["test_accuracy"],
        "history": history, "peak_rss_bytes": maxrss, "vmhwm_bytes": hwm,
        "parameters": sum(p.numel() for p in model.parameters())}))


def serve(trainer):
    print("ready", flush=True)
    for line in sys.stdin:
        began = time.perf_counter()
        for _ in range(int(line)):
            trainer.step()
        print(time.perf_counter() - began, flush=True)


if __name__ == "__main__":
    main()
