"""The ``Report``: findings plus the counts and context needed to judge them.

Reports are plain data so that every renderer (text, JSON, Markdown, JUnit,
SARIF), the baseline gate and ``optimize``'s before/after view work from the
same object, and a JSON report read back from disk is as good as a live one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from graphfix.diagnose.findings import Finding, Kind

SCHEMA = "graphfix.diagnose.report"
SCHEMA_VERSION = 1


@dataclasses.dataclass
class RunStats:
    """Counts from the compiled run, per forward call and in total."""

    calls: int = 0
    graphs: int = 0
    graphs_per_prefill: int = 0
    graphs_per_decode: int = 0
    graph_breaks: int = 0
    compiled_frames: int = 0
    graph_runs: int | None = None
    """Compiled graphs executed over the whole loop (``None`` in reports older than this field)."""
    forward_calls: int | None = None
    """Calls of the model's forward the driver made."""
    recompiles: int = 0
    compile_failures: int = 0
    inductor_fallbacks: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class Report:
    """Everything ``diagnose`` learned about one model.

    ``stats`` holds the fullgraph=False run (the one that lists every break);
    findings from the fullgraph=True and hard-failure runs carry ``mode``.
    """

    model: str
    source: str = "module"
    backend: str = "aot_eager"
    device: str = "cpu"
    driver: str = ""
    prefill_tokens: int = 0
    decode_steps: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    stats: RunStats = dataclasses.field(default_factory=RunStats)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def of_kind(self, kind: Kind) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    @property
    def graph_breaks(self) -> list[Finding]:
        return self.of_kind(Kind.GRAPH_BREAK)

    @property
    def recompiles(self) -> list[Finding]:
        return self.of_kind(Kind.RECOMPILE)

    @property
    def compile_failures(self) -> list[Finding]:
        return self.of_kind(Kind.COMPILE_FAILURE)

    @property
    def inductor_fallbacks(self) -> list[Finding]:
        return self.of_kind(Kind.INDUCTOR_FALLBACK)

    @property
    def clean(self) -> bool:
        """No breaks, no failures, no recompiles beyond the prefill-to-decode one."""
        return not self.graph_breaks and not self.compile_failures and not self.recompiles

    def counts(self) -> dict[str, int]:
        """Distinct sites per kind (a break in 30 layers counts once)."""
        return {k.value: len(self.of_kind(k)) for k in Kind}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["findings"] = [f.to_dict() for f in self.findings]
        data["counts"] = self.counts()
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        if data.get("schema") != SCHEMA:
            raise ValueError("not a graphfix report (missing schema 'graphfix.diagnose.report')")
        if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
            raise ValueError(f"report schema version {data['schema_version']} is newer than this graphfix")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields and k not in ("findings", "stats")}
        return cls(
            findings=[Finding.from_dict(f) for f in data.get("findings", [])],
            stats=RunStats(**data.get("stats", {})),
            **kwargs,
        )
