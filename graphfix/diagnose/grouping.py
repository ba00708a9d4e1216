"""Group raw compile events into findings: one per site, with module paths, a category and the fixing pass.

The same break hit in 30 layers and 17 steps is one finding with ``occurrences`` counted and
module paths collapsed; a recompile is attributed to the guard that failed; a compile failure
to the innermost user frame of its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from graphfix.diagnose import capture as cap_mod
from graphfix.diagnose.findings import Category, Finding, Kind, Location, Severity
from graphfix.diagnose.modulemap import ModuleIndex
from graphfix.diagnose.taxonomy import SUGGESTIONS, classify_break, classify_recompile
from graphfix.rewrite.pass_manager import available_passes


def add_not_compiled(findings: OrderedDict, calls: int, root: Location | None, driver: Any) -> None:
    """An honest count: a loop that ran no compiled graph is a failure, never a clean report."""
    if calls == 0:
        message = f"the driver ({driver.description}) never called the model's forward: nothing was compiled"
    else:
        message = (f"no compiled graph ran in {calls} forward call(s) of the driver's loop: every call ran in "
                   "Python (skipped frames, a wrapper Dynamo does not trace, or a fallback)")
    findings[(Kind.COMPILE_FAILURE, "not-compiled")] = Finding(
        kind=Kind.COMPILE_FAILURE, category=Category.NOT_COMPILED, message=message, location=root,
        severity=Severity.ERROR, suggestion=SUGGESTIONS[Category.NOT_COMPILED])



def fix_table() -> dict[Category, str]:
    table: dict[Category, str] = {}
    for pass_name, cls in available_passes().items():
        for category in cls.fixes:
            table.setdefault(category, pass_name)
    return table



def merge(findings: OrderedDict[tuple, Finding], key: tuple, make: Callable[[], Finding], phase: str,
           mode: str = "") -> Finding:
    existing = findings.get(key)
    if existing is None:
        finding = make()
        finding.phase = phase
        finding.mode = mode
        findings[key] = finding
        return finding
    existing.occurrences += 1
    if mode and mode not in existing.mode.split(", "):
        existing.mode = f"{existing.mode}, {mode}" if existing.mode else mode
    return existing



def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Encountered graph break"):
            return line
    return text.strip()



def add_breaks(findings: OrderedDict, breaks: list[cap_mod.RawBreak], index: ModuleIndex,
                fixes: dict[Category, str], mode: str) -> None:
    for event in breaks:
        category = classify_break(event.gb_type, event.reason, event.stack or [event.location])
        event.location = _user_site(event.location, event.stack)
        key = (Kind.GRAPH_BREAK, event.location.file, event.location.line, event.gb_type or _first_line(event.reason))

        def make(event: cap_mod.RawBreak = event, category: Category = category) -> Finding:
            message = event.gb_type or _first_line(event.reason)
            if event.skipped_frame:
                message = f"frame skipped, runs in Python: {message}"
            return Finding(
                kind=Kind.GRAPH_BREAK,
                category=category,
                message=message,
                location=event.location,
                stack=event.stack,
                module_paths=index.resolve(event.stack, event.location),
                gb_type=event.gb_type,
                gb_id=event.gb_id,
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.WARNING,
            )

        finding = merge(findings, key, make, event.phase, mode)
        if event.stack:
            if not finding.stack:
                finding.stack = event.stack
                finding.module_paths = []
            # The same line breaks in different modules (fairscale's reduce in wo, w2, the embedding): list each.
            for path in index.resolve(event.stack, event.location):
                if path not in finding.module_paths:
                    finding.module_paths.append(path)


def _user_site(location: Location, stack: list[Location]) -> Location:
    """A break inside the standard library (``logging``, ``warnings``) is reported at the model's line that called it."""
    if not cap_mod.is_stdlib(location.file):
        return location
    callers = [f for f in stack if not cap_mod.is_stdlib(f.file)]
    return callers[-1] if callers else location


