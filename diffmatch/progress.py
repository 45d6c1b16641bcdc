"""The progress line of long commands: done/total, rate and ETA, at most once a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints ``name: done/total unit, rate, ETA`` at most once a second and when finished."""

    def __init__(self, name: str, total: int, unit: str, *, file: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.name, self.total, self.unit, self.file, self.enabled = name, total, unit, file, enabled
        self.done, self.start, self.shown = 0, time.monotonic(), 0.0

    def step(self, n: int = 1) -> None:
        self.done, now = self.done + n, time.monotonic()
        if self.enabled and (now - self.shown >= 1.0 or self.done >= self.total):
            self.shown, rate = now, self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            line = f"{self.name}: {self.done}/{self.total} {self.unit}, {rate:.3g}/s, ETA {eta:.0f}s"
            print(line, file=self.file or sys.stdout, flush=True)
