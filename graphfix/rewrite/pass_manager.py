"""Passes: the plugin interface, the registry, and the manager that applies them.

Built-in passes live in the top-level ``passes`` package and are found exactly as
a third-party pass is: through the ``graphfix.passes`` entry-point group. A pass
declares which finding categories it fixes, so a diagnosis can name the pass
for each finding and ``optimize`` can pick passes from findings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterable
from importlib import metadata
from typing import Any, ClassVar

from torch import nn

from graphfix.diagnose.findings import Category

ENTRY_POINT_GROUP = "graphfix.passes"


@dataclasses.dataclass
class PassContext:
    """What a pass may need beyond the model: sizes the rewritten model must serve."""

    max_seq_len: int = 2048
    max_batch_size: int = 1
    dtype: Any = None
    device: Any = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassResult:
    """How many sites a pass rewrote, and each site it skipped with the reason."""

    name: str
    rewritten: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def matched(self) -> bool:
        return self.rewritten > 0


class Pass:
    """A module-swap rewrite with one job.

    Subclasses set ``name``, ``summary`` and ``fixes``, and implement ``apply``.
    ``apply`` must be idempotent (a second call rewrites 0 sites) and must move
    parameters into the new modules rather than copy them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    fixes: ClassVar[frozenset[Category]] = frozenset()
    order: ClassVar[int] = 100
    """Lower runs first (e.g. collectives before attention, cache after RoPE)."""

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def uuid(cls) -> str:
        """A hash of the pass's source, so compile caches can be invalidated when it changes."""
        try:
            src = inspect.getsource(inspect.getmodule(cls))  # type: ignore[arg-type]
        except (OSError, TypeError):
            src = cls.__qualname__
        return hashlib.sha256(src.encode()).hexdigest()[:16]


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, loaded from the entry-point group."""
    found: dict[str, type[Pass]] = {}
    for ep in _entry_points():
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"entry point {ep.name!r} in {ENTRY_POINT_GROUP} is not a graphfix Pass")
        found[cls.name or ep.name] = cls
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


def pass_for(category: Category) -> str | None:
    """The name of the registered pass that fixes findings of ``category``, if any."""
    for name, cls in available_passes().items():
        if category in cls.fixes:
            return name
    return None
