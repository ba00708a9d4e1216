"""SARIF 2.1.0 for GitHub code scanning (``github/codeql-action/upload-sarif``).

One run for all models. Each ``Category`` is a rule ``graphfix/<category>``;
each finding is a result with the finding's severity as its level and
``partialFingerprints["graphfixKey/v1"] = Finding.key()`` so an alert keeps its
identity across runs. Locations:

* a file under ``root`` (default: the working directory, the repository root
  in CI) is a relative path with ``uriBaseId`` ``%SRCROOT%``;
* a file in site-packages is its path inside site-packages with ``uriBaseId``
  ``SITE_PACKAGES`` (``transformers/models/llama/modeling_llama.py``);
* any other real file is an absolute ``file://`` URI;
* a finding with no file location (``<string>`` frames, whole-model failures)
  points at the model name with ``uriBaseId`` ``MODEL``, because code
  scanning rejects a result without a location.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from graphfix.diagnose.findings import Category, Finding, Severity
from graphfix.render._common import (
    CATEGORY_TITLES,
    Reports,
    as_reports,
    first_line,
    fix_passes_by_category,
    location_text,
    one_line,
    ordered,
)

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
FINGERPRINT = "graphfixKey/v1"
_SITE = "site-packages"


def rule_id(category: Category) -> str:
    return f"graphfix/{category.value}"


def _rule(category: Category, passes: list[str]) -> dict[str, Any]:
    title = CATEGORY_TITLES.get(category, category.value)
    if passes:
        names = ", ".join(f"`{p}`" for p in passes)
        fix = f"`graphfix optimize` fixes this with the {names} pass{'es' if len(passes) > 1 else ''}."
    else:
        fix = "Each result's message says what to change (and which graphfix pass fixes it, where one does)."
    text = f"{title}. {fix}"
    return {
        "id": rule_id(category),
        "name": "".join(part.capitalize() for part in category.value.split("_")),
        "shortDescription": {"text": title},
        "fullDescription": {"text": text},
        "help": {"text": text.replace("`", ""), "markdown": text},
        "defaultConfiguration": {"level": "warning"},
        "properties": {"tags": ["torch.compile", "performance"], "fix_passes": passes},
    }


class _Locator:
    """Turns finding paths into SARIF artifact locations and remembers the base URIs used."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(root or os.getcwd()).resolve()
        self.bases: dict[str, str] = {}

    def artifact(self, path: str) -> dict[str, Any] | None:
        if not path or path.startswith("<"):
            return None
        p = Path(path)
        if not p.is_absolute():
            p = Path(os.getcwd()) / p
        parts = p.parts
        if _SITE in parts:
            i = len(parts) - 1 - parts[::-1].index(_SITE)
            self.bases.setdefault("SITE_PACKAGES", Path(*parts[: i + 1]).as_uri() + "/")
            return {"uri": quote(PurePosixPath(*parts[i + 1:]).as_posix()), "uriBaseId": "SITE_PACKAGES"}
        try:
            rel = p.resolve().relative_to(self.root)
        except (ValueError, OSError):
            return {"uri": p.as_uri()}
        self.bases.setdefault("%SRCROOT%", self.root.as_uri() + "/")
        return {"uri": quote(rel.as_posix()), "uriBaseId": "%SRCROOT%"}

    def location(self, finding: Finding, model: str) -> dict[str, Any]:
        loc = finding.location
        artifact = self.artifact(loc.file) if loc else None
        if artifact is None:
            # Code scanning rejects a result without a location: point at the model as a whole.
            # (MODEL is left out of originalUriBaseIds: it names no directory.)
            return {
                "physicalLocation": {"artifactLocation": {"uri": quote(model.strip("/") or "model"),
                                                          "uriBaseId": "MODEL"}},
                "message": {"text": f"no user-code location; the finding is about model {model}"},
            }
        physical: dict[str, Any] = {"artifactLocation": artifact}
        if loc is not None and loc.line >= 1:
            region: dict[str, Any] = {"startLine": int(loc.line)}
            if loc.source.strip():
                region["snippet"] = {"text": loc.source.rstrip("\n")}
            physical["region"] = region
        out: dict[str, Any] = {"physicalLocation": physical}
        if loc is not None and loc.function:
            out["logicalLocations"] = [{"name": loc.function, "kind": "function"}]
        return out


