"""What the diagnosis found: one ``Finding`` per distinct problem site.

A finding is keyed by what it is (kind, category, graph-break type) and where it
is (the user-code location), so the same break hit in 30 layers and 17 loop
steps is one finding with ``occurrences=510`` and module paths collapsed to
``layers.*.attention``. That key is also what a baseline file stores, so a CI
gate fails only on problems that are new.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from typing import Any


class Kind(str, enum.Enum):
    """The four ways compilation goes wrong (plus a skipped frame)."""

    GRAPH_BREAK = "graph_break"
    """Dynamo split the graph; the code between pieces runs in Python."""
    COMPILE_FAILURE = "compile_failure"
    """Compilation raised an error (the call would crash under ``torch.compile``)."""
    RECOMPILE = "recompile"
    """A guard failed on a later call and the frame was compiled again."""
    INDUCTOR_FALLBACK = "inductor_fallback"
    """Inductor emitted an ATen fallback kernel instead of generated code."""


class Category(str, enum.Enum):
    """The documented taxonomy (docs/taxonomy.md): what kind of code causes it."""

    COMPLEX_ROPE = "complex_rope"
    COLLECTIVE = "collective"
    AUTOGRAD_FUNCTION_CTX = "autograd_function_ctx"
    SDPA_CONTEXT_MANAGER = "sdpa_context_manager"
    INFERENCE_MODE = "inference_mode"
    DATA_DEPENDENT = "data_dependent_control_flow"
    PYTHON_SIDE_EFFECT = "python_side_effect"
    DYNAMIC_CACHE = "dynamic_cache_or_position"
    INT_ATTRIBUTE = "int_module_attribute"
    """A recompile on an integer attribute of a module (Dynamo specialises them: one graph per value)."""
    DTYPE_RECOMPILE = "dtype_recompile"
    """A recompile because an input changed dtype (int32 vs int64 positions) or kind (an inference tensor)."""
    SHAPE_REUSE = "function_reused_at_other_shapes"
    """A recompile of a frame compiled on its own (after a graph break) and called with other shapes."""
    NOT_COMPILED = "not_compiled"
    """The driver's loop ran no compiled graph (it never called forward, or everything fell back to Python)."""
    UNSUPPORTED_OP = "unsupported_op"
    RECOMPILE_LIMIT = "recompile_limit"
    OTHER = "other"


class Severity(str, enum.Enum):
    """How much a finding costs: errors crash, warnings cost speed."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclasses.dataclass(frozen=True)
class Location:
    """A line of user code (not torch internals) that a finding points at."""

    file: str
    line: int
    function: str = ""
    source: str = ""

    def short(self) -> str:
        """``file.py:123`` relative to site-packages or the working dir, for people."""
        return f"{display_path(self.file)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Location:
        return cls(**{f.name: data.get(f.name, f.default) for f in dataclasses.fields(cls)})


def display_path(path: str) -> str:
    """Shorten an absolute path so that reports stay readable and machine-independent."""
    marker = "site-packages" + os.sep
    idx = path.rfind(marker)
    if idx >= 0:
        return path[idx + len(marker):]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


@dataclasses.dataclass
class Finding:
    """One problem site. ``occurrences`` counts how often the run hit it."""

    kind: Kind
    category: Category
    message: str
    location: Location | None = None
    stack: list[Location] = dataclasses.field(default_factory=list)
    module_paths: list[str] = dataclasses.field(default_factory=list)
    gb_type: str | None = None
    gb_id: str | None = None
    guard: str | None = None
    phase: str = ""
    mode: str = ""
    hidden_behind: str | None = None
    """Found only once the fixes of earlier findings were applied (on a scratch copy): the one it hid behind."""
    fix_pass: str | None = None
    suggestion: str | None = None
    occurrences: int = 1
    severity: Severity = Severity.WARNING

    @property
    def module_path(self) -> str:
        """The collapsed module path(s), comma separated, ``<root>`` for the top module."""
        return ", ".join(self.module_paths) if self.module_paths else ""

    def key(self) -> str:
        """A stable identity for baselines: kind, category, type and location, not counts.

        Line numbers are part of the key on purpose: moving code is a change a
        reviewer should look at. Paths are shortened so that baselines written
        on one machine match on another.
        """
        loc = f"{display_path(self.location.file)}:{self.location.line}" if self.location else "-"
        what = self.gb_type or self.guard_kind() or ""
        raw = f"{self.kind.value}|{self.category.value}|{what}|{loc}"
        return hashlib.sha1(raw.encode()).hexdigest()[:16]

    def guard_kind(self) -> str:
        """The guard's expression with numbers removed, so a recompile key is stable."""
        if not self.guard:
            return ""
        return "".join("#" if ch.isdigit() else ch for ch in self.guard.split("#")[0]).strip()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        data["category"] = self.category.value
        data["severity"] = self.severity.value
        data["key"] = self.key()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        loc = data.get("location")
        return cls(
            kind=Kind(data["kind"]),
            category=Category(data["category"]),
            message=data.get("message", ""),
            location=Location.from_dict(loc) if loc else None,
            stack=[Location.from_dict(s) for s in data.get("stack", [])],
            module_paths=list(data.get("module_paths", [])),
            gb_type=data.get("gb_type"),
            gb_id=data.get("gb_id"),
            guard=data.get("guard"),
            phase=data.get("phase", ""),
            mode=data.get("mode", ""),
            hidden_behind=data.get("hidden_behind"),
            fix_pass=data.get("fix_pass"),
            suggestion=data.get("suggestion"),
            occurrences=int(data.get("occurrences", 1)),
            severity=Severity(data.get("severity", "warning")),
        )
