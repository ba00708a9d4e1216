"""JUnit XML: one ``<testsuite>`` per model, one ``<testcase>`` per check.

The four checks are "no graph breaks", "no compile failures", "no recompiles"
and "no inductor fallbacks"; each testcase's classname is the model, and each
finding of the check's kind is one ``<failure>`` (message: category and
location; text: the details). A suite's ``failures`` counts failed testcases,
as JUnit consumers expect, not ``<failure>`` elements.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from graphfix.diagnose.findings import Finding
from graphfix.diagnose.report import Report
from graphfix.render._common import CHECKS, Reports, as_reports, details, location_text, ordered, plain

# Characters XML 1.0 cannot hold at all (ElementTree would write them and produce a broken file).
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` with the characters XML 1.0 forbids (ANSI escapes' ESC included) removed."""
    return _INVALID_XML.sub("", text)


def _failure_text(f: Finding) -> str:
    lines = [f"{f.kind.value} / {f.category.value} at {location_text(f)}"]
    if f.module_path:
        lines.append(f"module: {f.module_path}")
    lines.append(f"occurrences: {f.occurrences}")
    lines += [f"{label}: {value}" for label, value in details(f)[1:]]
    lines += ["", plain(f.message).strip()]
    if f.stack:
        lines += ["", "user stack (innermost last):"] + [f"  {loc.short()} in {loc.function}" for loc in f.stack]
    return xml_text("\n".join(lines))


def _suite(report: Report) -> ET.Element:
    findings = ordered(report.findings)
    checks = list(CHECKS.items())
    failed = sum(1 for kind, _ in checks if any(f.kind == kind for f in findings))
    suite = ET.Element("testsuite", {
        "name": xml_text(report.model),
        "tests": str(len(checks)),
        "failures": str(failed),
        "errors": "0",
        "skipped": "0",
        "time": f"{report.wall_seconds:.3f}",
    })
    props = ET.SubElement(suite, "properties")
    for name, value in [("source", report.source), ("backend", report.backend), ("device", report.device),
                        ("driver", report.driver), ("prefill_tokens", report.prefill_tokens),
                        ("decode_steps", report.decode_steps), *sorted(report.versions.items())]:
        ET.SubElement(props, "property", {"name": xml_text(str(name)), "value": xml_text(str(value))})
    for kind, check in checks:
        case = ET.SubElement(suite, "testcase", {"classname": xml_text(report.model), "name": check, "time": "0"})
        for f in findings:
            if f.kind != kind:
                continue
            failure = ET.SubElement(case, "failure", {
                "message": xml_text(f"{f.category.value} at {location_text(f)}"),
                "type": f.kind.value,
            })
            failure.text = _failure_text(f)
    return suite


def render_junit(report_or_reports: Reports) -> str:
    """A ``<testsuites>`` document for one report or several."""
    reports = as_reports(report_or_reports)
    suites = [_suite(r) for r in reports]
    root = ET.Element("testsuites", {
        "name": "graphfix",
        "tests": str(sum(int(s.get("tests", 0)) for s in suites)),
        "failures": str(sum(int(s.get("failures", 0)) for s in suites)),
        "errors": "0",
        "time": f"{sum(r.wall_seconds for r in reports):.3f}",
    })
    root.extend(suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
