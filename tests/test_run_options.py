"""The training options, declared once (run_options): what train accepts and records,
every reader accepts; --resume refuses what contradicts its checkpoint; a folder
network's test pictures are recorded, and eval tests on them."""

import json
import subprocess
import sys
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import click
import numpy as np
import pytest
from test_checkpoint import CRASH_CHILD
from test_folder_cli import named_folder

from conftest import run_lowmem
from lowmem_cnn.files.checkpoint import read_checkpoint, write_checkpoint
from lowmem_cnn.cli import main
from lowmem_cnn.files.config import TRAINING_KEYS, load_config
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.files.description import TRAINING_FIELDS, meta_path, read_description
from lowmem_cnn.files.params import write_params
from lowmem_cnn.files.pickles import read_params
from lowmem_cnn.training.run_options import RUN_OPTIONS, check_settings
from lowmem_cnn.training.run import Settings
from lowmem_cnn.training.starting import apply_given

NETWORK = ('[network]\ninput_shape = [1, 28, 28]\n[[network.layers]]\ntype = "affine"\n'
           'units = 10\n')


def files_in(directory: Path) -> dict:
    """The files under `directory` and their bytes (not the cache, nor a killed run's lock,
    which the next run on it clears)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "cache" not in p.parts and p.suffix != ".lock"}


def one_error_line(done) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), done.stderr
    return lines[-1]


# --- the declaration walked through every place ------------------------------------------


def extreme(option):
    """The most extreme value the option takes: what train may accept and record."""
    if option.choices:
        return option.choices[-1]
    if option.kind is str:
        return "flip,crop:64"
    if option.high is None or option.high_open:
        return option.low + 0.5 if option.kind is float else option.low + 1
    return option.kind(option.high)


def refused(option):
    """A value of the right type that the option refuses."""
    if option.choices or option.kind is str:
        return "bogus"
    return option.kind(option.high * 2) if option.high is not None else option.low - 1


@pytest.mark.parametrize("option", RUN_OPTIONS, ids=lambda option: option.name)
def test_every_declared_option_is_the_same_in_every_place(option, tmp_path, book_params):
    value, bad = extreme(option), refused(option)
    # the command line: train's flag takes the value, and refuses the bad one in its usage line
    ctx = main.commands["train"].make_context("train", [option.flag, str(value)])
    assert ctx.params[option.name] == value
    with pytest.raises(click.BadParameter) as refusal:
        main.commands["train"].make_context("train", [option.flag, str(bad)])
    assert option.flag in refusal.value.format_message()
    # a config's [training]: the same key, the same bounds (or no such key)
    config = tmp_path / "c.toml"
    config.write_text(NETWORK + f"[training]\n{option.name} = {json.dumps(value)}\n")
    if option.in_config:
        assert option.name in TRAINING_KEYS
        assert getattr(load_config(str(config)).training, option.name) == value
        config.write_text(NETWORK + f"[training]\n{option.name} = {json.dumps(bad)}\n")
        with pytest.raises(LowmemError, match=f"{option.name} 'bogus'|{option.name} {bad}"):
            load_config(str(config))
    else:
        with pytest.raises(LowmemError, match=f"has no {option.name}"):
            load_config(str(config))
    # the checkpoint: a Settings field, written and read back, checked as the flag is
    required = {"config": "simple_convnet", "dtype": "float32", "epochs": 1, "batch_size": 100,
                "lr": 0.001, "optimizer": "adam"}
    settings = Settings(**{**required, option.name: value})
    write_checkpoint(tmp_path / "run.ckpt", {"run": asdict(settings)}, {})
    recorded = read_checkpoint(tmp_path / "run.ckpt")[0]["run"]
    assert recorded[option.name] == value
    check_settings(recorded)
    with pytest.raises(ValueError, match=option.name):
        check_settings({**recorded, option.name: bad})
    # the description beside a parameter file: recorded if declared so, and read back
    assert (option.name in TRAINING_FIELDS) == option.described
    if option.described:
        training = {o.name: o.default for o in RUN_OPTIONS if o.described} | {"epoch": 1}
        path = tmp_path / "p.pkl"
        write_params(path, read_params(book_params, 10**8), load_config().network, np.float32,
                     {**training, option.name: value})
        assert read_description(path)["training"][option.name] == value
        write_params(path, read_params(book_params, 10**8), load_config().network, np.float32,
                     {**training, option.name: bad})
        with pytest.raises(LowmemError, match=f"training's {option.name}"):
            read_description(path)


def test_every_settings_field_the_cli_sets_is_declared_or_the_runs_own():
    declared = {option.name for option in RUN_OPTIONS}
    settings_fields = {field.name: field for field in fields(Settings)}
    assert declared <= set(settings_fields)
    for option in RUN_OPTIONS:  # a checkpoint without the field means the option's default
        assert settings_fields[option.name].default == option.default, option.name
        assert settings_fields[option.name].type is option.kind, option.name
    # the shipped configs' [training] keys are all declared ones
    assert set(TRAINING_KEYS) == {option.name for option in RUN_OPTIONS if option.in_config}
    for name in ("simple_convnet", "photos"):
        shipped = Path(load_config(name).source)
        if shipped.is_file():
            assert set(tomllib.loads(shipped.read_text()).get("training", {})) <= declared


# --- what a careless user gives: one line, nothing written ---------------------------------


@pytest.mark.parametrize("args", [
    ["--warmup", "1e308"], ["--weight-decay", "2e6", "--lr", "1e-9"], ["--val-split", "nan"],
    ["--val-split", "inf"], ["--lr", "nan"], ["--epochs", "2000000"], ["--test-split", "nan"],
    ["--augment", "bogus"], ["--seed", "-1"],
], ids=" ".join)
def test_an_option_out_of_bounds_is_refused_in_one_line(tmp_path, mnist_dir, args):
    done = run_lowmem("train", "--limit", "300", "--epochs", "1", "--max-ram", "256M",
                      "--data-dir", mnist_dir, *args, cwd=tmp_path)
    assert done.returncode == 2
    assert args[0] in one_error_line(done)
    assert files_in(tmp_path) == {}


def test_the_largest_accepted_values_are_read_back_by_eval(tmp_path, mnist_dir):
    """--weight-decay 1e6 with a tiny rate trains, and eval reads what it wrote."""
    trained = run_lowmem("train", "--weight-decay", "1e6", "--lr", "1e-12", "--warmup", "1e6",
                         "--lr-schedule", "cosine", "--limit", "300", "--epochs", "1",
                         "--max-ram", "256M", "--data-dir", mnist_dir, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_lowmem("eval", "params.pkl", "--max-ram", "256M", "--data-dir", mnist_dir,
                           cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr


# --- --resume: the checkpoint's settings, or more epochs ---------------------------------

RUN = ["train", "--limit", "300", "--epochs", "1", "--batch-size", "50", "--checkpoint-every", "1",
       "--max-ram", "256M"]


@pytest.fixture
def stopped_run(tmp_path, mnist_dir):
    """A run on MNIST killed after its second update (6 an epoch), its checkpoint written."""
    crashed = subprocess.run([sys.executable, str(CRASH_CHILD), "--at-update", "2", "--", *RUN,
                              "--data-dir", str(mnist_dir)], cwd=tmp_path, capture_output=True,
                             text=True)
    assert crashed.returncode == -9, crashed.stderr
    assert (tmp_path / "params.pkl.ckpt").exists()
    return tmp_path


def test_resume_names_each_option_that_contradicts_the_checkpoint(stopped_run, mnist_dir):
    before = files_in(stopped_run)
    done = run_lowmem("train", "--resume", "--lr", "0.1", "--augment", "flip", "--config",
                      "photos", "--batch-size", "50", "--data-dir", mnist_dir, cwd=stopped_run)
    assert done.returncode == 1
    line = one_error_line(done)
    assert "--lr 0.1 contradicts the checkpoint's 0.001" in line
    assert "--augment flip contradicts the checkpoint's none" in line
    assert "--config photos contradicts the checkpoint's simple_convnet" in line
    assert "--batch-size" not in line  # given as recorded: fine
    assert files_in(stopped_run) == before


def test_resume_with_more_epochs_applies_them_and_says_so(stopped_run, mnist_dir):
    done = run_lowmem("train", "--resume", "--epochs", "2", "--lr", "0.001", "--json",
                      "--data-dir", mnist_dir, cwd=stopped_run)
    assert done.returncode == 0, done.stderr
    assert "--resume: --epochs 2 extends the run (the checkpoint's 1)" in done.stderr
    assert len(json.loads(done.stdout.splitlines()[-1])["history"]) == 2


def test_resume_of_an_mnist_run_on_a_folder_is_one_line(stopped_run, mnist_dir):
    root = named_folder(mnist_dir, stopped_run / "pictures", limit=20)
    before = files_in(stopped_run)
    done = run_lowmem("train", "--resume", "--data-dir", root, cwd=stopped_run)
    assert done.returncode == 1
    assert "is a folder of pictures; this run was started on MNIST-style IDX" in one_error_line(done)
    assert files_in(stopped_run) == before


def test_a_checkpoint_writes_its_parameters_only_where_the_user_works(stopped_run, mnist_dir,
                                                                      tmp_path_factory):
    """A shared checkpoint names its run's --out: one outside the current folder and the
    checkpoint's is not written unless the user gives --out."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    victim = elsewhere / "good.pkl"
    victim.write_bytes(b"the user's own file")
    checkpoint = stopped_run / "params.pkl.ckpt"
    meta, arrays = read_checkpoint(checkpoint)
    meta["run"]["out"] = str(victim)
    write_checkpoint(checkpoint, meta, arrays)
    before = files_in(stopped_run)
    done = run_lowmem("train", "--resume", "--data-dir", mnist_dir, cwd=stopped_run)
    assert done.returncode == 1
    assert f"saves its parameters to {victim}, outside this folder" in one_error_line(done)
    assert victim.read_bytes() == b"the user's own file" and files_in(stopped_run) == before
    done = run_lowmem("train", "--resume", "--checkpoint", checkpoint, "--out", "mine.pkl",
                      "--data-dir", mnist_dir, cwd=stopped_run)
    assert done.returncode == 0, done.stderr
    assert f"--resume: saving to mine.pkl (the checkpoint's run named {victim})" in done.stdout
    assert (stopped_run / "mine.pkl").exists() and victim.read_bytes() == b"the user's own file"


