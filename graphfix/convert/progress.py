"""A one-line progress display on stderr: tensor count and bytes, rewritten in place.

Converting a 70B checkpoint takes many minutes; a line that says how far along
it is tells the user it is not stuck. It is shown only on a terminal so logs
and CI output stay clean, and never when the caller asked for quiet.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (decimal units, as disk sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Progress:
    """Counts tensors and bytes written; prints ``[i/n] name  done/total`` when enabled."""

    def __init__(self, total_items: int, total_bytes: int, *, enabled: bool = True, stream: TextIO | None = None,
                 label: str = "") -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.total_items, self.total_bytes = total_items, total_bytes
        self.items = 0
        self.bytes = 0
        self.label = label
        self.start = time.perf_counter()
        self._width = 0

    def update(self, name: str, nbytes: int) -> None:
        """Record one more tensor (``nbytes`` of output) and redraw the line."""
        self.items += 1
        self.bytes += nbytes
        if not self.enabled:
            return
        rate = self.bytes / max(time.perf_counter() - self.start, 1e-9)
        line = (f"{self.label}[{self.items}/{self.total_items}] {human_bytes(self.bytes)}/"
                f"{human_bytes(self.total_bytes)} {human_bytes(rate)}/s {name}")
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """End the progress line so later output starts on a fresh line."""
        if self.enabled and self.items:
            self.stream.write("\n")
            self.stream.flush()
