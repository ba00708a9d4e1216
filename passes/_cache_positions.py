"""The written length of a growing cache: a Python int before the rewrite, a 0-d tensor after.

``self.A.shape[d]`` at the sequence dim (or ``0 if self.A is None else ...``) becomes
``self.A.seq_len()``; its uses must be ``table[pos : pos + n]`` (becomes ``take_positions``) or
``torch.arange(pos, pos + n)`` (becomes ``shifted_arange``), with ``end = pos + n`` followed
through a local. Other dims read the buffer's constant size; the batch dim is refused.
"""

from __future__ import annotations

import ast
import copy

import torch

from graphfix.rewrite.blocks import source_rewrite as sr
from passes._cache_rewrite_base import Kind, Position, PositionEnd, RewriteBase
from passes._cache_syntax import const_int, dim_read, none_test, same


class PositionRewrite(RewriteBase):
    """Length reads of a cache and the two uses of a position the rewrite can express with a tensor."""

    def length_read(self, node: ast.expr, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``self.A.shape[d]`` / ``0 if self.A is None else self.A.shape[d]`` -> ``self.A.seq_len()``."""
        if isinstance(node, ast.IfExp):
            test = none_test(node.test, self.self_name)
            if test is None or test[0] not in self.caches:
                return None
            zero, read = (node.body, node.orelse) if test[1] else (node.orelse, node.body)
            found = dim_read(read, self.self_name)
            if const_int(zero) == 0 and found == (test[0], self.caches[test[0]]):
                self.sites += 1
                return ast.Call(func=self._cache(test[0], "seq_len"), args=[], keywords=[]), Position(test[0])
            return None
        found = dim_read(node, self.self_name)
        if found is None or found[0] not in self.caches:
            return None
        attr, dim = found
        if dim == self.caches[attr]:
            self.sites += 1
            return ast.Call(func=self._cache(attr, "seq_len"), args=[], keywords=[]), Position(attr)
        if dim == 0:
            self.refuse(node, f"`{self._src(node)}` reads the batch size of the cache (its buffer has max_batch rows)")
            return node, None
        fixed = ast.Subscript(value=ast.Attribute(value=self._cache(attr, "buffer"), attr="shape", ctx=ast.Load()),
                              slice=ast.Constant(dim), ctx=ast.Load())
        return fixed, None

    def arange_call(self, node: ast.Call, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``torch.arange(pos, pos + n, ...)`` -> ``shifted_arange(pos, n, ...)``."""
        if not sr.is_call_to(self.fn, node, torch.arange) or len(node.args) != 2:
            return None
        if not isinstance(self.peek(node.args[0], env), Position):
            return None
        count = self.end_count(node.args[0], node.args[1], env)
        if count is None:
            return None
        start, _ = self.expr(node.args[0], env)
        for kw in node.keywords:
            kw.value = self.plain(kw.value, env)
        self.sites += 1
        new = ast.Call(func=ast.Name(id="_graphfix_shifted_arange", ctx=ast.Load()),
                       args=[start, self.plain(count, env)], keywords=node.keywords)
        return ast.copy_location(new, node), None

    def end_count(self, start: ast.expr, end: ast.expr, env: dict[str, Kind]) -> ast.expr | None:
        """``n`` when ``end`` is ``start + n`` (or ``n + start``, or a local bound to it)."""
        if isinstance(end, ast.BinOp) and isinstance(end.op, ast.Add):
            if same(end.left, start):
                return end.right
            if same(end.right, start):
                return end.left
        if isinstance(end, ast.Name) and isinstance(start, ast.Name):
            kind = env.get(end.id)
            if isinstance(kind, PositionEnd) and kind.start == start.id:
                return copy.deepcopy(kind.count)
        return None

    def position_slice(self, node: ast.Subscript, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``table[pos : pos + n]`` (one sliced dim, the others ``:``) -> ``take_positions(table, dim, pos, n)``."""
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        sliced = [i for i, p in enumerate(parts) if isinstance(p, ast.Slice) and p.lower is not None]
        if len(sliced) != 1:
            return None
        dim = sliced[0]
        part = parts[dim]
        start_kind = self.peek(part.lower, env)
        if not isinstance(start_kind, Position):
            return None
        count = self.end_count(part.lower, part.upper, env) if part.upper is not None else None
        full = all(isinstance(p, ast.Slice) and p.lower is None and p.upper is None and p.step is None
                   for i, p in enumerate(parts) if i != dim)
        if count is None or part.step is not None or not full or not isinstance(node.ctx, ast.Load):
            self.refuse(node, self._misuse(node, start_kind))
            return node, None
        start, _ = self.expr(part.lower, env)
        table = self.plain(node.value, env)
        self.sites += 1
        call = ast.Call(func=ast.Name(id="_graphfix_take_positions", ctx=ast.Load()),
                        args=[table, ast.Constant(dim), start, self.plain(count, env)], keywords=[])
        return ast.copy_location(call, node), None

    def position_end(self, node: ast.BinOp, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``pos + n`` with ``pos`` a local position: kept for a later ``table[pos:end]`` / ``arange(pos, end)``."""
        for start, count in ((node.left, node.right), (node.right, node.left)):
            if isinstance(start, ast.Name) and isinstance(env.get(start.id), Position):
                if self.peek(count, env) is not None:
                    return None
                return node, PositionEnd(start.id, ast.dump(count), copy.deepcopy(count))
        return None
