"""Aligned plain text for a terminal: header, counts, a findings table, details.

Columns are separated by two spaces and padded to the widest cell, so every
row's columns start at the same offsets; long locations are shortened from the
left and long module paths from the right. Colour is off unless asked for
(``color=True``, typically ``want_color(sys.stdout)``) and is applied after
padding, so it never moves a column.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO

from graphfix.diagnose.findings import Finding, Severity
from graphfix.diagnose.report import Report
from graphfix.render._common import (
    Reports,
    as_reports,
    details,
    driver_text,
    fix_text,
    format_memory,
    format_seconds,
    location_text,
    ordered,
    summary_line,
    verdict,
)

SEP = "  "
COLUMNS = ("#", "KIND", "CATEGORY", "LOCATION", "MODULE", "OCC", "FIX PASS")
RIGHT_ALIGNED = {"#", "OCC"}
MAX_WIDTH = {"LOCATION": 60, "MODULE": 40, "CATEGORY": 28, "FIX PASS": 28}

_COLORS = {Severity.ERROR: "\033[31m", Severity.WARNING: "\033[33m", Severity.NOTE: "\033[2m"}
_BOLD, _GREEN, _RESET = "\033[1m", "\033[32m", "\033[0m"


def want_color(stream: IO[str] | None) -> bool:
    """Colour only for a TTY, and never when ``NO_COLOR`` is set (``FORCE_COLOR`` forces it)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clip(text: str, width: int, *, from_left: bool) -> str:
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3):] if from_left else text[: width - 3] + "..."


def table_rows(findings: Sequence[Finding]) -> list[tuple[str, ...]]:
    """The findings table's cells (header first), already clipped to the column widths."""
    rows = [COLUMNS]
    for i, f in enumerate(findings, 1):
        cells = {
            "#": str(i),
            "KIND": f.kind.value,
            "CATEGORY": f.category.value,
            "LOCATION": location_text(f),
            "MODULE": " ".join(f.module_path.split()) or "-",
            "OCC": str(f.occurrences),
            "FIX PASS": fix_text(f),
        }
        rows.append(
            tuple(
                _clip(cells[c], MAX_WIDTH[c], from_left=(c == "LOCATION")) if c in MAX_WIDTH else cells[c]
                for c in COLUMNS
            )
        )
    return rows


def format_table(rows: list[tuple[str, ...]], *, color_rows: Sequence[str | None] = ()) -> list[str]:
    """Pad the cells into aligned lines; ``color_rows[i]`` colours row ``i + 1``'s KIND cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = []
        for i, (col, cell) in enumerate(zip(COLUMNS, row)):
            padded = cell.rjust(widths[i]) if col in RIGHT_ALIGNED else cell.ljust(widths[i])
            color = color_rows[n - 1] if 0 < n <= len(color_rows) else None
            if color and col == "KIND":
                padded = f"{color}{padded}{_RESET}"
            cells.append(padded)
        lines.append(SEP.join(cells).rstrip())
    return lines


def _render_one(report: Report, *, color: bool) -> list[str]:
    bold = (lambda s: f"{_BOLD}{s}{_RESET}") if color else (lambda s: s)
    status = verdict(report)
    if color:
        status = f"{_GREEN}{status}{_RESET}" if report.clean else f"{_COLORS[Severity.ERROR]}{status}{_RESET}"
    out = [
        f"{bold('graphfix report: ' + report.model)}  [{status}]",
        f"source {report.source}, backend {report.backend}, device {report.device}",
        (
            f"driver {driver_text(report)}; wall time {format_seconds(report.wall_seconds)};"
            f" peak memory {format_memory(report.peak_memory_mb)}"
        ),
        summary_line(report),
    ]
    findings = ordered(report.findings)
    if not findings:
        out += ["", "No findings: the model compiles as one graph with no recompiles."]
    else:
        hidden = sum(1 for f in findings if f.hidden_behind)
        if hidden:  # said, and the findings still listed: each one's detail names what it hid behind
            out += ["", f"{hidden} of these appear only once the findings before them are fixed (hidden behind them)."]
        colors = [_COLORS.get(f.severity) for f in findings] if color else []
        out += [""] + format_table(table_rows(findings), color_rows=colors)
        out += [""]
        for i, f in enumerate(findings, 1):
            (_, head), *rest = details(f)
            where = f" {location_text(f)}:" if f.location else ""
            out.append(f"{i:>3}. [{f.kind.value}]{where} {head}")
            out += [f"     {label}: {value}" for label, value in rest]
    for note in report.notes:
        out.append(f"note: {note}")
    return out


def render_text(report_or_reports: Reports, *, color: bool = False) -> str:
    """Aligned terminal text for one report or several (a totals line closes several)."""
    reports = as_reports(report_or_reports)
    if not reports:
        return "graphfix: no reports\n"
    blocks = ["\n".join(_render_one(r, color=color)) for r in reports]
    text = "\n\n".join(blocks)
    if len(reports) > 1:
        clean = sum(1 for r in reports if r.clean)
        totals = [f"{r.model}: {verdict(r)}" for r in reports]
        text += f"\n\n{len(reports)} models, {clean} clean: " + "; ".join(totals)
    return text + "\n"


__all__ = ["format_table", "render_text", "table_rows", "want_color"]
