"""Breaks hidden behind other breaks: found by fixing the first ones on a scratch copy and looking again.

Dynamo reports what it met before it gave up on a frame: an unsupported context manager or
a skipped frame hides everything after it, and a break can hide the next one in the same
function. So a single diagnosis under-reports, and a user who fixes what it showed meets new
breaks. Here, the passes the findings name are applied to a deep copy of the model (the
user's model is never touched), the copy is diagnosed with the same driver, and every new
finding is added to the report, marked ``hidden_behind`` the first finding of the round that
hid it; repeated until a round shows nothing new (at most ``MAX_ROUNDS``).
"""

from __future__ import annotations

import ast
import copy
import functools
import os
from collections.abc import Callable

from torch import nn

from graphfix.diagnose.findings import Finding, Kind
from graphfix.diagnose.report import Report

MAX_ROUNDS = 3
COPY_MEMORY_SHARE = 0.25
"""Copy only models whose weights take less than this share of the machine's available memory."""


def find_hidden_breaks(model: nn.Module, driver: object, report: Report, diagnose_copy: Callable[[nn.Module], Report],
                       say: Callable[[str], None], max_rounds: int = MAX_ROUNDS) -> None:
    """Add the findings hidden behind ``report``'s to it (see the module docstring)."""
    from graphfix.rewrite.planner import apply_passes, plan_passes

    seen = {f.key() for f in report.findings}
    previous = [f for f in report.findings if f.kind in (Kind.GRAPH_BREAK, Kind.COMPILE_FAILURE)]
    applied: list[str] = []
    for _ in range(max_rounds):
        names = plan_passes(model, report.findings)
        if not previous or set(names) <= set(applied):
            return
        reason = _cannot_copy(model)
        if reason:
            report.notes.append(f"hidden-break search skipped: {reason}")
            return
        say(f"looking for breaks hidden behind {len(previous)} finding(s): passes {', '.join(names)} on a copy")
        try:
            scratch = copy.deepcopy(model)
        except Exception as exc:  # noqa: BLE001 - process groups, open files: a model may not copy
            report.notes.append(f"hidden-break search skipped: the model cannot be copied ({type(exc).__name__})")
            return
        apply_passes(scratch, names)
        applied = names
        try:
            found = diagnose_copy(scratch)
        except Exception as exc:  # noqa: BLE001 - a pass may leave the copy unrunnable; the report stays as it was
            report.notes.append(f"hidden-break search stopped: the copy with {', '.join(names)} failed to run "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            return
        new = [f for f in found.findings if f.key() not in seen and not _in_graphfix(f)]
        for finding in new:
            finding.hidden_behind = _anchor(finding, previous)
            report.findings.append(finding)
            seen.add(finding.key())
        report.notes.append(f"hidden-break search: {len(new)} finding(s) more with {', '.join(names)} applied "
                            "to a copy")
        previous = [f for f in new if f.kind in (Kind.GRAPH_BREAK, Kind.COMPILE_FAILURE)]


def _in_graphfix(finding: Finding) -> bool:
    """A finding in graphfix's own blocks (its compiled core's prefill-to-decode recompile, say): the front door
    that optimize installs handles it, so it is not the user's to fix."""
    import graphfix

    root = os.path.dirname(os.path.abspath(graphfix.__file__)) + os.sep
    return bool(finding.location) and os.path.abspath(finding.location.file).startswith(root)


def _anchor(finding: Finding, previous: list[Finding]) -> str:
    """The earlier finding this one hid behind: the first in the same function, else the first of the round."""
    span = enclosing_function(finding.location.file, finding.location.line) if finding.location else None
    same = [p for p in previous if span and p.location and p.location.file == finding.location.file
            and span[0] <= p.location.line <= span[1]]
    first = (same or previous)[0]
    where = first.location.short() if first.location else "-"
    return f"{first.message} ({where})"


@functools.lru_cache(maxsize=64)
def _function_spans(path: str) -> tuple[tuple[int, int], ...]:
    try:
        with open(path) as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return ()
    return tuple((n.lineno, n.end_lineno or n.lineno) for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def enclosing_function(path: str, line: int) -> tuple[int, int] | None:
    """``(first, last)`` line of the innermost function in ``path`` that contains ``line``."""
    spans = [s for s in _function_spans(path) if s[0] <= line <= s[1]]
    return min(spans, key=lambda s: s[1] - s[0]) if spans else None


def _cannot_copy(model: nn.Module) -> str | None:
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    from graphfix.diagnose.validate import available_memory

    available = available_memory()
    if available and nbytes > COPY_MEMORY_SHARE * available:
        return (f"the weights ({nbytes / 2**30:.1f} GiB) are too large to copy safely "
                f"({available / 2**30:.1f} GiB available); diagnose from config.json (meta device) to see them")
    return None


__all__ = ["find_hidden_breaks"]
