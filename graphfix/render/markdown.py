"""GitHub-flavoured Markdown for a pull-request comment or ``$GITHUB_STEP_SUMMARY``.

One summary table with a row per model, then per model with findings a table of
findings (``file:line`` and the source line in code spans) and a collapsed list
of details. ``max_findings`` caps the rows per model so that a comment stays
under GitHub's size limits.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from graphfix.diagnose.findings import Finding, Kind
from graphfix.diagnose.report import Report
from graphfix.render._common import (
    Reports,
    as_reports,
    counts,
    details,
    driver_text,
    first_line,
    format_seconds,
    location_text,
    one_line,
    ordered,
    verdict,
)

MAX_CELL = 120
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~])")


def code(text: str, *, limit: int = MAX_CELL, in_table: bool = True) -> str:
    """``text`` as an inline code span on one line (pipes escaped when it goes in a table cell)."""
    text = one_line(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if not text:
        return ""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    if in_table:  # GFM splits table cells on '|' even inside code spans unless it is escaped
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def escape(text: str) -> str:
    """Plain text with Markdown and HTML specials backslash-escaped, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", one_line(text))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


BaselineKeys = Mapping[str, Collection[str] | None]
"""Per model, the ``Finding.key()`` values a baseline holds (``graphfix.cli.baseline``)."""


def new_problems(report: Report, known: Collection[str]) -> int:
    """Problems (graph-break sites, compile failures, recompiles) that the baseline does not hold."""
    return sum(1 for f in report.findings if f.kind != Kind.INDUCTOR_FALLBACK and f.key() not in known)


def result_cell(report: Report, known: Collection[str] | None) -> str:
    """``clean`` or ``N problems``; against a baseline, what the gate judges: the new problems only."""
    if known is None:
        return ("\u2705 " if report.clean else "\u274c ") + verdict(report)
    new = new_problems(report, known)
    old = counts(report).problems - new
    head = "\u2705 no new problems" if new == 0 else f"\u274c {new} new problem{'s' if new != 1 else ''}"
    return head + (f" ({old} in the baseline)" if old else "")


def summary_table(reports: list[Report], baseline_keys: BaselineKeys | None = None) -> list[str]:
    lines = [
        _row(["Model", "Result", "Graphs", "Graph breaks (sites / occurrences)", "Compile failures",
              "Recompiles", "Inductor fallbacks", "Backend", "Driver", "Wall time"]),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in reports:
        c = counts(r)
        result = result_cell(r, _known(baseline_keys, r))
        lines.append(_row([
            code(r.model), result, str(c.graphs), f"{c.graph_break_sites} / {c.graph_break_occurrences}",
            str(c.compile_failures), str(c.recompiles), str(c.inductor_fallbacks), escape(r.backend),
            escape(driver_text(r)), format_seconds(r.wall_seconds),
        ]))
    return lines


def findings_table(findings: list[Finding], known: Collection[str] | None = None) -> list[str]:
    """The findings, with a Baseline column (``new`` / ``unchanged``) when a baseline is given."""
    head = ["#", "Kind", "Category", "Location", "Source", "Module", "Occurrences", "Fix pass"]
    align = "| ---: | --- | --- | --- | --- | --- | ---: | --- |"
    if known is not None:
        head.append("Baseline")
        align += " --- |"
    lines = [_row(head), align]
    for i, f in enumerate(findings, 1):
        src = f.location.source if f.location else ""
        cells = [
            str(i), f.kind.value, f.category.value, code(location_text(f)) if f.location else "-",
            code(src) or "-",
            code(f.module_path) if f.module_path else "-", str(f.occurrences),
            code(f.fix_pass) if f.fix_pass else "-",
        ]
        if known is not None:
            cells.append("unchanged" if f.key() in known else "**new**")
        lines.append(_row(cells))
    return lines


def _known(baseline_keys: BaselineKeys | None, report: Report) -> Collection[str] | None:
    """The baseline's keys for this model: ``None`` without a baseline, empty when it does not know the model."""
    if baseline_keys is None:
        return None
    return baseline_keys.get(report.model) or ()


def _details_block(findings: list[Finding]) -> list[str]:
    lines = ["<details><summary>Details</summary>", ""]
    for i, f in enumerate(findings, 1):
        (_, head), *rest = details(f)
        where = f" at {code(location_text(f), in_table=False)}" if f.location else ""
        lines.append(f"{i}. **{f.kind.value}**{where}: {escape(head)}")
        for label, value in rest:
            shown = escape(value) if label == "suggestion" else code(value, limit=300, in_table=False)
            lines.append(f"   - {escape(label)}: {shown}")
    lines += ["", "</details>"]
    return lines


def render_markdown(report_or_reports: Reports, *, max_findings: int = 50, title: str = "graphfix report",
                    baseline_keys: BaselineKeys | None = None) -> str:
    """Markdown for one report or several: a summary row per model, then each model's findings.

    ``baseline_keys``: with a baseline, results count only the findings it does not hold (what the CI gate
    judges) and each finding says whether it is new.
    """
    reports = as_reports(report_or_reports)
    out = [f"## {escape(title)}", ""]
    if not reports:
        return "\n".join(out + ["No reports.", ""])
    out += summary_table(reports, baseline_keys)
    for r in reports:
        findings = ordered(r.findings)
        if not findings:
            continue
        known = _known(baseline_keys, r)
        heading = verdict(r) if known is None else result_cell(r, known).split(" ", 1)[1]
        out += ["", f"### {escape(r.model)}: {heading}", ""]
        shown = findings[:max_findings]
        out += findings_table(shown, known)
        if len(findings) > len(shown):
            out += ["", f"... and {len(findings) - len(shown)} more findings (see the JSON or SARIF report)."]
        out += [""] + _details_block(shown)
        for note in r.notes:
            out += ["", f"> {escape(first_line(note))}"]
    return "\n".join(out) + "\n"
