"""The command line: parse, build the objects, call them, print."""

import json
import re
import signal
import sys
import warnings
from functools import wraps
from pathlib import Path

import click

from lowmem_cnn import __version__, default_threads
from lowmem_cnn.data.augment import Augmentation
from lowmem_cnn.memory.budget import format_size, map_large_arrays, peak_rss, resolve_budget
from lowmem_cnn.files.config import DEFAULT_CONFIG, load_config
from lowmem_cnn.data.idx import NoBar
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.training.run_options import CHECKPOINT_SECONDS, RUN_OPTIONS, TEST_SPLIT

BUDGET_HELP = ("Peak RAM (resident set size) the process may use: bytes, or K/M/G/T and "
               "KiB..TiB (powers of 1024), KB..TB (powers of 1000), e.g. 512M, 2G, 1.5GiB. "
               "Default: half of the RAM available now (cgroup limit included).")


def _user_errors(command):
    """LowmemError becomes a one-line message and exit status 1; a budget too small is
    said in terms of --max-ram."""
    @wraps(command)
    def run(*args, **kwargs):
        from lowmem_cnn.memory.planner import BudgetError

        try:
            return command(*args, **kwargs)
        except BudgetError as err:
            raise click.ClickException(str(err.worded("--max-ram "))) from None
        except LowmemError as err:
            raise click.ClickException(str(err)) from None
    return run


def _common(command):
    options = [
        click.option("--max-ram", metavar="SIZE", help=BUDGET_HELP),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Directory of the four IDX files (gzipped or not), or a folder of "
                          "pictures: train/<class>/ and test/<class>/, or <class>/ only. Default: "
                          "$LOWMEM_CNN_DATA, else the user cache (MNIST is downloaded there)."),
        click.option("--image-size", metavar="N|HxW",
                     help="A folder's pictures are scaled (shorter side) and centre-cropped to "
                          "this.  [default: the network's input size, 28x28 for the shipped "
                          "configs; or the size the parameter file was trained at]"),
        _declared(TEST_SPLIT, help=f"{TEST_SPLIT.help}  [default: {TEST_SPLIT.default}; for "
                                   "a network trained on the folder, the share held out then]"),
        click.option("--strict", is_flag=True,
                     help="A damaged picture in a folder, or one too large for the budget, is "
                          "an error (by default it is skipped and counted in one warning line; "
                          "files that are not pictures are only counted, system files ignored)."),
        click.option("--config", "config_name",
                     help="Network config: a name in configs/ or a .toml path.  [default: a "
                          "parameter file's network, as PARAMS.json beside it describes it, else "
                          f"the shipped config of its parameters; else {DEFAULT_CONFIG}]"),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                     show_default=True, help="Float type of the arithmetic (float64: the book's)."),
        click.option("--threads", type=click.IntRange(min=1), default=default_threads(),
                     help="Micro-batches run at once, each on its own thread.  "
                          "[default: one per CPU core]"),
        click.option("--json", "as_json", is_flag=True,
                     help="End stdout with one line of JSON holding the results."),
    ]
    for option in reversed(options):
        command = option(command)
    return _user_errors(command)


def _progress(total, description, unit, initial=0, in_bytes=False):
    """A tqdm bar on stderr when stderr is a terminal (see main: tqdm is imported then)."""
    if not sys.stderr.isatty():
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total or None, desc=description, unit=unit, initial=initial,
                unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000, leave=False,
                file=sys.stderr, dynamic_ncols=True)


def _download_bar(total, description):
    return _progress(total, description, "B", in_bytes=True)


def _sayer(as_json):
    # With --json, stdout ends with the JSON line; the story goes to stderr.
    return lambda text: click.echo(text, err=as_json)


def _data_options(data_dir, image_size, test_split, strict, say):
    """The data options of a command (see data.DataOptions), with the CLI's bars,
    warnings and story."""
    from lowmem_cnn.data.idx import DataOptions

    return DataOptions(data_dir, _image_size(image_size), test_split, strict,
                       progress=_download_bar,
                       image_progress=lambda total, what: _progress(total, what, "img"),
                       warn=lambda message: click.echo(f"warning: {message}", err=True),
                       report=say)


