"""Baselines: today's findings, recorded so that CI fails only on new ones.

A baseline file (schema ``graphfix.cli.baseline``, version 1) lists, per model,
the ``Finding.key()`` of every finding with enough context (kind, category,
location, first line of the message) for a reviewer to read the diff when
the file changes. Keys include the line number, so moving a known break is a
change a reviewer sees. Counts are not recorded: a known break hit more often
is not new.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

from graphfix.diagnose.findings import Finding
from graphfix.diagnose.report import Report
from graphfix.errors import InputError

SCHEMA = "graphfix.cli.baseline"
SCHEMA_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class BaselineEntry:
    """One recorded finding; only ``key`` is compared, the rest is for reviewers."""

    key: str
    kind: str = ""
    category: str = ""
    location: str = "-"
    message: str = ""

    @classmethod
    def of(cls, finding: Finding) -> BaselineEntry:
        message = next((ln.strip() for ln in finding.message.splitlines() if ln.strip()), "")
        return cls(
            key=finding.key(),
            kind=finding.kind.value,
            category=finding.category.value,
            location=finding.location.short() if finding.location else "-",
            message=message,
        )


@dataclasses.dataclass
class Baseline:
    """Recorded findings per model name."""

    models: dict[str, list[BaselineEntry]] = dataclasses.field(default_factory=dict)
    graphfix_version: str = ""
    path: str | None = None

    def keys(self, model: str) -> set[str] | None:
        """The keys recorded for ``model``, or ``None`` when the baseline does not know it."""
        entries = self.models.get(model)
        return None if entries is None else {e.key for e in entries}

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "graphfix_version": self.graphfix_version,
            "models": {m: [dataclasses.asdict(e) for e in es] for m, es in self.models.items()},
        }

    @classmethod
    def from_reports(cls, reports: Report | Sequence[Report]) -> Baseline:
        from graphfix import __version__

        models: dict[str, list[BaselineEntry]] = {}
        for report in _iter_reports(reports):
            entries = models.setdefault(report.model, [])
            seen = {e.key for e in entries}
            for f in report.findings:
                entry = BaselineEntry.of(f)
                if entry.key not in seen:
                    seen.add(entry.key)
                    entries.append(entry)
        for entries in models.values():
            entries.sort(key=lambda e: (e.kind, e.location, e.category, e.key))
        return cls(models=models, graphfix_version=__version__)

    @classmethod
    def from_dict(cls, data: Any, *, path: str | None = None) -> Baseline:
        """Parse a baseline document; ``ValueError`` or ``TypeError`` with a one-line reason if it is not one."""
        if not isinstance(data, dict):
            raise TypeError(f"not a graphfix baseline (expected a JSON object with schema {SCHEMA!r})")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a graphfix baseline (missing schema {SCHEMA!r})")
        try:
            version = int(data.get("schema_version", 0))
        except (TypeError, ValueError):
            raise ValueError("schema_version is not a number") from None
        if version > SCHEMA_VERSION:
            raise ValueError(f"baseline schema version {version} is newer than this graphfix (reads {SCHEMA_VERSION})")
        models = data.get("models")
        if not isinstance(models, dict):
            raise TypeError("'models' must be an object mapping model names to lists of entries")
        parsed: dict[str, list[BaselineEntry]] = {}
        fields = {f.name for f in dataclasses.fields(BaselineEntry)}
        for model, entries in models.items():
            if not isinstance(entries, list):
                raise TypeError(f"entries of model {model!r} must be a list")
            parsed[model] = []
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                    raise TypeError(f"an entry of model {model!r} has no string 'key'")
                parsed[model].append(BaselineEntry(**{k: str(v) for k, v in entry.items() if k in fields}))
        return cls(models=parsed, graphfix_version=str(data.get("graphfix_version", "")), path=path)


def write_baseline(reports: Report | Sequence[Report], path: PathLike) -> Baseline:
    """Record the reports' findings in ``path`` (atomically: a temporary file, then ``os.replace``)."""
    baseline = Baseline.from_reports(reports)
    target = Path(path)
    text = json.dumps(baseline.to_dict(), indent=2) + "\n"
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"cannot write baseline {target}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); a baseline is meant to be committed and shared.
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise InputError(f"cannot write baseline {target}: {exc.strerror or exc}") from None
    baseline.path = str(target)
    return baseline


def load_baseline(path: PathLike) -> Baseline:
    """Read a baseline file; a missing, unreadable or malformed one is a one-line ``InputError``."""
    target = Path(path)
    hint = "write one with --write-baseline FILE"
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"baseline file not found: {target}", hint=hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InputError(f"cannot read baseline file {target}: {reason}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"baseline file {target} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            hint=hint,
        ) from None
    try:
        return Baseline.from_dict(data, path=str(target))
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise InputError(f"baseline file {target} is malformed: {reason}", hint=hint) from None


def new_findings(report: Report, baseline: Baseline | None) -> list[Finding]:
    """The report's findings whose key the baseline does not hold for this model.

    A model the baseline does not mention has no known findings: all of its
    findings are new (``graphfix.cli.gate`` says so in its reasons).
    """
    if baseline is None:
        return list(report.findings)
    known = baseline.keys(report.model) or set()
    return [f for f in report.findings if f.key() not in known]


def fixed_entries(report: Report, baseline: Baseline) -> list[BaselineEntry]:
    """Baseline entries for this model that the report no longer has (the baseline can shrink)."""
    present = {f.key() for f in report.findings}
    return [e for e in baseline.models.get(report.model, []) if e.key not in present]


def _iter_reports(reports: Report | Iterable[Report]) -> list[Report]:
    return [reports] if isinstance(reports, Report) else list(reports)


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Baseline",
    "BaselineEntry",
    "fixed_entries",
    "load_baseline",
    "new_findings",
    "write_baseline",
]
