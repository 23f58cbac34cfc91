"""PNG pictures: learning curves, misclassified digits, memory per layer.

matplotlib is an optional extra (`pip install 'lowmem-cnn[plot]'`), imported only
when a picture is asked for, and drawn with the Agg backend (no display needed).
"""

from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.common.writing import atomic_write


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LowmemError("plots need matplotlib: pip install 'lowmem-cnn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    try:
        with atomic_write(Path(path), "picture") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        fig.clf()


def plot_curves(history: list, path):
    """Train, test (and validation) accuracy, and loss, per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (accuracy, loss) = plt.subplots(1, 2, figsize=(10, 4))
    accuracy.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (sample)")
    accuracy.plot(epochs, [h["test_accuracy"] for h in history], "s-", label="test")
    if all("val_accuracy" in h for h in history):
        accuracy.plot(epochs, [h["val_accuracy"] for h in history], "^-", label="validation")
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("accuracy")
    accuracy.legend()
    accuracy.grid(alpha=0.3)
    loss.plot(epochs, [h["loss"] for h in history], "o-", color="tab:red")
    loss.set_xlabel("epoch")
    loss.set_ylabel("training loss")
    loss.set_yscale("log")
    loss.grid(alpha=0.3)
    for axes in (accuracy, loss):
        axes.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save(fig, path)


def plot_misclassified(images: np.ndarray, true, predicted, shape, path, columns: int = 10):
    """A grid of images (uint8 rows of `shape` (C, H, W): gray or RGB), each captioned
    'true -> predicted'."""
    plt = _pyplot()
    count = max(len(images), 1)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            c, h, w = shape
            picture = images[i].reshape(c, h, w).transpose(1, 2, 0)
            ax.imshow(picture[:, :, 0] if c == 1 else picture, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{true[i]} -> {predicted[i]}", fontsize=9, color="tab:red")
    fig.suptitle("misclassified (true -> predicted)" if len(images) else "no misclassified images")
    fig.tight_layout()
    _save(fig, path)


def plot_memory(rows: list, budget: int, path):
    """Per layer, the book's im2col bytes against the tiled bytes (log scale), and the budget.

    Layers with no columns either way (ReLU, affine) are left out: a log scale has no
    bar for 0 bytes. A layer with columns only the book's way (a pooling fused into its
    convolution) is marked "none" where its tiled bar would be.
    """
    plt = _pyplot()
    shown = [r for r in rows if r["book_im2col_bytes"] or r["tiled_bytes"]]
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(max(6, len(shown) * 0.9), 4.5))
    for offset, key, color, label in (
            (-0.2, "book_im2col_bytes", "tab:blue", "book's whole-batch im2col (float64)"),
            (0.2, "tiled_bytes", "tab:orange", "tiled here")):
        values = np.array([r[key] for r in shown], dtype=float)
        some = values > 0
        ax.bar(x[some] + offset, values[some], 0.4, color=color, label=label)
        for i in np.flatnonzero(~some):
            # x in data, y in axes coordinates: at the foot of the plot whatever the scale
            ax.text(x[i] + offset, 0.02, "none", transform=ax.get_xaxis_transform(),
                    rotation=90, ha="center", va="bottom", fontsize=8, color=color)
    ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget ({budget / 2**20:.0f} MiB)")
    ax.set_yscale("log")
    ax.set_ylabel("bytes")
    ax.set_xticks(x, [r["layer"] for r in shown], rotation=45, ha="right", fontsize=8)
    if not shown:
        ax.set_title("no layer makes columns", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