def _image_size(text):
    """--image-size as (H, W): 'N' or 'HxW'; None without it."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not found or int(found[1]) < 1 or int(found[2] or 1) < 1:
        raise click.BadParameter(f"{text!r}: give N or HxW in pixels, e.g. 64 or 48x64",
                                 param_hint="--image-size")
    return int(found[1]), int(found[2] or found[1])


def _describe_plan(network, plan, say):
    sizes = {"rows": [], "images": []}  # by the layers' tile_unit
    for layer, size in zip(network.tiled, plan.tiles, strict=True):
        sizes[layer.tile_unit].append(f"{size:,}")
    tiles = ""
    if sizes["rows"]:
        tiles += f"conv column tiles of {', '.join(sizes['rows'])} rows; "
    if sizes["images"]:
        tiles += f"conv+pool tiles of {', '.join(sizes['images'])} images; "
    say(f"plan: {plan.threads} thread{'s' if plan.threads > 1 else ''} of {plan.micro_batch} images "
        f"at a time (evaluation {plan.eval_micro_batch}); {tiles}planned peak "
        f"{format_size(plan.peak)} (baseline {format_size(plan.baseline)})")


def _budget(max_ram, threads, say):
    """The budget in bytes, said with where it came from (--threads is checked first:
    before anything is made for its threads)."""
    from lowmem_cnn.memory.budget import check_threads, explain_default_budget

    check_threads(threads)
    if max_ram:
        budget, source = resolve_budget(max_ram, threads), f"--max-ram {max_ram}"
    else:
        budget, source = explain_default_budget(threads)
    say(f"budget: {budget:,} bytes ({format_size(budget)}, {source})")
    return budget


def _declared(option, help=None):
    """The click option of a run option as run_options declares it: its flag, bounds or
    choices, and help. No default: what the user gave is told from what they did not
    (see train: the config's default, or with --resume the checkpoint's)."""
    if option.choices:
        kind = click.Choice(option.choices)
    elif option.kind is int:
        kind = click.IntRange(option.low, option.high)
    elif option.kind is float:  # (FloatRange lets nan through: the check does not)
        kind = click.FloatRange(option.low, option.high, min_open=option.low_open,
                                max_open=option.high_open)
    else:
        kind = str

    def check(ctx, param, value):
        try:
            return None if value is None else option.check(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None

    if help is None:
        default = "" if option.default is None else format(option.default, "g" if option.kind
                                                              is float else "")
        if option.in_config:
            default = f"from the config, {default}"
        help = f"{option.help}  [default: {default}]" if default != "" else option.help
    return click.option(option.flag, option.name, type=kind, metavar=option.metavar,
                        callback=check, help=help)


def _run_options(command):
    """train's declared options (run_options.RUN_OPTIONS), in their order."""
    for option in reversed(RUN_OPTIONS):
        command = _declared(option)(command)
    return command


def _given_again(options: dict, **others) -> dict:
    """What the user gave with --resume, as starting.apply_given takes it: the declared
    options given, and of `others` (Settings field -> value) those given on the command
    line (not click's defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = {option.name: (option.flag, options[option.name]) for option in RUN_OPTIONS
             if options[option.name] is not None}
    parameters = {"config": "config_name", "test_fraction": "test_split"}
    for name, value in others.items():
        parameter = parameters.get(name, name)
        source = ctx.get_parameter_source(parameter)
        if value is not None and source not in (None, ParameterSource.DEFAULT,
                                                ParameterSource.DEFAULT_MAP):
            flag = next(p for p in ctx.command.params if p.name == parameter).opts[0]
            given[name] = (flag, str(value) if name == "out" else value)
    return given


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="lowmem-cnn")
def main():
    """Train and evaluate the convolutional networks of "Deep Learning from Scratch"
    on MNIST-style data, with peak RAM kept under --max-ram."""
    map_large_arrays()
    if sys.stderr.isatty():
        # before any plan measures the baseline: tqdm costs 3.5 MiB of RSS (measured),
        # which a run whose stderr is not a terminal (no bars) keeps for itself
        import tqdm  # noqa: F401


class _StopRequest:
    """SIGINT and SIGTERM let the current update finish; the run then checkpoints and stops."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request)

    def _request(self, signum, frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("params.pkl"),
              help="Parameter file written at the end (the book's format).")
@click.option("--limit", type=click.IntRange(min=1),
              help="Train on the first N training images only (quick runs).")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint file, written after every epoch.  [default: the --out path + .ckpt]")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Also write the checkpoint every N updates.  [default: after every "
                   f"{CHECKPOINT_SECONDS} s of training]")
