"""The training options, each declared once (RUN_OPTIONS).

An option's declaration gives its `train` flag and help (cli.py), whether a config's
[training] has it and its default there (config.TrainingConfig), the check of its
value (the command line, a config, a checkpoint's settings and a parameter file's
description all use it), its field in training.Settings (so in checkpoints), whether
the parameter file's description records it (description.TRAINING_FIELDS), and what
`train --resume` does when it is given again. So whatever `train` accepts and
records, every reader of what it wrote accepts too.
"""

import math
from dataclasses import dataclass

from lowmem_cnn.data.augment import Augmentation
from lowmem_cnn.common.errors import LowmemError
from lowmem_cnn.engine.optimizers import OPTIMIZERS
from lowmem_cnn.training.schedule import SCHEDULES

# Far beyond any run this tool makes (an MNIST epoch takes seconds at best), small
# enough that nothing computed from them overflows: epochs, warm-up epochs, patience.
MAX_EPOCHS = 10**6
# The longest --augment text: "flip,crop:64" is 12 characters.
MAX_AUGMENT_TEXT = 100
# Without --checkpoint-every, the checkpoint is written after this much training time.
CHECKPOINT_SECONDS = 60


@dataclass(frozen=True)
class RunOption:
    name: str  # the Settings field, the [training] key and the description field
    kind: type  # int, float or str
    help: str
    default: object = None  # without the option (nor, for a config key, the config's)
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    metavar: str | None = None
    in_config: bool = False  # a key of a config's [training]
    described: bool = False  # recorded in the parameter file's description
    extends: bool = False  # --resume may raise it: the run goes on longer

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str:
        low = f"{self.low:g} ({'excluded' if self.low_open else 'included'})"
        high = "" if self.high is None else f" to {self.high:g}"
        return f"from {low}{high}" + (" (excluded)" if self.high_open else "")

    def check(self, value):
        """`value` if it is one this option takes; else ValueError saying why."""
        if value is None and self.default is None:
            return value
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{self.name} {value!r:.40} is not one of {', '.join(self.choices)}")
            return value
        if self.kind is str:  # augment: the one text option
            if not isinstance(value, str) or len(value) > MAX_AUGMENT_TEXT:
                raise ValueError(f"{self.name} {value!r:.40} is not a short text")
            try:
                Augmentation.parse(value)
            except LowmemError as err:
                raise ValueError(f"{self.name} {value!r:.40} is not one this lowmem-cnn knows "
                                 f"({err})") from None
            return value
        kinds = (int,) if self.kind is int else (int, float)
        if (not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value)
                or value < self.low or (self.low_open and value == self.low)
                or (self.high is not None and (value > self.high
                                               or (self.high_open and value == self.high)))):
            what = "a whole number" if self.kind is int else "a number"
            raise ValueError(f"{self.name} {value!r:.40} is not {what} {self.bounds()}")
        return value


RUN_OPTIONS = (
    RunOption("epochs", int, "Passes over the training data.", default=20, low=1, high=MAX_EPOCHS,
            in_config=True, extends=True),
    RunOption("batch_size", int, "Images per update (at most the number of training images).",
            default=100, low=1, high=10**9, in_config=True),
    RunOption("lr", float, "Learning rate.", default=0.001, low=0, low_open=True, high=1e6,
            in_config=True),
    RunOption("optimizer", str, "", default="adam", choices=tuple(OPTIMIZERS), in_config=True),
    RunOption("seed", int, "Seed of the initial weights and the shuffling.", default=0, low=0,
            high=2**32 - 1),
    RunOption("augment", str, "Change the training pictures a little each time: flip (mirror "
            "left to right), crop:P (pad P pixels, crop back: moves by up to P), e.g. "
            "flip,crop:4; none.", default="none", metavar="LIST", in_config=True, described=True),
    RunOption("weight_decay", float, "The book's L2 weight decay: LAMBDA/2 * sum of W^2 added to "
            "the loss (the weights, not biases or gamma/beta).", default=0.0, low=0, high=1e6,
            metavar="LAMBDA", in_config=True, described=True),
    RunOption("lr_schedule", str, "constant; cosine: down to 0 along half a cosine after "
            "--warmup; step: /10 at half and three quarters of the epochs.", default="constant",
            choices=SCHEDULES, in_config=True, described=True),
    RunOption("warmup", float, "With --lr-schedule cosine: epochs of a linear rise first.",
            default=0.0, low=0, high=MAX_EPOCHS, metavar="EPOCHS", in_config=True, described=True),
    RunOption("val_split", float, "Hold out this share of the training images (chosen by --seed, "
            "the same every run) and measure validation accuracy after each epoch; 0: none.",
            default=0.0, low=0, high=1, high_open=True, described=True),
    RunOption("keep", str, "Save the last epoch's parameters, or those of the epoch with the best "
            "validation accuracy (needs --val-split).", default="last", choices=("last", "best")),
    RunOption("patience", int, "Stop after N epochs without a better validation accuracy (needs "
            "--val-split).", low=1, high=MAX_EPOCHS, metavar="N"),
)
OPTIONS = {option.name: option for option in RUN_OPTIONS}
CONFIG_OPTIONS = tuple(option for option in RUN_OPTIONS if option.in_config)
DESCRIBED_OPTIONS = tuple(option for option in RUN_OPTIONS if option.described)

# A folder's drawn split (folders.py): the share of each class's pictures kept for
# testing, and the seed of the draw. Every command takes --test-split; a network
# trained on such a folder records both, so that eval tests on the same pictures.
TEST_SPLIT = RunOption("test_split", float, "A folder of <class>/ only: the share of each "
                       "class's pictures kept for testing, drawn the same way every run.",
                       default=0.2, low=0, high=1, low_open=True, high_open=True)
SPLIT_SEED = RunOption("split_seed", int, "The seed of a folder's drawn split.", default=0,
                       low=0, high=2**32 - 1)


def check_settings(values: dict) -> None:
    """Every declared option in `values` (a checkpoint's settings, say) is one its
    declaration takes: ValueError otherwise."""
    for option in RUN_OPTIONS:
        if option.name in values:
            option.check(values[option.name])
