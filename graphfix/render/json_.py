"""JSON: a single report as ``Report.to_dict()``, several wrapped in ``graphfix.reports``."""

from __future__ import annotations

import json
from typing import Any

from graphfix.diagnose.report import SCHEMA, Report
from graphfix.render._common import Reports, as_reports

MULTI_SCHEMA = "graphfix.reports"
MULTI_SCHEMA_VERSION = 1


def reports_to_dict(report_or_reports: Reports) -> dict[str, Any]:
    """One report (a ``Report`` or a list of one) as itself; two or more wrapped."""
    reports = as_reports(report_or_reports)
    if len(reports) == 1:
        return reports[0].to_dict()
    return {
        "schema": MULTI_SCHEMA,
        "schema_version": MULTI_SCHEMA_VERSION,
        "reports": [r.to_dict() for r in reports],
    }


def render_json(report_or_reports: Reports, *, indent: int | None = 2) -> str:
    return json.dumps(reports_to_dict(report_or_reports), indent=indent) + "\n"


def reports_from_dict(data: dict[str, Any]) -> list[Report]:
    """Read back either form (``graphfix.diagnose.report`` or ``graphfix.reports``); ``ValueError``/``TypeError`` otherwise."""
    if not isinstance(data, dict):
        raise TypeError("not a graphfix report (expected a JSON object)")
    schema = data.get("schema")
    if schema == SCHEMA:
        return [Report.from_dict(data)]
    if schema == MULTI_SCHEMA:
        if int(data.get("schema_version", 0)) > MULTI_SCHEMA_VERSION:
            raise ValueError(f"reports schema version {data['schema_version']} is newer than this graphfix")
        return [Report.from_dict(r) for r in data.get("reports", [])]
    raise ValueError(f"not a graphfix report (schema {schema!r}, expected {SCHEMA!r} or {MULTI_SCHEMA!r})")


def reports_from_json(text: str) -> list[Report]:
    return reports_from_dict(json.loads(text))