def guard_location(guard: str) -> Location | None:
    """Where a guard came from: Dynamo appends ``# source  # path/file.py:LINE in fn`` to it."""
    import re

    m = re.search(r"#\s*(.*?)\s*#\s*(\S+?\.py):(\d+) in (\S+)", guard)
    if not m:
        return None
    path = _find_file(m.group(2))
    return Location(path, int(m.group(3)), m.group(4), m.group(1).strip()) if path else None



def _find_file(rel: str) -> str | None:

    if os.path.isabs(rel) and os.path.exists(rel):
        return rel
    for base in [os.getcwd(), *sys.path]:
        candidate = os.path.join(base, rel)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None



def past_decorators(location: Location) -> Location:
    """A location on a decorator line (``@deprecate_kwarg(...)``: a decorated function's code starts there) moved
    to the function's ``def`` line, with its source: the line a reader looks for."""
    import linecache

    line = linecache.getline(location.file, location.line).strip()
    if not line.startswith("@"):
        return location
    for n in range(location.line + 1, location.line + 40):
        text = linecache.getline(location.file, n)
        if not text:
            break
        stripped = text.strip()
        if stripped.startswith(("def ", "async def ")):
            name = stripped.split("(", 1)[0].split()[-1]
            return Location(location.file, n, name, stripped)
    return location


def add_recompiles(findings: OrderedDict, recompiles: list[cap_mod.RawRecompile], index: ModuleIndex,
                   fixes: dict[Category, str], root: Location | None, prefill_tokens: int | None = None) -> None:
    for event in recompiles:
        function = event.function
        if root is not None and (cap_mod.is_internal(event.location.file) or _is_root_wrapper(event.location, index)):
            # Dynamo's or a library's decorator around the model's forward: blame the forward itself.
            event.location = root
            function = root.function or function
        guard = event.guards[0] if event.guards else "(guard not reported)"
        found = guard_location(guard)
        raw = found or event.location
        where = past_decorators(raw)
        # the guard's line, or the decorator line Dynamo named, stays in the stack: tools match torch's own logs
        stack = [event.location] if found is not None else ([raw] if where is not raw else [])
        nested = root is not None and (event.location.file, event.location.line) != (root.file, root.line)
        category = classify_recompile(guard, event.phase, nested=nested, prefill_tokens=prefill_tokens)
        probe = Finding(Kind.RECOMPILE, category, "", guard=guard)
        key = (Kind.RECOMPILE, event.location.file, event.location.line, probe.guard_kind())

        def make(event: cap_mod.RawRecompile = event, guard: str = guard, where: Location = where,
                 category: Category = category, function: str = function,
                 stack: list[Location] = stack) -> Finding:
            return Finding(
                kind=Kind.RECOMPILE,
                category=category,
                message=f"{function} recompiled: {guard.split('#')[0].strip()}",
                location=where,
                stack=stack,
                module_paths=index.resolve([event.location], event.location),
                guard=guard,
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.WARNING,
            )

        merge(findings, key, make, event.phase)



def _is_root_wrapper(location: Location, index: ModuleIndex) -> bool:
    """True for the code of a decorator wrapping the root module's forward (transformers' ``wrapper``)."""
    fn = getattr(index.root_class, "forward", None)
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_filename == location.file and code.co_firstlineno == location.line:
            return getattr(fn, "__wrapped__", None) is not None
        fn = getattr(fn, "__wrapped__", None)
    return False



