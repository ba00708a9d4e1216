"""Map user-code frames to the ``nn.Module`` paths they ran in.

Dynamo reports file:line, not modules. A frame belongs to a module when its
line lies inside a method of that module's class. Walking the stack from the
outside in, the call site's source (``self.tok_embeddings(tokens)``) picks the
exact child; a loop (``for layer in self.layers``) leaves all instances, which
are collapsed to a pattern (``layers.*.attention``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import defaultdict

from torch import nn

from graphfix.diagnose.findings import Location

_SELF_ATTR = re.compile(r"self\.([A-Za-z_][A-Za-z0-9_]*)\s*[\(\[]")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


@dataclasses.dataclass
class _Span:
    start: int
    end: int
    cls: type


class ModuleIndex:
    """Which module classes own which source lines, and where their instances live."""

    def __init__(self, model: nn.Module) -> None:
        self.paths_by_class: dict[type, list[str]] = defaultdict(list)
        self.spans_by_file: dict[str, list[_Span]] = defaultdict(list)
        seen: set[type] = set()
        self.root_class = type(model)
        for path, module in model.named_modules():
            self.paths_by_class[type(module)].append(path)
            for cls in type(module).__mro__:
                if cls in seen or cls in (nn.Module, object):
                    continue
                seen.add(cls)
                self._index_class(cls)

    def _index_class(self, cls: type) -> None:
        for attr in vars(cls).values():
            fn = inspect.unwrap(attr) if callable(attr) else None
            code = getattr(fn, "__code__", None)
            if code is None:
                continue
            try:
                lines, start = inspect.getsourcelines(fn)
            except (OSError, TypeError):
                continue
            self.spans_by_file[code.co_filename].append(_Span(start, start + len(lines) - 1, cls))

    def renumber(self, list_path: str, kept: list[int]) -> None:
        """Paths under ``list_path`` as the layers' own: the model is running a subset of that list
        (``layer_subset``), whose ``j``-th entry is layer ``kept[j]`` of the whole list."""
        prefix = f"{list_path}." if list_path else ""
        for cls, paths in self.paths_by_class.items():
            self.paths_by_class[cls] = [_renumbered(p, prefix, kept) for p in paths]

    def owner(self, frame: Location) -> type | None:
        """The innermost module class whose method contains this frame's line."""
        best: _Span | None = None
        for span in self.spans_by_file.get(frame.file, []):
            if span.start <= frame.line <= span.end and (best is None or span.end - span.start < best.end - best.start):
                best = span
        return best.cls if best else None

    def instances(self, cls: type) -> list[str]:
        """Paths of all modules of ``cls`` or a subclass of it."""
        return [p for c, paths in self.paths_by_class.items() if issubclass(c, cls) for p in paths]

    def resolve(self, stack: list[Location], location: Location | None = None) -> list[str]:
        """Module path patterns for a user stack (outermost first), or a lone location."""
        frames = list(stack) or ([location] if location else [])
        current: list[str] | None = None
        prev_frame: Location | None = None
        for frame in frames:
            cls = self.owner(frame)
            if cls is None:
                prev_frame = frame
                continue
            candidates = self.instances(cls)
            if current is not None:
                narrowed = _narrow(candidates, current, prev_frame)
                candidates = narrowed or candidates
            current = candidates
            prev_frame = frame
        return collapse(current or [])


def _renumbered(path: str, prefix: str, kept: list[int]) -> str:
    if not path.startswith(prefix):
        return path
    head, dot, rest = path[len(prefix):].partition(".")
    if not head.isdigit() or int(head) >= len(kept):
        return path
    return f"{prefix}{kept[int(head)]}{dot}{rest}"


def _narrow(candidates: list[str], parents: list[str], call_site: Location | None) -> list[str]:
    """Keep candidates below the parent paths; prefer the child named at the call site."""
    if call_site is not None:
        for attr in _SELF_ATTR.findall(call_site.source or ""):
            named = [c for c in candidates if any(c == _join(p, attr) for p in parents)]
            if named:
                return named
    below = [c for c in candidates if any(_is_below(c, p) for p in parents)]
    return below


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _is_below(path: str, parent: str) -> bool:
    return path == parent or not parent or path.startswith(parent + ".")


def collapse(paths: list[str]) -> list[str]:
    """``layers.0.attn ... layers.29.attn`` -> ``layers.*.attn``; the root is ``(root)``."""
    if len(paths) == 1:
        return [paths[0] or "(root)"]
    out: list[str] = []
    for path in paths:
        pattern = _INDEX.sub("*", path) or "(root)"
        if pattern not in out:
            out.append(pattern)
    return out
