"""One progress policy for every long loop: a bar on a terminal, a plain line every 15 s elsewhere.

Bars and lines go to stderr; setting the ``segcal`` logger quieter than INFO (``segcal -q``) silences both.
CI logs get periodic lines instead of thousands of carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("segcal")

#: seconds between plain progress lines when stderr is not a terminal
LINE_INTERVAL_S = 15.0


class _Lines:
    """tqdm's ``update``/``close`` interface, printing ``desc: k/n (x img/s)`` lines at most every few seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._start = self._last = time.perf_counter()
        self._start_n = initial

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self._last >= LINE_INTERVAL_S:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:.2f} {self.unit}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n > self._start_n:
            self._line(time.perf_counter())

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class _Silent(_Lines):
    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, enabled: bool = True, unit: str = "img", initial: int = 0) -> Any:
    """A context manager with ``update(k)``: tqdm on a terminal, periodic plain lines otherwise, nothing when
    ``enabled`` is False or the ``segcal`` logger was set quieter than INFO (``segcal -q``)."""
    if not enabled or (log.level != logging.NOTSET and log.level > logging.INFO):
        return _Silent(total, desc, unit, initial)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False)
    return _Lines(total, desc, unit, initial)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (test capture, redirected streams)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(verbosity: int = 0) -> None:
    """Route the ``segcal`` logger to stderr: ``verbosity`` −1 = warnings only (``-q``), 0 = info, 1 = debug."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    log.setLevel(level)
    if not any(getattr(h, "_segcal", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._segcal = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False


__all__ = ["configure_logging", "progress_bar"]
