"""Progress of a replay: a bar on a terminal, plain periodic log lines otherwise.

Fed from the transactional loop's commit hook, so every figure counts committed work only:
documents (offsets) done of the range, documents/s, kept so far and the ETA.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time

log = logging.getLogger("streamfilter.replay")


def eta_text(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts committed work against a fixed total (offsets of the range).

    `style`: "bar" (redrawn in place on `stream`), "log" (a log line every `interval_s`) or "none".
    """

    def __init__(self, total: int, done: int = 0, *, style: str = "auto", interval_s: float = 10.0,
                 stream=None, label: str = "replay"):
        self.stream = stream or sys.stderr
        if style == "auto":
            style = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.style = style
        self.total = max(total, 0)
        self.done = done  # offsets of the range behind the committed position (includes a resumed start)
        self.documents = 0  # records handled by this process
        self.kept = 0
        self.rejected = 0
        self.dlq = 0
        self.label = label
        self.interval_s = interval_s
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def add(self, offsets: int, documents: int, kept: int = 0, rejected: int = 0, dlq: int = 0) -> None:
        with self._lock:
            self.done += offsets
            self.documents += documents
            self.kept += kept
            self.rejected += rejected
            self.dlq += dlq
            now = time.monotonic()
            due = 0.2 if self.style == "bar" else self.interval_s
            if now - self._last_draw >= due:
                self._last_draw = now
                self._draw(final=False)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.documents / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        remaining = self.total - self.done
        eta = remaining / rate if rate > 0 else math.inf
        share = f"{self.kept / self.documents:.1%}" if self.documents else "-"
        return (f"{self.done}/{self.total} offsets, {self.documents} documents, {rate:,.0f} docs/s, "
                f"kept {self.kept} ({share}), ETA {eta_text(eta)}")

    def _draw(self, final: bool) -> None:
        if self.style == "none":
            return
        if self.style == "log":
            log.info("%s: %s", self.label, self.line())
            return
        width = 28
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(width * min(max(fraction, 0.0), 1.0)))
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {fraction:6.1%} {self.line()}\x1b[K")
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            self._draw(final=True)
