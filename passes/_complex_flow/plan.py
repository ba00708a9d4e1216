"""The analysis's result, and the source edits it makes through ``passes._common.rewrite_methods``."""

from __future__ import annotations

import ast
import dataclasses
import types

from torch import nn

from graphfix.rewrite.blocks import paired_complex as pc
from passes._complex_flow.surface import HELPER
from passes._complex_flow.values import node_key

Edits = dict[tuple, tuple[str, str]]
"""node key -> (kind, stand-in function): ``call`` (torch.polar(...) -> _graphfix_cx.polar(...)), ``binop``
(a * b -> _graphfix_cx.mul(a, b)), ``neg``, ``read`` (self.t -> _graphfix_cx.stored(self.t)) and ``store``
(self.t = v -> self.t = _graphfix_cx.storable(v))."""


@dataclasses.dataclass
class Plan:
    """What to rewrite (``sites[id(fn)]``), which stored tensors to convert, which attributes to mark, what to skip."""

    sites: dict[int, Edits] = dataclasses.field(default_factory=dict)
    storage: list[tuple[str, nn.Module, str]] = dataclasses.field(default_factory=list)
    """``(module path, module, attribute)`` of complex tensors to store as real pairs."""
    marks: list[tuple[nn.Module, str]] = dataclasses.field(default_factory=list)
    """Attributes that will hold pairs the rewritten code writes (a table built lazily in forward)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    complex_sites: int = 0
    """Complex constructs found, rewritten now, before, or left alone (zero: the model has none)."""

    def transform(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        """The source transform for ``passes._common.rewrite_methods``: this plan's edits of ``fn``."""
        edits = self.sites.get(id(fn))
        if not edits:
            return 0, [], {}
        editor = _Editor(edits)
        editor.visit(tree)
        return editor.count, [], {HELPER: pc}


class _Editor(ast.NodeTransformer):
    """Applies the edits, children first, finding nodes by ``node_key``."""

    def __init__(self, edits: Edits) -> None:
        self.edits = edits
        self.count = 0

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        edit = self.edits.get(node_key(node)) if hasattr(node, "end_col_offset") else None
        if edit is None:
            return node
        kind, name = edit
        self.count += 1
        if kind == "call":
            node.func = ast.copy_location(_stand_in(name), node.func)
            return node
        if kind == "binop":
            return ast.copy_location(_call(name, [node.left, node.right]), node)
        if kind == "neg":
            return ast.copy_location(_call(name, [node.operand]), node)
        if kind == "read":
            return ast.copy_location(_call(name, [node]), node)
        if kind == "store":
            node.value = ast.copy_location(_call(name, [node.value]), node.value)
            return node
        raise AssertionError(f"unknown edit {kind}")  # pragma: no cover - the kinds are this package's own


def _stand_in(name: str) -> ast.Attribute:
    return ast.Attribute(value=ast.Name(id=HELPER, ctx=ast.Load()), attr=name, ctx=ast.Load())


def _call(name: str, args: list[ast.expr]) -> ast.Call:
    return ast.Call(func=_stand_in(name), args=args, keywords=[])