@click.option("--resume", is_flag=True,
              help="Continue the run in the checkpoint where it stopped, with its settings.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw accuracy and loss per epoch into this PNG (needs the plot extra).")
@_run_options
@_common
def train(out, limit, checkpoint_path, checkpoint_every, resume, plot, max_ram, data_dir,
          image_size, test_split, strict, config_name, dtype, threads, as_json, **options):
    """Train the network on the training images; report test accuracy after each epoch.

    Ctrl-C or SIGTERM: the current update finishes, a checkpoint is written, and
    `lowmem-cnn train --resume` continues the run exactly. Another train on the same
    checkpoint or parameter file is refused while this one runs."""
    from lowmem_cnn.common.writing import check_file_names
    from lowmem_cnn.training import starting
    from lowmem_cnn.training.run import Checkpointing, Settings, Stopped

    check_file_names([("--out", out), ("--checkpoint", checkpoint_path), ("--plot", plot)])
    checkpointing = Checkpointing(checkpoint_path or out.with_name(out.name + ".ckpt"),
                                  checkpoint_every)
    # a resumed run's --out is known once its checkpoint is read: checked then too
    _check_train_outputs(None if resume else out, checkpointing.path, plot, data_dir)
    say = _sayer(as_json)
    data = _data_options(data_dir, image_size, test_split, strict, say)
    picture = "curves" if plot else None
    if options["augment"] is not None:
        options["augment"] = str(Augmentation.parse(options["augment"]))
    if resume:
        budget = resolve_budget(max_ram) if max_ram else None  # else the recorded one
        given = _given_again(options, out=out, limit=limit, config=config_name, dtype=dtype,
                             threads=threads, strict=strict, test_fraction=test_split,
                             image_size=image_size and list(_image_size(image_size)))
        try:
            run, _ = starting.resume(checkpointing, budget, data, say, picture, given)
        except starting.AlreadyFinished as done:
            say(f"{checkpointing.path}: this run finished all {done.settings.epochs} epochs; its "
                f"parameters are in {done.settings.out}")
            return
        try:
            _check_train_outputs(Path(run.settings.out), checkpointing.path, plot, data_dir)
        except LowmemError:
            run.release_locks()
            raise
    else:
        config_name = config_name or DEFAULT_CONFIG
        defaults = load_config(config_name).training
        for option in RUN_OPTIONS:  # not given: the config's, else the option's default
            if options[option.name] is None:
                options[option.name] = (getattr(defaults, option.name) if option.in_config
                                        else option.default)
        options["augment"] = str(Augmentation.parse(options["augment"]))
        settings = Settings(config=config_name, dtype=dtype, limit=limit, out=str(out),
                            max_ram=_budget(max_ram, threads, say), threads=threads, **options)
        run, _ = starting.start(settings, checkpointing, data, say, picture)
    # Ctrl-C or SIGTERM from here on asks the run to stop after its current update
    stop = _StopRequest()
    settings, loop = run.settings, run.loop
    _describe_plan(run.network, run.plan, say)
    say(f"{'resuming' if resume else 'training'} {run.network.config.name} ({settings.dtype}) on "
        f"{loop.count:,} images: {settings.epochs} epochs, batches of {loop.batch_size}, "
        f"{settings.optimizer} lr {settings.lr}" + _recipe(settings, run)
        + (f"; from epoch {loop.epochs_done + 1}, update {loop.position}" if resume else ""))
    report = _TrainReport(loop.count, settings.epochs, say)
    out = Path(settings.out)
    # a run that diverges is stopped and said in one line (training.run.Diverged), not in
    # NumPy's warnings on the way there
    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                            RuntimeWarning)
    try:  # the run holds its locks: let go of them however it ends
        history = run.run(report.updated, report.epoch_ends, report.epoch_starts, stop)
        run.finish(out)
    except Stopped as stopped:
        report.close()
        where = (f"in epoch {stopped.epoch} after update {stopped.position}" if stopped.position
                 else f"after epoch {stopped.epoch - 1}")
        click.echo(f"stopped by {signal.Signals(stop.signal).name} {where}; checkpoint written to "
                   f"{stopped.checkpoint}. Continue with: lowmem-cnn train --resume --checkpoint "
                   f"{stopped.checkpoint}", err=True)
        sys.exit(128 + stop.signal)
    finally:
        run.release_locks()  # and their files (a killed run leaves them: no obstacle)
    if plot:
        from lowmem_cnn.plotting import plot_curves

        plot_curves(history, plot)  # the run's arrays are released (run.finish)
        say(f"learning curves drawn in {plot}")
    if len(history) < settings.epochs:
        say(f"stopped after epoch {len(history)}: no better validation accuracy for "
            f"{settings.patience} epochs")
    best = run.best
    if best:
        kept = "kept" if settings.keep == "best" else "not kept (--keep last)"
        say(f"best validation accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}: its "
            f"parameters are {kept}")
    peak = peak_rss()
    say(f"saved {out}; peak RSS {peak:,} bytes ({format_size(peak)})")
    if as_json:
        click.echo(json.dumps({
            "epochs": settings.epochs,
            "best": best,
            "kept": "best" if settings.keep == "best" and best else "last",
            "train_accuracy": history[-1]["train_accuracy"],
            "test_accuracy": history[-1]["test_accuracy"],
            "seconds_per_epoch": [h["seconds"] for h in history],
            "history": history,
            "peak_rss_bytes": peak,
            "max_ram_bytes": settings.max_ram,
            "params": str(out),
            "train_images": loop.count,
            "checkpoint": str(checkpointing.path),
        }))


