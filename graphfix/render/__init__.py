"""Renderers: one report or several, as text, JSON, Markdown, JUnit XML or SARIF.

Every renderer is ``render_<fmt>(report_or_reports, **options) -> str`` and
accepts a single ``Report`` or a list of them (several models in one CI job).
``RENDERERS`` maps the ``--format`` names to them; ``render(fmt, reports)``
looks one up and raises ``InputError`` for an unknown name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graphfix.errors import InputError
from graphfix.render._common import Reports, as_reports
from graphfix.render.json_ import render_json, reports_from_dict, reports_from_json
from graphfix.render.junit import render_junit
from graphfix.render.markdown import render_markdown
from graphfix.render.sarif import render_sarif, sarif_dict
from graphfix.render.text import render_text, want_color

RENDERERS: dict[str, Callable[..., str]] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
    "junit": render_junit,
    "sarif": render_sarif,
}
FORMATS = tuple(RENDERERS)
DEFAULT_FORMAT = "text"


def render(fmt: str, report_or_reports: Reports, **options: Any) -> str:
    """Render with the named format (``text``, ``json``, ``markdown``, ``junit``, ``sarif``)."""
    try:
        renderer = RENDERERS[fmt]
    except KeyError:
        raise InputError(f"unknown report format {fmt!r}", hint="use one of: " + ", ".join(FORMATS)) from None
    return renderer(report_or_reports, **options)


__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "RENDERERS",
    "as_reports",
    "render",
    "render_json",
    "render_junit",
    "render_markdown",
    "render_sarif",
    "render_text",
    "reports_from_dict",
    "reports_from_json",
    "sarif_dict",
    "want_color",
]