def recorded_settings(**changes):
    return Settings("simple_convnet", "float32", 3, 100, 0.001, "adam", **changes)


def test_more_epochs_of_a_schedule_laid_out_over_fewer_are_refused():
    settings = recorded_settings(lr_schedule="cosine")
    with pytest.raises(LowmemError, match=r"--epochs 5 contradicts the checkpoint's 3 \(its cosine"):
        apply_given(settings, {"epochs": ("--epochs", 5)})
    with pytest.raises(LowmemError, match="--epochs 2 contradicts the checkpoint's 3"):
        apply_given(recorded_settings(), {"epochs": ("--epochs", 2)})
    said = []
    settings = recorded_settings()
    apply_given(settings, {"epochs": ("--epochs", 4), "out": ("--out", "./params.pkl"),
                           "test_fraction": ("--test-split", 0.3)}, said.append)
    assert settings.epochs == 4 and len(said) == 1  # a run on IDX files has no test split


# --- a folder network's test pictures ---------------------------------------------------


def test_eval_tests_on_the_pictures_held_out_when_training(tmp_path, mnist_dir):
    root = named_folder(mnist_dir, tmp_path / "pictures", limit=300)
    trained = run_lowmem("train", "--data-dir", root, "--test-split", "0.3", "--limit", "300",
                         "--epochs", "1", "--max-ram", "256M", "--json", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    held_out = json.loads(trained.stdout.splitlines()[-1])["history"][-1]["test_sample"]
    training = json.loads(meta_path(tmp_path / "params.pkl").read_text())["training"]
    assert (training["test_split"], training["split_seed"]) == (0.3, 0)

    def evaluated(*args):
        done = run_lowmem("eval", "params.pkl", "--data-dir", root, "--max-ram", "256M", "--json",
                          *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])["n"], done.stderr

    n, said = evaluated()
    assert n == held_out
    assert "testing on the 30% of pictures held out when training (seed 0)" in said
    n, said = evaluated("--test-split", "0.2")  # told otherwise: told the difference
    assert n < held_out and "training held out 30% (seed 0)" in said
    # a description from before the split was recorded still loads: --test-split's default
    description = json.loads(meta_path(tmp_path / "params.pkl").read_text())
    for key in ("test_split", "split_seed"):
        del description["training"][key]
    meta_path(tmp_path / "params.pkl").write_text(json.dumps(description))
    n, said = evaluated()
    assert n < held_out and "is not recorded" in said
