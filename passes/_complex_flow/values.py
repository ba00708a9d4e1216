"""Abstract values of the complex-flow analysis: what an expression may be, not what it is."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable
from typing import Any

C = "c"
"""A complex value the rewrite turns into a ``PairedComplex``."""
U = "u"
"""A value from outside the analysed code (argument, property, unknown call): it may be complex."""
J = "j"
"""A Python complex constant (``1j``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Val:
    """Flags, the objects the value can be when known (modules, containers, constants), a tuple's items,
    and for an outside value where it comes from (for reports).

    Values compare their objects by identity: ``==`` on a module list holding tensors would compare tensors.
    """

    flags: frozenset = frozenset()
    objs: tuple | None = None
    items: tuple | None = None
    origin: str = ""

    def _key(self) -> tuple:
        return self.flags, None if self.objs is None else tuple(map(id, self.objs)), self.items, self.origin

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Val) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def is_complex(self) -> bool:
        return C in self.all_flags

    @property
    def is_outside(self) -> bool:
        return U in self.all_flags

    @property
    def all_flags(self) -> frozenset:
        if self.items is None:
            return self.flags
        return self.flags.union(*(i.all_flags for i in self.items))

    @property
    def all_origin(self) -> str:
        return self.origin or next((i.all_origin for i in self.items or () if i.all_origin), "")


NONE = Val()
COMPLEX = Val(frozenset({C}))


def outside(origin: str) -> Val:
    """A value from outside the analysed code; ``origin`` says which (``argument `x` of F.forward``)."""
    return Val(frozenset({U}), origin=origin)


def outside_part(*values: Val) -> Val:
    """What ``values`` combined keep of "from outside": the first outside origin, or nothing."""
    for value in values:
        if value.is_outside:
            return Val(frozenset({U}), origin=value.all_origin)
    return NONE


def join(a: Val, b: Val) -> Val:
    """What a name may be after two paths that gave it ``a`` and ``b``."""
    if a == b:
        return a
    objs = None if a.objs is None or b.objs is None else unique(a.objs + b.objs)
    origin = a.origin or b.origin
    if a.items is not None and b.items is not None and len(a.items) == len(b.items):
        return Val(a.flags | b.flags, objs, tuple(join(x, y) for x, y in zip(a.items, b.items)), origin)
    return Val(a.all_flags | b.all_flags, objs, None, a.all_origin or b.all_origin)


def join_all(values: Iterable[Val]) -> Val:
    out = None
    for value in values:
        out = value if out is None else join(out, value)
    return out if out is not None else NONE


def unique(objs: Iterable) -> tuple:
    """``objs`` without repeats, by identity (tensors and modules do not compare by value)."""
    seen: dict[int, Any] = {}
    for o in objs:
        seen.setdefault(id(o), o)
    return tuple(seen.values())


def node_key(node: ast.AST) -> tuple:
    """A node's identity across re-parses of the same source, and in a rewritten copy: its type and span."""
    return (type(node).__name__, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)
