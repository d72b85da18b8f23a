"""Progress reporting that suits where it goes: a live bar on a terminal, and one plain line
per epoch either way (above the bar on a terminal, where it stays after the next epoch; no
carriage-return redraws when standard error is a file or a pipe)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """Advances in its own unit (batches, epochs, seconds, bytes); ``epoch(...)`` marks an
    epoch's end with its numbers, shown on the bar or printed as one line."""

    def __init__(self, total: float, desc: str, unit: str = "it", initial: float = 0,
                 enabled: bool = True, **bar_options: Any) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.done, self._shown, self.started = float(initial), round(initial), time.monotonic()
        self.bar = tqdm(total=round(total), initial=round(initial), desc=desc, unit=unit,
                        **bar_options) if self.interactive else None

    def advance(self, amount: float = 1) -> None:
        """Add ``amount`` units (a fraction accumulates: a bar of seconds moves every second)."""
        self.done += amount
        if self.bar is not None and round(self.done) > self._shown:
            self.bar.update(round(self.done) - self._shown)
            self._shown = round(self.done)

    def epoch(self, label: str, **numbers: float | str) -> None:
        """Report the end of an epoch as one line with its numbers: printed above a live bar
        (which keeps moving below it), or on its own where there is no bar."""
        if not self.enabled:
            return
        shown = ", ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in numbers.items())
        line = (f"{self.desc}: {label} ({self.done:.0f}/{self.total:.0f} {self.unit}, "
                f"{time.monotonic() - self.started:.0f} s){': ' + shown if shown else ''}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def announce(message: str) -> None:
    """One line on standard error before a step that is long and otherwise silent (a cache
    built on first use), printed above any live bar."""
    tqdm.write(message, file=sys.stderr)
