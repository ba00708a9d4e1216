"""Capture what Dynamo does during a compiled run, as structured events.

This is the only module that knows how torch reports graph breaks and
recompiles. It listens to the ``graph_breaks`` and ``recompiles`` logging
artifacts (whose message formats torch's own tests pin: "Graph break in user
code at FILE:LINE", "Recompiling function F in FILE:LINE") and to Dynamo's
warnings, and counts graphs with a wrapping backend. Everything else in
graphfix works on the ``RawBreak`` / ``RawRecompile`` events produced here, so
a change in a future torch is mended in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from typing import Any

import torch

from graphfix.diagnose.findings import Location

GRAPH_BREAK_LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
RECOMPILE_LOGGERS = ("torch._dynamo.guards.__recompiles", "torch._dynamo.guards.__recompiles_verbose")
WARNING_LOGGERS = ("torch._dynamo.convert_frame", "torch._dynamo.eval_frame", "torch._dynamo")

_BREAK_HEAD = re.compile(r"Graph break(?: \(user stack suppressed due to duplicate graph break\))? in user code at (.+):(\d+)")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_GB_LINK = re.compile(r"gb(\d{4})\.html")
_RECOMPILE_HEAD = re.compile(r"Recompiling function (\S+) in (.+):(\d+)")
_GUARD_LINE = re.compile(r"^\s*- (?:\d+/\d+: )?(.*)$")
_LIMIT = re.compile(r"hit config\.(?:recompile|cache_size)_limit \((\d+)\)")


@dataclasses.dataclass
class RawBreak:
    """One graph break as Dynamo logged it."""

    location: Location
    reason: str
    gb_type: str | None
    gb_id: str | None
    stack: list[Location]
    phase: str
    skipped_frame: bool


@dataclasses.dataclass
class RawRecompile:
    """One recompilation: the function recompiled and the guards that failed."""

    function: str
    location: Location
    guards: list[str]
    phase: str


@dataclasses.dataclass
class RawLimit:
    """Dynamo gave up compiling a frame (recompile limit): it now runs in Python."""

    message: str
    location: Location | None
    phase: str


@functools.lru_cache(maxsize=1)
def gb_registry() -> dict[str, str]:
    """torch's graph-break registry as ``{gb_type: "GBxxxx"}`` (empty on a torch without one)."""
    path = os.path.join(os.path.dirname(torch._dynamo.__file__), "graph_break_registry.json")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    out: dict[str, str] = {}
    for gb_id, entries in data.items():
        for entry in entries:
            out.setdefault(entry.get("Gb_type", ""), gb_id)
    return out


def _source_line(file: str, line: int) -> str:
    import linecache

    return linecache.getline(file, line).strip()


def parse_stack(text: str) -> list[Location]:
    """Parse ``File "...", line N, in f`` frames (with their source lines) from a traceback text."""
    frames: list[Location] = []
    lines = text.splitlines()
    for i, raw in enumerate(lines):
        m = _FRAME.match(raw)
        if not m:
            continue
        src = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
        file, line = m["file"], int(m["line"])
        frames.append(Location(file, line, m["func"], src or _source_line(file, line)))
    return frames


def parse_gb_type(reason: str) -> tuple[str | None, str | None]:
    """The registry's graph-break type and id named in a break reason, if any."""
    registry = gb_registry()
    gb_type = None
    for line in reason.splitlines():
        candidate = line.strip()
        if candidate in registry:
            gb_type = candidate
            break
    link = _GB_LINK.search(reason)
    gb_id = f"GB{link.group(1)}" if link else (registry.get(gb_type) if gb_type else None)
    return gb_type, gb_id


def parse_break(message: str, phase: str) -> RawBreak | None:
    head = _BREAK_HEAD.search(message)
    if not head:
        return None
    file, line = head.group(1), int(head.group(2))
    reason = message.split("Graph Break Reason:", 1)[-1]
    stack_text = ""
    if "User code traceback:" in reason:
        reason, stack_text = reason.split("User code traceback:", 1)
    gb_type, gb_id = parse_gb_type(reason)
    stack = [f for f in parse_stack(stack_text) if not is_internal(f.file)]
    return RawBreak(
        location=Location(file, line, stack[-1].function if stack else "", _source_line(file, line)),
        reason=reason.strip(),
        gb_type=gb_type,
        gb_id=gb_id,
        stack=stack,
        phase=phase,
        skipped_frame="Skipping the function" in reason or "skipping frame" in reason.lower(),
    )


def parse_recompile(message: str, phase: str) -> RawRecompile | None:
    head = _RECOMPILE_HEAD.search(message)
    if not head:
        return None
    fn, file, line = head.group(1), head.group(2), int(head.group(3))
    guards: list[str] = []
    body = message.split("guard failure(s):", 1)[-1]
    for raw in body.splitlines():
        m = _GUARD_LINE.match(raw)
        if not m:
            continue
        text = m.group(1).strip()
        if not text or text.startswith(("User stack trace", "File ")) or raw.strip().startswith("-   "):
            continue
        if re.match(r"^\s*- \d+/\d+:", raw):
            guards.append(text)
    return RawRecompile(fn, Location(file, line, fn, _source_line(file, line)), guards, phase)