def _check_train_outputs(out, checkpoint, plot, data_dir):
    """train's files, checked before any work (files.check_outputs)."""
    from lowmem_cnn.common.writing import check_outputs

    # description.meta_path, without importing it before the plan measures the baseline
    # (0.5 MiB of RSS)
    description = out and out.with_name(out.name + ".json")
    outputs = [("--out", out), ("--out's description", description),
               ("--checkpoint", checkpoint), ("--plot", plot)]
    check_outputs(outputs, _data_files(data_dir, outputs))


def _data_files(data_dir, outputs) -> list:
    """The outputs that would replace or join the files of the data set a command reads,
    as its inputs (to be refused): in IDX files' directory, a file named as one of them
    (gzipped, decompressed, their checksums: a new one is read next time); in a folder of
    pictures, a file in any of its folders (read as a picture next time)."""
    import os

    from lowmem_cnn.data.idx import FILES, cache_dir, data_directory, is_image_folder

    directory, _ = data_directory(data_dir)
    folder = directory is not None and is_image_folder(directory)
    directory = os.path.realpath(directory or cache_dir() / "mnist")
    found = []
    for _, path in outputs:
        if path is None:
            continue
        inside = Path(os.path.relpath(os.path.realpath(path), directory)).parts
        if not inside or inside[0] == "..":
            continue
        if len(inside) > 1 if folder else (len(inside) == 1
                                           and inside[0].startswith(tuple(FILES.values()))):
            found.append((f"a file of the data set in {directory}", path))
    return found


def _check_reading_params(params, outputs, inputs=()):
    """The outputs of a command that reads the parameter file `params` (and its
    description) and `inputs`, checked before any work (files.check_outputs)."""
    from lowmem_cnn.common.writing import check_file_names, check_outputs
    from lowmem_cnn.files.description import meta_path

    check_file_names([("PARAMS", params)])
    check_outputs(outputs, [("the parameter file", params),
                            ("the parameter file's description", meta_path(params)), *inputs])


def _recipe(settings, run) -> str:
    """What the run does besides the book's plain training, for its first line."""
    parts = []
    if settings.lr_schedule != "constant":
        parts.append(f"{settings.lr_schedule} schedule"
                     + (f" after {settings.warmup:g} warm-up epochs" if settings.warmup else ""))
    if settings.weight_decay:
        parts.append(f"weight decay {settings.weight_decay:g}")
    if settings.augment != "none":
        parts.append(f"augmented ({settings.augment})")
    if run.validation is not None:
        parts.append(f"{len(run.validation):,} images held out for validation")
    return "".join(f", {part}" for part in parts)


class _TrainReport:
    """What train shows while the run goes: a progress bar per epoch, and a line after
    each epoch."""

    def __init__(self, images: int, epochs: int, say):
        self.images, self.epochs, self.say = images, epochs, say
        self.bar = NoBar()

    def epoch_starts(self, epoch, done):
        self.bar = _progress(self.images, f"epoch {epoch}/{self.epochs}", "img", initial=done)

    def updated(self, loss, n):
        self.bar.update(n)
        self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

    def epoch_ends(self, h):
        self.close()
        validation = (f"  validation {h['val_accuracy']:.4f}" if "val_accuracy" in h else "")
        self.say(f"epoch {h['epoch']:>3}: loss {h['loss']:.4f}  train accuracy "
                 f"{h['train_accuracy']:.4f} (first {h['train_sample']:,}){validation}  test "
                 f"accuracy {h['test_accuracy']:.4f}  {h['seconds']:.1f} s "
                 f"({self.images / h['seconds']:,.0f} img/s)")

    def close(self):
        self.bar.close()