def _sentence(text: str) -> str:
    """``text`` as one sentence: a trailing colon or semicolon becomes a full stop, and one is added if missing."""
    text = text.strip().rstrip(":;,").rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _message(finding: Finding, model: str) -> str:
    parts = [_sentence(first_line(finding.message) or CATEGORY_TITLES.get(finding.category, finding.category.value))]
    where = f" in {finding.module_path}" if finding.module_path else ""
    parts.append(f"Model {model}: {finding.kind.value.replace('_', ' ')}, hit {finding.occurrences}x{where}.")
    if finding.guard:
        parts.append(_sentence(f"Guard: {first_line(finding.guard)}"))
    if finding.suggestion:
        parts.append(_sentence(one_line(finding.suggestion)))
    if finding.fix_pass:
        parts.append(f"Fix pass: {finding.fix_pass}.")
    return " ".join(parts)


def sarif_dict(
    report_or_reports: Reports,
    *,
    root: str | os.PathLike[str] | None = None,
    fix_passes: Mapping[Category, list[str]] | None = None,
    baseline_keys: Mapping[str, Collection[str] | None] | None = None,
) -> dict[str, Any]:
    """The SARIF log as a dict; ``root`` is what relative paths are relative to (default: cwd).

    ``baseline_keys``: per model, the finding keys a baseline holds; each result then carries
    ``baselineState`` ``unchanged`` (in the baseline) or ``new``.
    """
    from graphfix import __version__

    reports = as_reports(report_or_reports)
    passes = dict(fix_passes) if fix_passes is not None else fix_passes_by_category(reports)
    categories = list(Category)
    rules = [_rule(c, list(passes.get(c, []))) for c in categories]
    index = {c: i for i, c in enumerate(categories)}
    locator = _Locator(root)
    results = []
    for report in reports:
        known = None if baseline_keys is None else (baseline_keys.get(report.model) or ())
        for f in ordered(report.findings):
            result: dict[str, Any] = {
                "ruleId": rule_id(f.category),
                "ruleIndex": index[f.category],
                "level": f.severity.value if isinstance(f.severity, Severity) else "warning",
                "message": {"text": _message(f, report.model)},
                "locations": [locator.location(f, report.model)],
                "partialFingerprints": {FINGERPRINT: f.key()},
                "occurrenceCount": max(int(f.occurrences), 1),
                "properties": {
                    "model": report.model,
                    "kind": f.kind.value,
                    "category": f.category.value,
                    "location": location_text(f),
                    "module_paths": list(f.module_paths),
                    "gb_type": f.gb_type,
                    "guard": f.guard,
                    "fix_pass": f.fix_pass,
                    "phase": f.phase,
                    "mode": f.mode,
                },
            }
            if known is not None:
                result["baselineState"] = "unchanged" if f.key() in known else "new"
            results.append(result)
    run: dict[str, Any] = {
        "tool": {"driver": {
            "name": "graphfix",
            "version": __version__,
            "semanticVersion": __version__,
            "rules": rules,
        }},
        "results": results,
        "columnKind": "unicodeCodePoints",
        "properties": {"models": [r.model for r in reports], "backends": sorted({r.backend for r in reports})},
    }
    if locator.bases:
        run["originalUriBaseIds"] = {name: {"uri": uri} for name, uri in sorted(locator.bases.items())}
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def render_sarif(report_or_reports: Reports, *, root: str | os.PathLike[str] | None = None,
                 baseline_keys: Mapping[str, Collection[str] | None] | None = None) -> str:
    return json.dumps(sarif_dict(report_or_reports, root=root, baseline_keys=baseline_keys), indent=2) + "\n"
