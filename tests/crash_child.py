"""Run `lowmem-cnn ARGS` in this process and crash it at a point the test chooses.

    python crash_child.py [--at-update N] [--at-epoch-end N] [--in-checkpoint N] \
        [--action kill|stop|SIGINT|SIGTERM] -- ARGS...

The point is counted in this process's own work, never in wall-clock time, so a
faster or a busier machine crashes at the same place:
- --at-update N: right after the N-th update this process made (before the
  checkpoint that update may be due);
- --at-epoch-end N: right after the N-th epoch this process finished, its
  evaluation and checkpoint written (between epochs);
- --in-checkpoint N: half-way through writing the N-th checkpoint of this process.
The action is SIGKILL (default), SIGSTOP (the test continues it with SIGCONT), or a
signal the CLI handles (SIGINT, SIGTERM), each sent by the process to itself.
"""

import argparse
import os
import signal
import sys

from lowmem_cnn.common.writing import HashingWriter
from lowmem_cnn.files import checkpoint
from lowmem_cnn.training.epochs import EpochLoop
from lowmem_cnn.training.run import TrainingRun
from lowmem_cnn.cli import main


def act(action):
    signum = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}.get(action) or getattr(signal, action)
    os.kill(os.getpid(), signum)


def install(options):
    if options.at_update:
        steps, done = EpochLoop.steps, [0]

        def counted_steps(self, plan):
            for item in steps(self, plan):
                done[0] += 1
                if done[0] == options.at_update:
                    act(options.action)
                yield item

        EpochLoop.steps = counted_steps
    if options.at_epoch_end:
        end_epoch, ended = TrainingRun._end_epoch, [0]

        def counted_end(self, epoch):
            record = end_epoch(self, epoch)
            ended[0] += 1
            if ended[0] == options.at_epoch_end:
                act(options.action)
            return record

        TrainingRun._end_epoch = counted_end
    if options.in_checkpoint:
        write, out = checkpoint.write_checkpoint, HashingWriter.write
        started, pieces = [0], [0]

        def counted_write(path, meta, arrays):
            started[0] += 1
            return write(path, meta, arrays)

        def piece(self, data):
            if started[0] == options.in_checkpoint:
                pieces[0] += 1
                if pieces[0] == 3:  # the header and the first array are written
                    act(options.action)
            return out(self, data)

        checkpoint.write_checkpoint = counted_write
        HashingWriter.write = piece


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--at-update", type=int)
    parser.add_argument("--at-epoch-end", type=int)
    parser.add_argument("--in-checkpoint", type=int)
    parser.add_argument("--action", default="kill")
    split = argv.index("--")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


if __name__ == "__main__":
    options, args = parse(sys.argv[1:])
    install(options)
    sys.exit(main(args, prog_name="lowmem-cnn"))
