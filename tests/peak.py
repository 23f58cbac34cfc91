"""Run `lowmem-cnn` in a child and measure its peak RSS as the OS counts it (wait4).

Linux carries a process's high-water RSS into the program it execs, so a child that
pytest (hundreds of MiB) spawns directly reports pytest's peak as its own. The child
is therefore forked by a small launcher (a bare Python, about 10 MiB) and the
launcher reports the child's rusage.
"""

import json
import subprocess
import sys

_LAUNCHER = """
import json, os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n@peak " + json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]) + "\\n")
"""


def run_measured(*args, cwd=None, timeout=600):
    """(exit status, stdout, stderr, peak RSS in bytes) of `python -m lowmem_cnn ARGS`."""
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, "-m", "lowmem_cnn", *map(str, args)],
                            cwd=cwd, capture_output=True, text=True, timeout=timeout)
    err, _, report = result.stderr.rpartition("\n@peak ")
    code, kib = json.loads(report)
    return code, result.stdout, err, kib * 1024  # ru_maxrss is in KiB on Linux
