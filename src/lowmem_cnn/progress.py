"""A one-line progress display on stderr, redrawn at most twice a second.

(tqdm would do, but importing it brings in email, zipfile and importlib.metadata:
4.5 MiB of resident memory, measured, which a 64 MiB budget cannot spare.)
"""

import sys
import time


class Progress:
    def __init__(self, total: int, description: str, unit: str, initial: int = 0,
                 in_bytes: bool = False, stream=None):
        self.total, self.description, self.unit = total, description, unit
        self.done = self._started_at = initial
        self.in_bytes = in_bytes
        self.note = ""
        self.stream = stream or sys.stderr
        self._began = self._drawn = time.monotonic()
        self._width = 0

    def update(self, n: int):
        self.done += n
        if time.monotonic() - self._drawn >= 0.5:
            self._draw()

    def set_note(self, note: str):
        self.note = note

    def _amount(self, n):
        return f"{n / 2**20:,.1f} MiB" if self.in_bytes else f"{n:,}"

    def _draw(self):
        self._drawn = now = time.monotonic()
        rate = (self.done - self._started_at) / max(now - self._began, 1e-9)
        rate_text = f"{rate / 2**20:,.1f} MiB/s" if self.in_bytes else f"{rate:,.0f} {self.unit}/s"
        share = f"{100 * self.done // self.total:3d}% " if self.total else ""
        of = f"/{self._amount(self.total)}" if self.total else ""
        unit = "" if self.in_bytes else f" {self.unit}"
        line = f"{self.description}: {share}{self._amount(self.done)}{of}{unit}, {rate_text}"
        if self.note:
            line += f", {self.note}"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def close(self):
        """Clear the line: the caller prints the result."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