@main.command("eval")
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), default=100,
              help="Images read at a time, at most 10,000 (memory is planned separately: any "
                   "batch size works within the budget).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test")
@click.option("--misclassified", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw the first 100 misclassified images, captioned true -> predicted, "
                   "into this PNG (needs the plot extra).")
@_common
def evaluate_command(params, batch_size, split, misclassified, max_ram, data_dir, image_size,
                     test_split, strict, config_name, dtype, threads, as_json):
    """Accuracy, per-class accuracy and confusion matrix of a parameter file."""
    from lowmem_cnn.session import evaluate_params

    outputs = [("--misclassified", misclassified)]
    _check_reading_params(params, outputs, _data_files(data_dir, outputs))
    say = _sayer(as_json)
    done = evaluate_params(params, _budget(max_ram, threads, say),
                           _data_options(data_dir, image_size, test_split, strict, say), config_name,
                           dtype, threads, split, batch_size, misclassified,
                           lambda network, plan: _describe_plan(network, plan, say), say)
    result, names, seconds = done.evaluation, done.classes, done.seconds
    peak = peak_rss()
    if as_json:
        click.echo(json.dumps({
            "accuracy": result.accuracy, "correct": result.correct, "n": result.n,
            "per_class_accuracy": result.per_class().tolist(),
            "confusion": result.confusion.tolist(), "split": split, "classes": names,
            "seconds": seconds, "peak_rss_bytes": peak, "max_ram_bytes": done.budget,
        }))
        return
    click.echo(f"accuracy: {result.accuracy:.4f} ({result.correct:,} of {result.n:,} {split} images)")
    click.echo("per class: " + "  ".join(f"{name}: {a:.4f}"
                                         for name, a in zip(names, result.per_class(), strict=True)))
    click.echo("confusion matrix (rows: true label, columns: predicted):")
    width = max(6, max(map(len, names)) + 1)
    click.echo(" " * width + "".join(f"{name[:width - 1]:>{width}}" for name in names))
    for name, row in zip(names, result.confusion, strict=True):
        click.echo(f"{name[:width - 1]:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    click.echo(f"{seconds:.2f} s; peak RSS: {peak:,} bytes ({format_size(peak)}); "
               f"budget {done.budget:,} bytes")


@main.command("profile-memory")
@click.option("--batch-size", type=click.IntRange(min=1), default=10_000,
              help="Images in the batch to profile (the book's columns are shown for this "
                   "many; at most 10,000 test images are run).")
@click.option("--train/--eval", "train", default=False,
              help="Profile forward and backward (training) or forward only.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the book's bytes against the tiled bytes per layer into this PNG "
                   "(needs the plot extra).")
@_common
def profile_memory(batch_size, train, plot, max_ram, data_dir, image_size, test_split, strict,
                   config_name, dtype, threads, as_json):
    """Per layer: what the book's whole-batch im2col would allocate against the tiles
    used here; then the planned peak and the measured peak RSS of running the batch."""
    from lowmem_cnn.common.writing import check_outputs
    from lowmem_cnn.profiling import profile_memory as profiled

    outputs = [("--plot", plot)]
    check_outputs(outputs, _data_files(data_dir, outputs))
    say = _sayer(as_json)
    done = profiled(_budget(max_ram, threads, say),
                    _data_options(data_dir, image_size, test_split, strict, say), batch_size, train,
                    config_name, dtype, threads, plot, say)
    rows, plan, measured = done.rows, done.plan, done.measured
    if as_json:
        click.echo(json.dumps({
            "batch_size": batch_size, "mode": "train" if train else "eval", "layers": rows,
            "micro_batch": plan.micro_batch, "planned_peak_bytes": plan.peak,
            "measured_peak_bytes": measured, "max_ram_bytes": done.budget,
        }))
        return
    click.echo(f"{batch_size:,} images, {'forward and backward' if train else 'forward'}, "
               f"{dtype}, {plan.micro_batch} images at a time")
    click.echo(f"{'layer':<36}{'output (C,H,W)':>16}{'book im2col':>16}{'columns here':>14}"
               f"{'tile':>14}")
    for row in rows:
        shape = "x".join(map(str, row["output_shape"]))
        book = f"{row['book_im2col_bytes']:,}" if row["book_im2col_bytes"] else "-"
        tiled = f"{row['tiled_bytes']:,}" if row["book_im2col_bytes"] or row["tiled_bytes"] else "-"
        tile = f"{row['tile']:,} {row['tile_unit']}" if row["tile_unit"] else "-"
        click.echo(f"{row['layer']:<36}{shape:>16}{book:>16}{tiled:>14}{tile:>14}")
    click.echo(f"planned peak: {plan.peak:,} bytes ({format_size(plan.peak)}); "
               f"measured peak RSS: {measured:,} bytes ({format_size(measured)}); "
               f"budget {done.budget:,} bytes")


