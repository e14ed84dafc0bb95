"""Progress a person can read, on a terminal and in a log file.

On a terminal a long loop (training steps, evaluation windows, checkpoints, pretrained
revisions) shows a tqdm bar. Anywhere else (a Snakemake job's log file, a pipe) a bar
would be ``\\r``-joined redraws on one endless line, so there the same loop writes
plain lines instead: one at the start, one each time another ``every_percent`` of the
work is done, one whenever ``every_seconds`` pass without such a line (a slow loop
still says it is alive), and one at the end, e.g.::

    llama-preln/seed0:  40% (400/1000 steps), 1m12s elapsed, ~1m48s left, train_loss=3.412, val_ppl=30.5

The choice is made once, when the loop starts, from ``file`` (stderr by default, looked
up then, so a job that redirected stderr to its log gets lines).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

__all__ = ["LineProgress", "progress"]

EVERY_PERCENT = 10
EVERY_SECONDS = 60.0

_T = TypeVar("_T")


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """A tqdm look-alike (``update``, ``set_postfix``, ``close``, iteration, ``with``)
    that writes whole lines, never ``\\r``: see the module's docstring. ``clock``
    is injectable so that tests need not wait."""

    def __init__(self, iterable: Iterable[_T] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: TextIO | None = None,
                 every_percent: float = EVERY_PERCENT, every_seconds: float = EVERY_SECONDS,
                 enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._start_n = initial
        self.file = file if file is not None else sys.stderr
        self.every_percent, self.every_seconds = every_percent, every_seconds
        self.enabled, self._clock = enabled, clock
        self._postfix: dict[str, Any] = {}
        self._start = self._last_time = clock()
        self._last_n: int | None = None
        self._last_slot = self._slot(initial)
        self._closed = False
        self._emit()

    def _slot(self, n: int) -> int:
        """How many ``every_percent`` steps ``n`` has completed (-1 without a total)."""
        if not self.total:
            return -1
        return math.floor(100 * n / self.total / self.every_percent + 1e-9)

    def _line(self) -> str:
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            head += f"{math.floor(100 * self.n / self.total):3d}% "
        elapsed = self._clock() - self._start
        done = self.n - self._start_n
        if self.n > self._start_n:
            parts.append(f"{_duration(elapsed)} elapsed")
            if self.total and self.n < self.total and done > 0:
                parts.append(f"~{_duration(elapsed / done * (self.total - self.n))} left")
        parts += [f"{key}={value}" for key, value in self._postfix.items()]
        return f"{head}({parts[0]})" + "".join(f", {p}" for p in parts[1:])

    def _emit(self) -> None:
        if not self.enabled or self._last_n == self.n:
            return
        self.file.write(self._line() + "\n")
        self.file.flush()
        self._last_n, self._last_time = self.n, self._clock()

    def update(self, n: int = 1) -> None:
        """``n`` more units done; writes a line when another ``every_percent`` is done or
        ``every_seconds`` have passed since the last line."""
        self.n += n
        slot = self._slot(self.n)
        if slot > self._last_slot or self._clock() - self._last_time >= self.every_seconds:
            self._last_slot = max(slot, self._last_slot)
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown at the end of the following lines (e.g. the last validation loss)."""
        self._postfix = dict(values)

    def close(self) -> None:
        """The last line, where the loop stopped (unless that line was just written)."""
        if not self._closed:
            self._closed = True
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress made without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[_T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, file: TextIO | None = None,
             every_percent: float = EVERY_PERCENT, every_seconds: float = EVERY_SECONDS) -> Any:
    """A progress display over ``iterable`` (or ``total`` units, advanced by
    ``update``): a tqdm bar when ``file`` (default: the current stderr) is a terminal,
    otherwise a :class:`LineProgress` writing plain lines. ``enabled=False`` shows
    nothing. Both offer ``update``, ``set_postfix``, ``close``, iteration and ``with``."""
    file = file if file is not None else sys.stderr
    is_tty = getattr(file, "isatty", None)
    if enabled and is_tty is not None and is_tty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, mininterval=1.0,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file,
                        every_percent=every_percent, every_seconds=every_seconds, enabled=enabled)
