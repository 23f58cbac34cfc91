"""What eval, profile-memory and predict stand on: a network made for the data and
the parameter file, under a budget, and its memory plan. (train stands on
training.TrainingRun.)

With a folder of pictures the data comes first: its pictures' size and colour and its
classes make the network's input and scores. A parameter file says its network in the
description beside it (params.network_for); one trained on a folder says its classes
and input there too, and a folder must then have its classes.
"""

from dataclasses import replace

import numpy as np

from lowmem_cnn.files.config import DEFAULT_CONFIG, load_config
from lowmem_cnn.data.idx import DataOptions
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.model import Network


def network_config(config_name, params=None):
    """The network of the parameter file `params` as its description says it (else the
    config named, else the shipped config of its parameters: params.network_for), or
    without `params` the config named (else the default): (config, meta). `meta` is the
    description of a network trained on named classes (its "classes" and "input_shape"
    among them), None for MNIST-style digits."""
    if not params:
        return load_config(config_name or DEFAULT_CONFIG).network, None
    from lowmem_cnn.files.params import network_for

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
        self.budget, self.data_options = budget, data
        config, meta = network_config(config_name, params)
        self.data = None
        if data.is_folder():
            c, h, w = config.input_shape
            recorded = (meta or {}).get("training", {})
            if data.test_fraction is None and "test_split" in recorded:
                data = replace(data, test_fraction=recorded["test_split"],
                               split_seed=recorded["split_seed"])
            self.data = data.open(budget, (h, w), c if meta else None)
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
        from lowmem_cnn.training.run import check_image_shape

        data = self.data or self.data_options.open(self.budget)
        check_image_shape(self.network, data.test)
        return data

    def class_name(self, k: int) -> str:
        names = self.network.config.class_names
        return names[k] if names else str(k)
