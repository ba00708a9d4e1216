"""Helpers shared by the renderers: ordering, counts, and the words each format uses.

Every renderer numbers and orders findings the same way (errors first, then by
kind, then as the report listed them), so "finding 3" in the terminal is
finding 3 in the Markdown summary and the JUnit file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from graphfix.diagnose.findings import Category, Finding, Kind, Severity
from graphfix.diagnose.report import Report

Reports = Report | Sequence[Report]

KIND_ORDER = {Kind.COMPILE_FAILURE: 0, Kind.GRAPH_BREAK: 1, Kind.RECOMPILE: 2, Kind.INDUCTOR_FALLBACK: 3}
SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.NOTE: 2}

CHECKS: dict[Kind, str] = {
    Kind.GRAPH_BREAK: "no graph breaks",
    Kind.COMPILE_FAILURE: "no compile failures",
    Kind.RECOMPILE: "no recompiles",
    Kind.INDUCTOR_FALLBACK: "no inductor fallbacks",
}
"""The checks a report answers, one per kind, in the order JUnit lists them."""

CATEGORY_TITLES: dict[Category, str] = {
    Category.COMPLEX_ROPE: "Rotary embedding uses complex tensors",
    Category.COLLECTIVE: "Distributed collective inside the model",
    Category.AUTOGRAD_FUNCTION_CTX: "Custom autograd.Function that Dynamo cannot trace",
    Category.SDPA_CONTEXT_MANAGER: "Attention-backend context manager inside forward",
    Category.INFERENCE_MODE: "torch.inference_mode inside the compiled region",
    Category.DATA_DEPENDENT: "Control flow that depends on tensor values",
    Category.PYTHON_SIDE_EFFECT: "Python side effect (print, logging, I/O) in forward",
    Category.DYNAMIC_CACHE: "KV cache or position handling that changes per step",
    Category.UNSUPPORTED_OP: "Operator that Dynamo or Inductor does not support",
    Category.RECOMPILE_LIMIT: "Frame recompiled until the recompile limit was hit",
    Category.OTHER: "Other torch.compile problem",
}


def as_reports(report_or_reports: Reports) -> list[Report]:
    """One report or several, as a list."""
    if isinstance(report_or_reports, Report):
        return [report_or_reports]
    reports = list(report_or_reports)
    for r in reports:
        if not isinstance(r, Report):
            raise TypeError(f"expected graphfix Report objects, got {type(r).__name__}")
    return reports


def ordered(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then notes; by kind within a severity; stable otherwise."""
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), KIND_ORDER.get(f.kind, 9)))


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def plain(text: str | None) -> str:
    """``text`` without ANSI colour codes and control characters (newlines and tabs kept)."""
    return _CONTROL.sub("", _ANSI.sub("", text or ""))


def first_line(text: str | None) -> str:
    """The first non-empty line, stripped, without colour codes."""
    for line in plain(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def one_line(text: str | None) -> str:
    """All whitespace runs (newlines included) collapsed to one space."""
    return re.sub(r"\s+", " ", plain(text)).strip()


def location_text(finding: Finding) -> str:
    return finding.location.short() if finding.location else "-"


def fix_text(finding: Finding) -> str:
    return finding.fix_pass or "-"


@dataclasses.dataclass(frozen=True)
class Counts:
    """The summary line of one report, in distinct sites unless named otherwise."""

    graphs: int
    graph_break_sites: int
    graph_break_occurrences: int
    compile_failures: int
    recompiles: int
    inductor_fallbacks: int

    @property
    def problems(self) -> int:
        """Sites that make a report not clean (fallbacks are informational)."""
        return self.graph_break_sites + self.compile_failures + self.recompiles


def counts(report: Report) -> Counts:
    breaks = report.graph_breaks
    return Counts(
        graphs=report.stats.graphs,
        graph_break_sites=len(breaks),
        graph_break_occurrences=sum(max(f.occurrences, 1) for f in breaks),
        compile_failures=len(report.compile_failures),
        recompiles=len(report.recompiles),
        inductor_fallbacks=len(report.inductor_fallbacks),
    )


def summary_line(report: Report) -> str:
    """``graphs 3 | graph breaks 2 sites / 60 occurrences | ...``."""
    c = counts(report)
    return (
        f"graphs {c.graphs} | graph breaks {plural(c.graph_break_sites, 'site')}"
        f" / {plural(c.graph_break_occurrences, 'occurrence')}"
        f" | compile failures {c.compile_failures} | recompiles {c.recompiles}"
        f" | inductor fallbacks {c.inductor_fallbacks}"
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict(report: Report) -> str:
    """``clean`` or ``N problems`` (graph-break sites + compile failures + recompiles)."""
    n = counts(report).problems
    return "clean" if n == 0 else plural(n, "problem")


def driver_text(report: Report) -> str:
    """``generate: prefill 32 tokens + 16 decode steps`` (parts left out when unknown)."""
    parts = []
    if report.prefill_tokens:
        parts.append(f"prefill {report.prefill_tokens} tokens")
    if report.decode_steps:
        parts.append(f"{report.decode_steps} decode steps")
    steps = " + ".join(parts)
    if report.driver and steps:
        return f"{report.driver}: {steps}"
    return report.driver or steps or "-"


def format_seconds(seconds: float) -> str:
    if not seconds:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def format_memory(mb: float) -> str:
    if not mb:
        return "-"
    if mb >= 1024:
        return f"{mb / 1024:.1f} GiB"
    return f"{mb:.0f} MiB"


def details(finding: Finding) -> list[tuple[str, str]]:
    """``(label, value)`` pairs a person needs beyond the table; the first is the message."""
    out = [("", first_line(finding.message) or "(no message)")]
    if finding.location and finding.location.source.strip():
        where = f" in {finding.location.function}" if finding.location.function else ""
        out.append((f"source{where}", finding.location.source.strip()))
    if finding.guard:
        out.append(("guard", first_line(finding.guard)))
    if finding.hidden_behind:
        out.append(("hidden behind", one_line(finding.hidden_behind)))
    if finding.suggestion:
        out.append(("suggestion", one_line(finding.suggestion)))
    if finding.fix_pass:
        out.append(("fix pass", finding.fix_pass))
    return out


def fix_passes_by_category(reports: Iterable[Report]) -> dict[Category, list[str]]:
    """The fix passes findings name, per category, in first-seen order."""
    found: dict[Category, list[str]] = {}
    for report in reports:
        for f in report.findings:
            if f.fix_pass and f.fix_pass not in found.setdefault(f.category, []):
                found[f.category].append(f.fix_pass)
    return found
