"""What every command shares: the error users see on bad input, the runner that turns it into one
line on stderr and exit code 2, and the progress line of long work."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class InputError(ValueError):
    """Bad user input (a file, a folder or a value): one line naming it and the fix. CLIs exit 2."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a CLI's main; an ``InputError`` becomes one line on stderr and exit code 2."""
    try:
        main()
    except InputError as err:
        # An error raised in a DataLoader worker arrives with the worker's traceback: keep its last line.
        message = str(err).strip().splitlines()[-1] if str(err).strip() else "bad input"
        print(f"error: {message.removeprefix(f'{InputError.__module__}.InputError: ')}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


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