_INTERNAL = (
    os.sep + os.path.join("torch", "_dynamo") + os.sep,
    os.sep + os.path.join("torch", "nn", "modules", "module.py"),
    os.sep + os.path.join("torch", "utils", "_contextlib.py"),
    os.sep + os.path.join("torch", "_dynamo", "external_utils.py"),
    os.sep + os.path.join("graphfix", "diagnose") + os.sep,
    os.sep + os.path.join("graphfix", "optimize") + os.sep,
)


_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep


def is_stdlib(file: str) -> bool:
    """A file of Python's standard library (not a package installed into site-packages)."""
    path = os.path.realpath(file)
    return path.startswith(_STDLIB) and "site-packages" not in path


def is_internal(file: str) -> bool:
    """Frames of torch's own machinery and of graphfix's driver, hidden from users."""
    return any(part in file for part in _INTERNAL)


class _Collector(logging.Handler):
    def __init__(self, sink: Callable[[logging.LogRecord], None]) -> None:
        super().__init__(level=logging.DEBUG)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - trivial
        try:
            self._sink(record)
        except Exception:  # noqa: BLE001, S110 - never let reporting break the run being reported on
            pass


@dataclasses.dataclass
class Capture:
    """Events seen while the context is active; ``phase`` is set by the driver."""

    breaks: list[RawBreak] = dataclasses.field(default_factory=list)
    recompiles: list[RawRecompile] = dataclasses.field(default_factory=list)
    limits: list[RawLimit] = dataclasses.field(default_factory=list)
    graphs: int = 0
    graphs_by_phase: dict[str, int] = dataclasses.field(default_factory=dict)
    runs_by_phase: dict[str, int] = dataclasses.field(default_factory=dict)
    phase: str = ""

    def backend(self, inner: Any) -> Callable[..., Any]:
        """Wrap a backend (name or callable) so that every compiled graph is counted."""
        from torch._dynamo.backends.registry import lookup_backend

        compiler = lookup_backend(inner) if isinstance(inner, str) else inner

        def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            self.graphs += 1
            self.graphs_by_phase[self.phase] = self.graphs_by_phase.get(self.phase, 0) + 1
            compiled = compiler(gm, example_inputs)

            def run_counted(*args: Any) -> Any:
                # Breaks are logged when compiled; executions show how many graphs each call really runs.
                self.runs_by_phase[self.phase] = self.runs_by_phase.get(self.phase, 0) + 1
                return compiled(*args)

            return run_counted

        return counting_backend

    def _on_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Graph break" in message:
            event = parse_break(message, self.phase)
            if event:
                self.breaks.append(event)
                return
        if "Recompiling function" in message:
            rec = parse_recompile(message, self.phase)
            if rec:
                self.recompiles.append(rec)
                return
        limit = _LIMIT.search(message)
        if limit:
            stack = [f for f in parse_stack(message) if not is_internal(f.file)]
            where = re.search(r"function: '([^']+)' \(([^)]+):(\d+)\)", message)
            loc = Location(where.group(2), int(where.group(3)), where.group(1)) if where else (stack[-1] if stack else None)
            self.limits.append(RawLimit(message.splitlines()[0], loc, self.phase))


@contextlib.contextmanager
def capture_dynamo() -> Iterator[Capture]:
    """Reset Dynamo, listen to its logs for the duration, and restore logging after.

    Handlers are attached with ``propagate=False`` so the user's terminal is not
    flooded with torch's own graph-break logs while graphfix collects them.
    """
    cap = Capture()
    handler = _Collector(cap._on_record)
    torch._dynamo.reset()
    loggers = [logging.getLogger(n) for n in (GRAPH_BREAK_LOGGER, *RECOMPILE_LOGGERS)]
    warn_loggers = [logging.getLogger(n) for n in WARNING_LOGGERS]
    # Dynamo's own warnings (the same breaks, as prose) are collected, not printed over the report.
    saved = [(lg, lg.level, lg.propagate) for lg in loggers + warn_loggers[-1:]]
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    for lg in warn_loggers:
        lg.addHandler(handler)
    dynamo_logger = warn_loggers[-1]
    torch_handlers = [h for h in dynamo_logger.handlers if h is not handler]
    for h in torch_handlers:
        dynamo_logger.removeHandler(h)
    dynamo_logger.propagate = False
    disabled = logging.root.manager.disable
    logging.disable(logging.NOTSET)  # an application's logging.disable(...) must not hide Dynamo's events from graphfix
    dedup = getattr(torch._dynamo.utils, "graph_break_dup_warning_checker", None)
    if dedup is not None:
        # Dynamo prints a repeated break once; graphfix counts every occurrence and needs each stack.
        dedup.add = lambda *_args, **_kw: True
    try:
        yield cap
    finally:
        for lg in loggers + warn_loggers:
            lg.removeHandler(handler)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate
        for h in torch_handlers:
            dynamo_logger.addHandler(h)
        if dedup is not None:
            del dedup.add
        torch._logging.set_logs()
        logging.disable(disabled)
        torch._dynamo.reset()
