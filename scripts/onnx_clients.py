"""The steps of scripts/onnx_clients_check.sh, which runs them (see there).

    onnx_clients.py reference MODEL PARAMS [CONFIG] DIR   the engine's scores of MNIST's 10,000
                                                          test images, the images and labels
    onnx_clients.py run CLIENT MODEL DIR                  a client's scores (CLIENT: onnxruntime
                                                          or opencv); imports no lowmem_cnn
    onnx_clients.py compare MODEL EVAL_JSON DIR CLIENT    one row of the table: the client
                                                          against the engine and eval, image for
                                                          image; status 1 if they differ

DIR holds x.npy (float32 [N, C, H, W], pixels / 255, as lowmem-cnn feeds them),
labels.npy, and per model MODEL.engine.npy and MODEL.CLIENT.npy.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np

SCORE_TOLERANCE = 1e-4
BATCH = 500  # images per call: 500 x 784 floats are 1.5 MiB


def reference(model, params, config, directory):
    from lowmem_cnn.data.idx import DataOptions
    from lowmem_cnn.files.params import load_params
    from lowmem_cnn.memory.planner import chosen_plan
    from lowmem_cnn.session import Session

    data = DataOptions(Path(os.environ["LOWMEM_CNN_DATA"]))
    run = Session(1 << 30, config or None, "float32", 1, data, params)
    load_params(params, run.network)
    split = run.open_data().test
    images = split.images.read_range(0, len(split))
    scores = run.network.predict_scores(images, chosen_plan(run.network, 100), split.images.pixels)
    c, h, w = run.network.config.input_shape
    x = images.reshape(-1, c, h, w).astype(np.float32) / np.float32(255)
    np.save(directory / "x.npy", x)
    np.save(directory / "labels.npy", np.asarray(split.labels, np.int64))
    np.save(directory / f"{model}.engine.npy", scores)


def run(client, model, directory):
    x = np.load(directory / "x.npy")
    parts = []
    if client == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(directory / f"{model}.onnx"),
                                       providers=["CPUExecutionProvider"])
        for lo in range(0, len(x), BATCH):
            parts.append(session.run(None, {"input": x[lo : lo + BATCH]})[0])
        version = ort.__version__
    elif client == "opencv":
        import cv2

        net = cv2.dnn.readNetFromONNX(str(directory / f"{model}.onnx"))
        for lo in range(0, len(x), BATCH):
            net.setInput(x[lo : lo + BATCH])
            parts.append(np.array(net.forward()))
        version = cv2.__version__
    else:
        raise SystemExit(f"unknown client {client}")
    np.save(directory / f"{model}.{client}-{version}.npy", np.concatenate(parts))
    print(f"{client}-{version}")


def compare(model, eval_json, directory, client):
    engine = np.load(directory / f"{model}.engine.npy")
    labels = np.load(directory / "labels.npy")
    found = np.load(directory / f"{model}.{client}.npy")
    report = json.loads(Path(eval_json).read_text().splitlines()[-1])
    classes = engine.shape[1]
    predicted = found.argmax(axis=1)
    confusion = np.bincount(labels * classes + predicted, minlength=classes * classes)
    # the engine is eval's arithmetic: its predictions give eval's count and confusion
    engine_agrees = (engine.argmax(axis=1) == labels).sum() == report["correct"] and \
        np.bincount(labels * classes + engine.argmax(axis=1), minlength=classes * classes
                    ).reshape(classes, classes).tolist() == report["confusion"]
    differ = int((predicted != engine.argmax(axis=1)).sum())
    gap = float(np.abs(found - engine).max()) if found.shape == engine.shape else float("inf")
    same = (engine_agrees and differ == 0 and gap <= SCORE_TOLERANCE
            and confusion.reshape(classes, classes).tolist() == report["confusion"])
    correct = int((predicted == labels).sum())
    print(f"| {model} | {client} | {correct:,} | {report['correct']:,} | {differ} | {gap:.2e} | "
          f"{'same' if same else 'DIFFERENT'} |")
    return 0 if same else 1


if __name__ == "__main__":
    step, *args = sys.argv[1:]
    if step == "reference":
        model, params, config, directory = args
        reference(model, params, config, Path(directory))
    elif step == "run":
        run(args[0], args[1], Path(args[2]))
    elif step == "compare":
        sys.exit(compare(args[0], args[1], Path(args[2]), args[3]))
    else:
        raise SystemExit(__doc__)
