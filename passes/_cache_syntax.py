"""The growing cache's forms in source, one expression at a time: small matchers the rewrite is built from.

They answer questions about a single AST node (is it ``torch.cat([self.A, x], dim)``, ``self.A is None``,
``self.A.shape[d]``, a zero-length tensor?) and keep no state, so the owners' search
(``passes._cache_owners``) and the method rewrite (``passes._growing_cache``) share them.
"""

from __future__ import annotations

import ast
import types

import torch

from graphfix.rewrite.blocks import source_rewrite as sr

RANK = 4
"""Caches are ``(batch, heads, seq, head_dim)`` or ``(batch, seq, heads, head_dim)``: what SDPA reads."""

_CATS = (torch.cat, torch.concat, torch.concatenate)
_EMPTY_MAKERS = (torch.empty, torch.zeros, torch.ones)


def const_int(node: ast.AST | None) -> int | None:
    """The value of an int literal (``2``, ``-2``), else ``None``."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = const_int(node.operand)
        return None if inner is None else -inner
    return None


def is_none(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def same(a: ast.AST, b: ast.AST) -> bool:
    return ast.dump(a) == ast.dump(b)


def self_attr(node: ast.AST, self_name: str) -> str | None:
    """``A`` for ``self.A``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def cat_append(fn: types.FunctionType, node: ast.AST, self_name: str) -> tuple[str, ast.expr, int | None] | None:
    """``(A, x, dim)`` for ``torch.cat([self.A, x], dim)`` (also ``concat``/``concatenate``, tuples, keywords)."""
    if not isinstance(node, ast.Call) or not any(sr.is_call_to(fn, node, c) for c in _CATS):
        return None
    keywords = {k.arg: k.value for k in node.keywords}
    tensors = node.args[0] if node.args else keywords.get("tensors")
    if not isinstance(tensors, (ast.List, ast.Tuple)) or len(tensors.elts) != 2:
        return None
    attr = self_attr(tensors.elts[0], self_name)
    if attr is None:
        return None
    dim_node = node.args[1] if len(node.args) > 1 else keywords.get("dim", keywords.get("axis"))
    dim = 0 if dim_node is None else const_int(dim_node)
    return attr, tensors.elts[1], dim


def none_test(node: ast.AST, self_name: str) -> tuple[str, bool] | None:
    """``(A, True)`` for ``self.A is None``, ``(A, False)`` for ``self.A is not None``."""
    if (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Is, ast.IsNot))
            and is_none(node.comparators[0])):
        attr = self_attr(node.left, self_name)
        if attr is not None:
            return attr, isinstance(node.ops[0], ast.Is)
    return None


def dim_read(node: ast.AST, self_name: str) -> tuple[str, int] | None:
    """``(A, d)`` for ``self.A.shape[d]``, ``self.A.size(d)``, ``self.A.size()[d]`` (``d`` modulo the rank)."""
    if isinstance(node, ast.Subscript):
        base, index = node.value, const_int(node.slice)
        if isinstance(base, ast.Call) and isinstance(base.func, ast.Attribute) and base.func.attr == "size" \
                and not base.args and not base.keywords:
            base = ast.Attribute(value=base.func.value, attr="shape")
        if isinstance(base, ast.Attribute) and base.attr == "shape" and index is not None:
            attr = self_attr(base.value, self_name)
            return (attr, index % RANK) if attr is not None else None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size":
        arg = node.args[0] if len(node.args) == 1 and not node.keywords else (
            node.keywords[0].value if not node.args and len(node.keywords) == 1 and node.keywords[0].arg == "dim"
            else None)
        index = const_int(arg)
        attr = self_attr(node.func.value, self_name)
        if attr is not None and index is not None:
            return attr, index % RANK
    return None


def _shape_args(fn: types.FunctionType, node: ast.Call) -> list[ast.expr] | None:
    """The shape a ``torch.empty/zeros/ones(...)`` or ``x.new_empty/new_zeros/new_ones(...)`` call builds."""
    if any(sr.is_call_to(fn, node, m) for m in _EMPTY_MAKERS) or (
            isinstance(node.func, ast.Attribute) and node.func.attr in ("new_empty", "new_zeros", "new_ones")):
        if len(node.args) == 1 and isinstance(node.args[0], (ast.Tuple, ast.List)):
            return list(node.args[0].elts)
        return list(node.args)
    return None


def is_empty_tensor(fn: types.FunctionType, node: ast.AST, seq_dim: int) -> bool:
    """Whether ``node`` builds a tensor with a literal 0 at the sequence dim (a reset to "nothing written")."""
    if not isinstance(node, ast.Call):
        return False
    shape = _shape_args(fn, node)
    return shape is not None and len(shape) == RANK and const_int(shape[seq_dim]) == 0