@main.command()
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))  # each checked
@click.option("--config", "config_name",
              help="Network config: a name in configs/ or a .toml path.  [default: the "
                   "parameter file's network, as PARAMS.json beside it describes it, else the "
                   "shipped config of its parameters]")
@click.option("--max-ram", metavar="SIZE", help=BUDGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per image.")
@_user_errors
def predict(params, images, config_name, max_ram, as_json):
    """The class of each picture (PNG, JPEG, PGM, WebP, any size; needs the images extra).

    For a network trained on a folder of pictures, each is scaled and cropped as the
    folder's were, and the class is named. For MNIST's digits, each is made to look like
    MNIST's first: grayscale, white on black, centred in 28x28. A file that cannot be
    used (not a picture, damaged, too large, not a regular file) gets one error line
    instead; the exit status is then 1."""
    from lowmem_cnn.session import predict_pictures

    failed = 0
    for done in predict_pictures(params, images, config_name, max_ram):
        if done.error is not None:  # the picture cannot be used: one line, and the others go on
            _print_refusal(done.path, done.error, as_json)
            failed += 1
        else:
            _print_prediction(done.path, done.probabilities, done.classes, as_json)
    if failed:
        sys.exit(1)


def _print_refusal(path, err, as_json):
    if as_json:
        click.echo(json.dumps({"image": str(path), "error": str(err)}))
    else:
        click.echo(f"Error: {err}", err=True)


def _print_prediction(path, p, names, as_json):
    best = int(p.argmax())
    if as_json:
        click.echo(json.dumps({"image": str(path), "class": names[best], "digit": best,
                               "probabilities": [round(float(v), 6) for v in p]}))
    else:
        click.echo(f"{path}: {names[best]} ({p[best]:.3f})   "
                   + " ".join(f"{name}:{v:.3f}" for name, v in zip(names, p, strict=True)))


@main.command("export")
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_name",
              help="Network config: a name in configs/ or a .toml path.  [default: "
                   f"{DEFAULT_CONFIG}, or the one the parameter file was trained with]")
@click.option("--softmax", is_flag=True,
              help="End the model with a softmax: it gives probabilities, not scores.")
@click.option("--opset", type=click.IntRange(min=1), metavar="N",
              help="Stamp the model with this ONNX opset, from the network's oldest to the "
                   "installed onnx's newest.  [default: the oldest that expresses the network, "
                   "9 for the shipped configs]")
@_user_errors
def export_command(params, out, config_name, softmax, opset):
    """Write the network of a parameter file to OUT as an ONNX model, for onnxruntime
    and the tools that read ONNX (needs the onnx extra); see docs/onnx.md.

    The input is float32 [N, C, H, W]: pixels / 255. The model's metadata holds the
    class names, the input shape and the preprocessing; see the README."""
    try:  # Ctrl-C: one line, as train says it (importing onnx alone takes a second or more)
        from lowmem_cnn.files.export import export_params

        _check_reading_params(params, [("OUT", out)])
        done = export_params(params, out, config_name, softmax, opset)
    except KeyboardInterrupt:
        click.echo(f"export stopped by SIGINT; {out} is untouched or the whole new model", err=True)
        sys.exit(128 + signal.SIGINT)
    c, h, w = done.input_shape
    click.echo(f"wrote {done.path} ({done.bytes:,} bytes, ONNX opset {done.opset}, IR version "
               f"{done.ir_version}): input float32 [N, {c}, {h}, {w}] (pixels / 255), output "
               f"{done.output} of {len(done.classes)} classes ({', '.join(done.classes)})")


if __name__ == "__main__":
    sys.exit(main())
