"""What eval, profile-memory and predict stand on: a network made for the data and
the parameter file, under a budget, and its memory plan; and eval's and predict's jobs
as library calls (evaluate_params, predict_pictures: profile-memory's is
profiling.profile_memory). Nothing here prints: a face passes callbacks and reads the
results. (train stands on training.run.TrainingRun.)

With a folder of pictures the data comes first: its pictures' size and colour and its
classes make the network's input and scores. A parameter file says its network in the
description beside it (network_file.network_for); one trained on a folder says its classes
and input there too, and a folder must then have its classes.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lowmem_cnn.files.config import DEFAULT_CONFIG, load_config
from lowmem_cnn.data.idx import DataOptions
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network


def network_config(config_name, params=None):
    """The network of the parameter file `params` as its description says it (else the
    config named, else the shipped config of its parameters: network_file.network_for), or
    without `params` the config named (else the default): (config, meta). `meta` is the
    description of a network trained on named classes (its "classes" and "input_shape"
    among them), None for MNIST-style digits."""
    if not params:
        return load_config(config_name or DEFAULT_CONFIG).network, None
    from lowmem_cnn.files.network_file import network_for

    config, description = network_for(params, config_name)
    return config, (description if description and description.get("classes") else None)


def _which_pictures(folder, recorded: dict) -> str:
    """One line: which of a folder's pictures are the test ones, and whether they are
    those held out when the network was trained (`recorded`: its description's)."""
    def percent(share):
        return f"{share * 100:g}%"

    share = percent(folder.test_fraction)
    drawn = f"the {share} of pictures drawn by --test-split (seed {folder.seed})"
    if "test_split" not in recorded:
        return f"testing on {drawn}: which ones were held out when training is not recorded"
    if (recorded["test_split"], recorded["split_seed"]) == (folder.test_fraction, folder.seed):
        return f"testing on the {share} of pictures held out when training (seed {folder.seed})"
    return (f"testing on {drawn}; training held out {percent(recorded['test_split'])} (seed "
            f"{recorded['split_seed']}): these may include pictures it trained on")


class Session:
    def __init__(self, budget: int, config_name, dtype, threads: int, data: DataOptions,
                 params=None):
        self.budget, self.data_options, self.params = budget, data, params
        config, meta = network_config(config_name, params)
        self.data = None
        if data.is_folder():
            from lowmem_cnn.memory.planner import decode_room

            c, h, w = config.input_shape
            recorded = (meta or {}).get("training", {})
            if data.test_fraction is None and "test_split" in recorded:
                data = replace(data, test_fraction=recorded["test_split"],
                               split_seed=recorded["split_seed"])
            self.data = data.open(lambda: decode_room(budget), (h, w), c if meta else None)
            if meta and list(self.data.classes) != meta["classes"]:
                raise LowmemError(f"{self.data.source}: its classes ({', '.join(self.data.classes)}) "
                                  f"are not those {params} was trained on ({', '.join(meta['classes'])})")
            if params and self.data.test_fraction is not None and data.report:  # a drawn split
                data.report(_which_pictures(self.data, recorded))
            config = config.for_data(self.data.input_shape, self.data.classes)
        self.network = Network(config, np.dtype(dtype), threads)
        self.plan = None

    def make_plan(self, work):
        """The plan of `work` (planner.Work) on this network and budget."""
        from lowmem_cnn.memory.planner import plan_work

        self.plan = plan_work(self.network, work, self.budget)
        return self.plan

    def open_data(self):
        """The data set (a folder is open already), checked against the network's input."""
        from lowmem_cnn.memory.planner import decode_room
        from lowmem_cnn.training.evaluation import check_image_shape

        data = self.data or self.data_options.open(lambda: decode_room(self.budget))
        check_image_shape(self.network, data.test)
        return data

    def prepare(self, work, optimizer_copies: int | None = None):
        """The parameters made (read from the parameter file, else drawn from seed 0)
        once the budget is known to hold them (planner.check_parameters_fit, with
        `optimizer_copies` for training), `work` planned before the data is read or
        downloaded (a budget too small is refused first), then the data opened and
        `work` planned again with it: the data set."""
        from lowmem_cnn.memory.planner import check_parameters_fit

        loading = self.params is not None
        check_parameters_fit(self.network, self.budget, optimizer_copies, loading=loading)
        if loading:
            from lowmem_cnn.files.params import load_params

            load_params(self.params, self.network)
        else:
            self.network.init_params(np.random.default_rng(0))
        self.make_plan(work)
        data = self.open_data()
        self.make_plan(work)
        return data

    def class_name(self, k: int) -> str:
        return self.network.config.named_classes(self.network.classes)[k]


@dataclass
class ParamsEvaluation:
    """What eval found: a parameter file's network evaluated on a split."""

    evaluation: object  # training.evaluation.Evaluation
    split: str  # "test" or "train"
    classes: list  # the name of each class, in the order of the confusion matrix
    seconds: float  # the evaluation's, without reading the files or drawing
    budget: int


def evaluate_params(params, budget: int, data: DataOptions, config_name=None, dtype="float32",
                    threads: int = 1, split: str = "test", batch_size: int = 100,
                    misclassified: Path | None = None, on_plan=lambda network, plan: None,
                    report=lambda text: None) -> ParamsEvaluation:
    """Evaluate the parameter file `params` on a split of `data` (data.DataOptions),
    reading `batch_size` images at a time under `budget` (bytes). on_plan(network, plan)
    once the plan is made; with `misclassified`, the first 100 misclassified images are
    drawn into it (plotting.plot_misclassified) and report(text) says so."""
    from lowmem_cnn.memory.planner import Work
    from lowmem_cnn.training.evaluation import MAX_READ_IMAGES, evaluate

    session = Session(budget, config_name, dtype, threads, data, params)
    network = session.network
    work = Work("evaluate", batch_size, read=min(batch_size, MAX_READ_IMAGES),
                picture="digits" if misclassified else None)
    chosen = getattr(session.prepare(work), split)
    on_plan(network, session.plan)
    began = time.perf_counter()
    result = evaluate(network, chosen, session.plan, batch_size,
                      keep_wrong=100 if misclassified else 0)
    seconds = time.perf_counter() - began
    if misclassified:
        from lowmem_cnn.plotting import plot_misclassified

        network.release_memory()
        indices = np.array([i for i, _, _ in result.wrong], np.int64)
        images = chosen.images
        plot_misclassified(images.read(indices), [session.class_name(t) for _, t, _ in result.wrong],
                           [session.class_name(p) for _, _, p in result.wrong],
                           (images.channels, images.rows, images.cols), misclassified)
        report(f"{len(result.wrong)} misclassified images drawn in {misclassified}")
    classes = [session.class_name(k) for k in range(len(result.confusion))]
    return ParamsEvaluation(result, split, classes, seconds, budget)


# predict decodes and runs this many pictures at a time.
PREDICT_CHUNK = 100


@dataclass
class Prediction:
    """What predict found for one picture: its class probabilities, or why it could not
    be used."""

    path: Path
    classes: list  # the name of each class
    probabilities: np.ndarray | None = None  # float64, one per class; None if refused
    error: LowmemError | None = None


def predict_pictures(params, pictures, config_name=None, max_ram: str | None = None
                     ) -> Iterator[Prediction]:
    """The class probabilities of each picture (a path) by the network of the parameter
    file `params`, in order, under the budget `max_ram` (a size, budget.resolve_budget;
    default: half of the RAM available). For a network trained on a folder of pictures
    each is scaled and cropped as the folder's were; for MNIST's digits each is made to
    look like MNIST's (imaging.mnist_style). A picture that cannot be used is a
    Prediction with its error; the others go on. What is wrong with the parameter file,
    the budget or Pillow is raised here, before any picture is read; the pictures are
    read and run PREDICT_CHUNK at a time as the results are taken."""
    from lowmem_cnn.data.imaging import require_pillow
    from lowmem_cnn.files.params import load_params
    from lowmem_cnn.memory.budget import resolve_budget
    from lowmem_cnn.memory.planner import Work, check_parameters_fit, plan_work

    require_pillow()
    budget = resolve_budget(max_ram, 1)
    config, meta = network_config(config_name, params)
    network = Network(config)
    check_parameters_fit(network, budget, loading=True)
    load_params(params, network)
    c, h, w = config.input_shape
    if not meta and (c != 1 or (h, w) != (28, 28)):
        raise LowmemError(f"{config.name} takes {c}x{h}x{w} inputs, not 28x28 digits")
    names = config.named_classes(network.classes)
    chunk_size = min(len(pictures), PREDICT_CHUNK)
    plan = plan_work(network, Work("predict", chunk_size, read=chunk_size, outputs=chunk_size),
                     budget)
    return _predicted(network, plan, pictures, chunk_size, names, budget, (c, h, w) if meta else None)


def _predicted(network, plan, pictures, chunk_size, names, budget, shape) -> Iterator[Prediction]:
    """predict_pictures' results, a chunk at a time (`shape`: the (C, H, W) a folder's
    pictures are made; None: MNIST-style digits)."""
    from lowmem_cnn.memory.planner import decode_room
    from lowmem_cnn.data.imaging import image_row, mnist_style
    from lowmem_cnn.engine.layers import softmax

    for start in range(0, len(pictures), chunk_size):  # a few pictures at a time, however many
        chunk = pictures[start : start + chunk_size]
        rows, refusals = [], {}  # a picture that cannot be read is one result; the others go on
        for path in chunk:
            room = decode_room(budget)
            try:
                rows.append(image_row(path, shape[1:], shape[0], room) if shape
                            else mnist_style(path, room))
            except LowmemError as err:
                refusals[len(rows) + len(refusals)] = err
        probabilities = iter(softmax(network.predict_scores(np.stack(rows), plan)
                                     .astype(np.float64)) if rows else [])
        for i, path in enumerate(chunk):
            if i in refusals:
                yield Prediction(path, names, error=refusals[i])
            else:
                yield Prediction(path, names, next(probabilities))
