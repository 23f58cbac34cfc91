"""Starting a training run and resuming one from its checkpoint: the run lock on the
checkpoint and on the parameter file, the settings given again on resume, and the
network, the plan and the data of the run, made in the order that refuses a budget too
small before the data is read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.data.augment import Augmentation
from lowmem_cnn.training.run import Checkpointing, Settings, training_run
from lowmem_cnn.training.run_options import OPTIONS


class AlreadyFinished(Exception):
    """`resume` of a run that finished all its epochs; `settings` says where its
    parameters are."""

    def __init__(self, settings: Settings):
        super().__init__(f"the run finished all {settings.epochs} epochs")
        self.settings = settings


def _finished_or_unfinished(path: Path):
    """The metadata of a checkpoint at `path` (None if there is none)."""
    from lowmem_cnn.files.checkpoint import read_checkpoint

    if not path.exists():
        return None
    try:
        meta, _ = read_checkpoint(path)
    except LowmemError as err:
        raise LowmemError(f"{err}; remove it or choose another --checkpoint") from None
    return meta


def start(settings: Settings, checkpointing: Checkpointing, data, report=lambda text: None,
          picture: str | None = None):
    """A new run of `settings` on `data` (data.DataOptions) with its checkpoint:
    (TrainingRun, data set).

    The checkpoint and the parameter file are locked first (another live run on
    either is refused). A folder of pictures is opened next: it makes the network's
    input and scores. Then the budget is checked against the network before any
    array is allocated, and (IDX files) before the data is read or downloaded; with
    `picture`, room is left for drawing it at the end (planner.check_picture_room)."""
    from lowmem_cnn.files.config import load_config
    from lowmem_cnn.common.locks import RunLock, released_on_error
    from lowmem_cnn.memory.planner import decode_room

    with released_on_error() as locks:
        locks.append(RunLock(checkpointing.path, "checkpoint"))
        locks.append(RunLock(Path(settings.out), "parameter file"))
        meta = _finished_or_unfinished(checkpointing.path)
        if meta is not None and not meta.get("finished"):
            raise LowmemError(f"{checkpointing.path} holds an unfinished run: continue it with "
                              "--resume, or choose another --checkpoint")
        folder = None
        if data.is_folder():
            folder = data.open(lambda: decode_room(settings.max_ram),
                               load_config(settings.config).network.input_shape[1:])
            settings.input_shape, settings.classes = list(folder.input_shape), list(folder.classes)
            settings.test_fraction, settings.split_seed = folder.test_fraction, folder.seed
            settings.strict = data.strict
        return _build(settings, checkpointing,
                      lambda run: folder or data.open(lambda: decode_room(run.budget)), report,
                      locks, picture)


def resume(checkpointing: Checkpointing, max_ram: int | None, data, report=lambda text: None,
           picture: str | None = None, given: dict | None = None):
    """The run recorded in a checkpoint, ready to continue where it stopped, with its
    settings and plan (a budget may be given anew), on `data` (data.DataOptions: a
    folder is read as the run began): (TrainingRun, data set). Raises AlreadyFinished
    for a run that is over. `given`: the settings the user gave again (see
    apply_given): the same as recorded, or more epochs."""
    from lowmem_cnn.memory.budget import check_threads, format_size
    from lowmem_cnn.files.checkpoint import check_run_meta, read_checkpoint
    from lowmem_cnn.common.locks import RunLock, released_on_error
    from lowmem_cnn.memory.planner import decode_room

    with released_on_error() as locks:
        locks.append(RunLock(checkpointing.path, "checkpoint"))
        meta, arrays = read_checkpoint(checkpointing.path)
        check_run_meta(checkpointing.path, meta)  # its run's fields are Settings', checked
        settings = Settings(**meta["run"])
        # before the network makes a workspace and gradients for each (its arithmetic
        # needs all of them: resume it where there are as many cores)
        check_threads(settings.threads, f"{checkpointing.path}: this run was started with --threads",
                      "resume it where it has as many")
        if meta.get("finished"):
            raise AlreadyFinished(settings)
        apply_given(settings, given or {}, report)
        if "out" not in (given or {}):
            _check_recorded_out(settings.out, checkpointing.path)
        if settings.classes is None and data.is_folder():  # told before anything is opened
            from lowmem_cnn.data.idx import data_directory

            directory, source = data_directory(data.data_dir)
            raise LowmemError(f"{source or directory} is a folder of pictures; this run was started "
                              "on MNIST-style IDX files: give their directory as --data-dir")
        locks.append(RunLock(Path(settings.out), "parameter file"))
        source = "recorded in the checkpoint"
        if max_ram is not None:
            settings.max_ram, source = max_ram, "--max-ram"
        report(f"budget: {settings.max_ram:,} bytes ({format_size(settings.max_ram)}, {source})")

        def open_data(run):
            if settings.classes is None:
                return data.open(lambda: decode_room(run.budget))
            classes = ", ".join(settings.classes)
            if not data.is_folder():  # told before anything is opened (or downloaded)
                raise LowmemError(f"this run was started on a folder of pictures (classes {classes});"
                                  f" give it with --data-dir")
            c, h, w = settings.input_shape  # a folder, read as the run began
            recorded = replace(data, image_size=(h, w), test_fraction=settings.test_fraction,
                               split_seed=settings.split_seed or 0, strict=settings.strict)
            opened = recorded.open(lambda: decode_room(run.budget), (h, w), c)
            settings.split_seed = opened.seed  # (a checkpoint from before split_seed)
            if list(opened.classes) != settings.classes:
                raise LowmemError(f"{opened.source}: not the folder of classes {classes} the run "
                                  f"was started on")
            return opened

        return _build(settings, checkpointing, open_data, report, locks, picture, meta, arrays)


def _check_recorded_out(out: str, checkpoint: Path):
    """A checkpoint is shared like a parameter file, so the parameter file it names is
    written only where the user works: below the current folder or the checkpoint's."""
    target = Path(out).resolve()
    if not any(target.is_relative_to(place) for place in (Path.cwd().resolve(),
                                                          Path(checkpoint).resolve().parent)):
        raise LowmemError(f"{checkpoint}: its run saves its parameters to {out}, outside this "
                          "folder and the checkpoint's: give --out to say where")


