"""Where a thread spends its wall time, by sampling its stack: cheap enough to leave on in a timed run.

The warm-start figure (a second process's start to first token) is spent in imports,
Dynamo, cache loads, autotuning and CUDA-graph recording, mostly in Python, and a
profiler that hooks every call distorts exactly that: under cProfile, Dynamo's tracing in
a warm start took 10.1 s against 6.6 s without it (docs/benchmarks.md, run A). This adds no
per-call hooks: a thread looks at the main thread's stack every ``interval`` seconds
(``sys._current_frames``), each look standing for the time since the one before, and
gives each function's inclusive seconds (how long it was on the stack) and self seconds
(how long it was the innermost frame)."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from typing import Any

from typing_extensions import Self  # typing.Self from Python 3.11; torch depends on typing_extensions


def _where(code: Any) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "/graphfix/"):
        if marker in path:
            path = path.split(marker, 1)[1] if marker == "site-packages/" else "graphfix/" + path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_firstlineno}({code.co_name})"


class StackSampler:
    """``with StackSampler() as s: ...`` then ``s.top()``: the functions that held the calling thread longest."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.inclusive: Counter[str] = Counter()  # seconds
        self.innermost: Counter[str] = Counter()
        self.samples = 0
        self._target = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="graphfix-stack-sampler", daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._target)
            now = time.perf_counter()
            elapsed, last = now - last, now  # a sample stands for the time since the last one (GIL waits included)
            if frame is None:
                continue
            self.samples += 1
            self.innermost[_where(frame.f_code)] += elapsed
            seen = set()
            while frame is not None:
                seen.add(_where(frame.f_code))
                frame = frame.f_back
            for name in seen:
                self.inclusive[name] += elapsed

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 25, inclusive: bool = True) -> list[tuple[str, float]]:
        """The ``n`` functions with the most seconds on the stack (``inclusive``) or innermost."""
        counts = self.inclusive if inclusive else self.innermost
        return [(name, round(seconds, 2)) for name, seconds in counts.most_common(n)]
