"""Progress on stderr: a line per phase, and a heartbeat when a phase runs long.

A report on SmolLM2 spent 17 s loading and 28 s in one compiled run without a word, and
Inductor's compile in ``optimize`` ran 80 s silent: long enough for a user to think it hung.
Each phase prints ``[elapsed] message``; when nothing was printed for ``heartbeat`` seconds
a thread prints what the phase is doing now, read from the main thread's stack (Dynamo
tracing a function, AOT autograd, Inductor generating or compiling code, the model running,
weights loading), without hooking into torch. ``-q`` prints nothing.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import threading
import time
from types import FrameType, TracebackType
from typing import TextIO

HEARTBEAT_S = 10.0
"""Seconds between heartbeats while a phase stays silent."""
FIRST_HEARTBEAT_S = 5.0
"""Seconds of silence in a phase before its first heartbeat: a user wonders after a few seconds, not ten."""


class Progress:
    """Callable ``say(message)``; use as a context manager to run the heartbeat thread."""

    def __init__(self, quiet: bool, *, heartbeat: float = HEARTBEAT_S, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.heartbeat = heartbeat
        self.first_heartbeat = min(FIRST_HEARTBEAT_S, heartbeat)
        self.stream = stream
        self.start = time.perf_counter()
        self.phase = "starting"
        self.phase_start = self.start
        self.last = self.start
        self._lock = threading.Lock()
        self.paused = False
        """Set while the output itself shows progress (streamed tokens), which a heartbeat line would break."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker = threading.get_ident()  # the thread whose stack the heartbeat describes

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self.phase, self.phase_start, self.last = message.strip(), now, now
        self._print(message, now)

    def _print(self, message: str, now: float) -> None:
        if self.quiet:
            return
        stream = self.stream or sys.stderr
        try:
            print(f"[{now - self.start:6.1f}s] {message}", file=stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work
            pass

    def __enter__(self) -> Progress:  # noqa: PYI034
        if not self.quiet and self.heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, name="graphfix-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def _beat(self) -> None:
        tick = min(1.0, self.first_heartbeat / 4)
        while not self._stop.wait(tick):
            now = time.perf_counter()
            with self._lock:
                wait = self.first_heartbeat if self.last == self.phase_start else self.heartbeat
                if self.paused or now - self.last < wait:
                    continue
                self.last = now
                phase, since = self.phase, now - self.phase_start
            doing = current_activity(self._worker)
            self._print(f"  ... {phase}: {since:.0f} s so far" + (f"; {doing}" if doing else ""), now)


def current_activity(thread_id: int | None) -> str:
    """What the thread is doing, in words, from its innermost frames (best effort, never raises)."""
    try:
        frame = sys._current_frames().get(thread_id) if thread_id is not None else None
        return describe_stack(frame)
    except Exception:  # noqa: BLE001 - a heartbeat must never fail the run
        return ""


_TORCH = os.sep + "torch" + os.sep
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


def describe_stack(frame: FrameType | None) -> str:
    """Name what a stack is doing: the function Dynamo is compiling and the compiler stage it is in, or the code
    that runs (compiled code and eager modules run through torch's frames too, so those alone mean running)."""
    traced = None
    stage = ""
    user = None
    in_module = False
    while frame is not None:  # innermost first
        code = frame.f_code
        path = code.co_filename
        if code.co_name == "_compile" and path.endswith(os.path.join("_dynamo", "convert_frame.py")):
            target = frame.f_locals.get("code")
            if target is not None and hasattr(target, "co_filename"):
                traced = f"{target.co_name} ({_short(target.co_filename)}:{target.co_firstlineno})"
        if not stage:
            if f"{_TORCH}_inductor{os.sep}" in path:
                stage = "Inductor generating and compiling kernels for"
            elif f"{_TORCH}_functorch{os.sep}" in path:
                stage = "AOT autograd tracing"
            elif f"{_TORCH}_dynamo{os.sep}" in path:
                stage = "Dynamo tracing"
        if not stage and (os.sep + "safetensors" + os.sep in path or os.sep + "gguf" + os.sep in path):
            stage = "reading weights"
        in_module = in_module or path.endswith(os.path.join("nn", "modules", "module.py"))
        if user is None and _TORCH not in path and os.sep + "graphfix" + os.sep not in path and \
                os.sep + "transformers" + os.sep not in path and not path.startswith("<") and \
                code.co_name != "<module>" and not path.startswith(_STDLIB):
            user = f"{code.co_name} ({_short(path)}:{frame.f_lineno})"
        frame = frame.f_back
    if traced:
        return f"{stage or 'compiling'} {traced}"
    if stage == "reading weights":
        return stage
    if user:
        return f"running {user}"
    return "running the model" if in_module else ""


def _short(path: str) -> str:
    marker = "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


__all__ = ["HEARTBEAT_S", "Progress", "current_activity", "describe_stack"]