# What `given` (resume) may hold besides the declared options: the settings of the data
# a folder is read with, which a run on IDX files does not have (as a new run ignores them).
_FOLDER_SETTINGS = ("test_fraction", "image_size")


def apply_given(settings: Settings, given: dict, report=lambda text: None):
    """The settings given again to a resumed run (`given`: Settings field -> (the option
    as the user names it, the value as Settings holds it; "image_size": [H, W])): each
    must be the recorded one, except that a declared option that `extends` (epochs) may
    be larger when the rate does not depend on it (a constant schedule); it is then
    applied, and said. Anything else is refused in one line naming each option."""
    def shown(value):
        if isinstance(value, list):  # image_size
            return "x".join(map(str, value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    contradictions = []
    for name, (flag, value) in given.items():
        recorded = (settings.input_shape[1:] if settings.input_shape else None
                    ) if name == "image_size" else getattr(settings, name)
        if recorded is None and name in _FOLDER_SETTINGS:
            continue  # a run on IDX files: as a new run, it has no use for them
        if name == "out":  # where the parameters go is the user's to say, not the run's
            if Path(value) != Path(recorded):
                report(f"--resume: saving to {value} (the checkpoint's run named {recorded})")
                settings.out = value
            continue
        if value == recorded:
            continue
        option = OPTIONS.get(name)
        if option and option.extends and value > recorded and settings.lr_schedule == "constant":
            report(f"--resume: {flag} {shown(value)} extends the run (the checkpoint's "
                   f"{shown(recorded)})")
            setattr(settings, name, value)
            continue
        why = ""
        if option and option.extends and value > recorded:
            why = f" (its {settings.lr_schedule} schedule is laid out over {shown(recorded)})"
        contradictions.append(f"{flag} {shown(value)} contradicts the checkpoint's "
                              f"{shown(recorded)}{why}")
    if contradictions:
        raise LowmemError(f"--resume: {'; '.join(contradictions)}; a resumed run keeps its "
                          "settings: leave these out, or start a new run with another --checkpoint")


def _build(settings, checkpointing, open_data, report, locks, picture, meta=None, arrays=None):
    from lowmem_cnn.files.config import describe_network, load_config, network_from_description
    from lowmem_cnn.engine.model import Network
    from lowmem_cnn.memory.planner import check_parameters_fit

    if settings.network is not None:  # resumed: the network the run began with
        try:  # (its initial weights are not described: the checkpoint has the weights)
            config = network_from_description(settings.network)
        except ValueError as err:
            raise LowmemError(f"{checkpointing.path}: its network: {err}") from None
    else:
        config = load_config(settings.config).network
        if settings.classes is not None:
            config = config.for_data(settings.input_shape, settings.classes)
        settings.network = describe_network(config)
    network = Network(config, np.dtype(settings.dtype), settings.threads)
    run = training_run(network, settings.optimizer, settings.lr, settings.max_ram, settings.epochs,
                       settings.batch_size, seed=settings.seed, limit=settings.limit,
                       checkpointing=checkpointing, recorded_plan=meta["plan"] if meta else None,
                       settings=settings, locks=locks, weight_decay=settings.weight_decay,
                       augmentation=Augmentation.parse(settings.augment),
                       lr_schedule=settings.lr_schedule, warmup=settings.warmup,
                       val_split=settings.val_split, keep_best=settings.keep == "best",
                       patience=settings.patience)
    # before any parameter exists (the optimizer's state copies them)
    check_parameters_fit(network, settings.max_ram, run.optimizer.state_copies)
    try:  # what the parameter file will say, refused now rather than after training
        network_from_description(settings.network)
    except ValueError as err:
        raise LowmemError(f"{config.name}: cannot be described beside its parameter file: "
                          f"{err}") from None
    network.init_params(run.rng)
    run.plan_without_data(picture)
    data = open_data(run)
    run.use_data(data.train, data.test)
    if meta is not None:
        run.restore(meta, arrays)
    return run, data