def add_limits(findings: OrderedDict, limits: list[cap_mod.RawLimit], index: ModuleIndex,
                fixes: dict[Category, str]) -> None:
    for event in limits:
        loc = event.location
        key = (Kind.RECOMPILE, loc.file if loc else "", loc.line if loc else 0, "limit")
        merge(
            findings,
            key,
            lambda event=event, loc=loc: Finding(
                kind=Kind.RECOMPILE,
                category=Category.RECOMPILE_LIMIT,
                message=event.message,
                location=loc,
                module_paths=index.resolve([], loc) if loc else [],
                fix_pass=fixes.get(Category.DYNAMIC_CACHE),
                suggestion=SUGGESTIONS[Category.RECOMPILE_LIMIT],
                severity=Severity.ERROR,
            ),
            event.phase,
        )



def failure_stack(exc: BaseException) -> list[Location]:
    """The user frames of a compile error: from Dynamo's message, else from the traceback (torch's own left out)."""
    message_stack = [f for f in cap_mod.parse_stack(str(exc)) if not cap_mod.is_internal(f.file)]
    if message_stack:
        return message_stack
    return [Location(fs.filename, fs.lineno or 0, fs.name, (fs.line or "").strip())
            for fs in traceback.extract_tb(exc.__traceback__)
            if not cap_mod.is_internal(fs.filename) and "site-packages/torch/" not in fs.filename]


def add_failure(findings: OrderedDict, exc: BaseException, index: ModuleIndex, fixes: dict[Category, str],
                 root: Location | None, mode: str) -> None:
    inner = getattr(exc, "inner_exception", None)
    shown = inner if isinstance(inner, BaseException) else exc  # BackendCompilerFailed wraps the real error
    text = f"{type(shown).__name__}: {shown}\n{exc}"
    gb_type, gb_id = cap_mod.parse_gb_type(str(exc))
    stack = failure_stack(exc)
    location = stack[-1] if stack else root
    is_break = isinstance(exc, torch._dynamo.exc.Unsupported) and "fullgraph" in mode
    kind = Kind.GRAPH_BREAK if is_break else Kind.COMPILE_FAILURE
    category = classify_break(gb_type, text, stack)
    first = gb_type or _first_line(str(shown)) or type(shown).__name__
    file, line = (location.file, location.line) if location else ("", 0)
    key = (kind, file, line, gb_type or first)

    def make() -> Finding:
        return Finding(
            kind=kind,
            category=category,
            message=first if is_break else f"{type(shown).__name__}: {first}",
            location=location,
            stack=stack,
            module_paths=index.resolve(stack, location),
            gb_type=gb_type,
            gb_id=gb_id,
            fix_pass=fixes.get(category),
            suggestion=SUGGESTIONS.get(category) or None,
            severity=Severity.ERROR,
        )

    merge(findings, key, make, getattr(exc, "graphfix_phase", ""), mode)



def add_fallbacks(findings: OrderedDict, found: list[Any], index: ModuleIndex, fixes: dict[Category, str]) -> None:
    for event in found:
        category = Category.COMPLEX_ROPE if "complex" in event.reason else Category.UNSUPPORTED_OP
        loc = event.location
        key = (Kind.INDUCTOR_FALLBACK, loc.file if loc else "", loc.line if loc else 0, event.op)
        merge(
            findings,
            key,
            lambda event=event, loc=loc, category=category: Finding(
                kind=Kind.INDUCTOR_FALLBACK,
                category=category,
                message=f"{event.op}: {event.reason}",
                location=loc,
                stack=event.stack,
                module_paths=index.resolve(event.stack, loc),
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.NOTE,
            ),
            event.phase,
            "inductor",
        )



def inherit_causes(findings: OrderedDict) -> None:
    """A frame skipped after a break at the same line shares that break's cause."""
    by_line: dict[tuple[str, int], Finding] = {}
    for f in findings.values():
        if f.location and f.category != Category.OTHER:
            by_line.setdefault((f.location.file, f.location.line), f)
    for f in findings.values():
        if f.category == Category.OTHER and f.location:
            cause = by_line.get((f.location.file, f.location.line))
            if cause is not None:
                f.category, f.fix_pass, f.suggestion = cause.category, cause.fix_pass, cause.suggestion
