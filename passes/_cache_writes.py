"""Writes of a growing cache: what an assignment to ``self.A`` does, and the branch-free form of it.

``torch.cat([self.A, x], dim)`` becomes ``append``, ``None`` or a zero-length tensor ``reset``,
another tensor ``replace``; ``x if self.A is None else torch.cat(...)`` and
``if self.A is None: ... else: ...`` (branches that only assign caches and locals) are merged
into writes without a branch, "is None" becoming the tensor ``is_empty()`` taken before any write.
"""

from __future__ import annotations

import ast
import dataclasses

from passes._cache_rewrite_base import Kind, Position, RewriteBase
from passes._cache_syntax import cat_append, const_int, dim_read, is_empty_tensor, is_none, none_test, same, self_attr


class Refused(Exception):
    """A construct that cannot be merged; the message says why."""


@dataclasses.dataclass
class BranchOp:
    """One assignment in a branch of ``if self.A is None:``: ``op`` is a write op or ``zero``/``length``/``value``."""

    key: tuple[str, str]
    """``("attr", A)`` for ``self.A``, ``("name", N)`` for a local."""
    op: str
    operand: object
    value: ast.expr | None
    stmt: ast.stmt | None

    @classmethod
    def absent(cls, key: tuple[str, str]) -> BranchOp:
        return cls(key, "none", None, None, None)


class WriteRewrite(RewriteBase):
    """Assignments to a cache attribute, alone or in the branches of ``if self.A is None:``."""

    def write_op(self, attr: str, value: ast.expr) -> tuple[str, ast.expr | None]:
        """What assigning ``value`` to ``self.<attr>`` does: ``reset``, ``append`` x, ``replace`` x, or ``other``."""
        if is_none(value) or is_empty_tensor(self.fn, value, self.caches[attr]):
            return "reset", None
        cat = cat_append(self.fn, value, self.self_name)
        if cat is not None:
            return ("append", cat[1]) if cat[0] == attr else ("other", None)
        if isinstance(value, ast.IfExp):
            return "other", None
        return "replace", value

    def cache_write(self, attr: str, value: ast.expr, stmt: ast.stmt, env: dict[str, Kind]) -> list[ast.stmt]:
        op, x = self.write_op(attr, value)
        if op == "reset":
            return [self._call(attr, "reset", [], stmt)]
        if op in ("append", "replace"):
            return [self._call(attr, op, [self.plain(x, env)], stmt)]
        if isinstance(value, ast.IfExp):
            test = none_test(value.test, self.self_name)
            if test is not None and test[0] in self.caches:
                tested, none_first = test
                when_none, otherwise = (value.body, value.orelse) if none_first else (value.orelse, value.body)
                prelude: list[ast.stmt] = []
                merged = self.merge_writes(attr, self.write_op(attr, when_none), self.write_op(attr, otherwise),
                                           tested, stmt, env, prelude)
                if merged is not None:
                    return prelude + merged
            elif not self.refers_to_cache(value.test, env):  # x if start_pos == 0 else torch.cat(...): a Python test
                ops = [self.write_op(attr, branch) for branch in (value.body, value.orelse)]
                if all(op in ("append", "replace", "reset") for op, _ in ops):
                    body, orelse = ([self._call(attr, op, [] if x is None else [self.plain(x, env)], stmt)]
                                    for op, x in ops)
                    self.sites -= 1  # one write site, two branches
                    return [ast.copy_location(ast.If(test=self.plain(value.test, env), body=body, orelse=orelse),
                                              stmt)]
        self.refuse(stmt, f"`{self._src(stmt)}` writes the cache in a form graphfix does not rewrite "
                          "(it rewrites torch.cat([self.A, x], dim), None, a zero-length tensor, a tensor, "
                          "and `x if self.A is None else torch.cat(...)`)")
        return [stmt]

    def _empty_flag(self, tested: str, at: ast.AST, prelude: list[ast.stmt]) -> ast.expr:
        """A local holding ``self.<tested>.is_empty()`` (evaluated before any write), added to ``prelude``."""
        if not prelude:
            self.fresh += 1
            name = f"_graphfix_empty_{self.fresh}"
            call = ast.Call(func=self._cache(tested, "is_empty"), args=[], keywords=[])
            prelude.append(ast.copy_location(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=call), at))
        return ast.Name(id=prelude[0].targets[0].id, ctx=ast.Load())

    def merge_writes(self, attr: str, when_none: tuple[str, ast.expr | None], otherwise: tuple[str, ast.expr | None],
                     tested: str, at: ast.stmt, env: dict[str, Kind], prelude: list[ast.stmt]) -> list[ast.stmt] | None:
        """Branch-free writes of ``self.<attr>`` that do ``when_none`` if ``self.<tested>`` is empty, else
        ``otherwise``; ``None`` when the two cannot be merged exactly. A flag they need goes to ``prelude``."""
        (op_a, x_a), (op_b, x_b) = when_none, otherwise
        same_x = x_a is not None and x_b is not None and same(x_a, x_b)
        if op_a == op_b and (op_a == "reset" or same_x):
            return [self._call(attr, op_a, [] if op_a == "reset" else [self.plain(x_a, env)], at)]
        if (op_a, op_b) == ("replace", "append") and same_x:
            if attr == tested:  # replacing an empty cache is appending to it
                return [self._call(attr, "append", [self.plain(x_a, env)], at)]
            restart = [ast.keyword(arg="restart", value=self._empty_flag(tested, at, prelude))]
            return [self._call(attr, "append", [self.plain(x_a, env)], at, restart)]
        if {op_a, op_b} <= {"reset", "none"}:
            if op_a == "reset" and attr == tested:
                return []  # resetting an empty cache does nothing
            flag = self._empty_flag(tested, at, prelude)
            where = flag if op_a == "reset" else ast.UnaryOp(op=ast.Invert(), operand=flag)
            return [self._call(attr, "reset", [], at, [ast.keyword(arg="where", value=where)])]
        return None

    def merge_if(self, stmt: ast.If, test: tuple[str, bool], env: dict[str, Kind]) -> list[ast.stmt]:
        """``if self.A is None: <writes> else: <writes>`` -> the same writes, without the branch.

        Both branches must assign the same targets in the same order (an ``if`` without ``else``
        may only reset caches). Each pair of assignments becomes one branch-free statement
        (``merge_writes``, ``merge_local``); "is None" becomes ``self.A.is_empty()``, taken before
        any write.
        """
        tested, none_first = test
        when_none, otherwise = (stmt.body, stmt.orelse) if none_first else (stmt.orelse, stmt.body)
        shown = f"`if {self._src(stmt.test)}:`"
        try:
            ops_none, ops_other = self.branch_ops(when_none), self.branch_ops(otherwise)
        except Refused as exc:
            self.refuse(stmt, f"{shown} {exc}")
            return [stmt]
        keys_none, keys_other = [o.key for o in ops_none], [o.key for o in ops_other]
        one_sided_resets = not (keys_none and keys_other) and all(o.op == "reset" for o in ops_none + ops_other)
        if keys_none != keys_other and not one_sided_resets:
            self.refuse(stmt, f"the branches of {shown} do not assign the same targets in the same order")
            return [stmt]
        by_key_none, by_key_other = {o.key: o for o in ops_none}, {o.key: o for o in ops_other}
        prelude: list[ast.stmt] = []
        out: list[ast.stmt] = []
        written: set[str] = set()
        for key in keys_none or keys_other:
            a, b = by_key_none.get(key, BranchOp.absent(key)), by_key_other.get(key, BranchOp.absent(key))
            at = (a.stmt or b.stmt)
            kind, name = key
            if kind == "attr":
                merged = self.merge_writes(name, (a.op, a.operand), (b.op, b.operand), tested, at, env, prelude)
                written.add(name)
            else:
                local = self.merge_local(name, a, b, tested, written, at, env)
                merged = None if local is None else [local]
            if merged is None:
                self.refuse(at, f"the branches of {shown} assign `{name}` in ways graphfix cannot merge exactly")
                return [stmt]
            out.extend(merged)
        return prelude + out

    def merge_local(self, name: str, a: BranchOp, b: BranchOp, tested: str, written: set[str], at: ast.stmt,
                    env: dict[str, Kind]) -> ast.stmt | None:
        """``pos = 0`` / ``pos = self.A.shape[d]`` -> ``pos = self.A.seq_len()``; equal assignments stay one."""
        if (a.op, b.op) == ("zero", "length") and b.operand == tested and tested not in written:
            value: ast.expr = ast.Call(func=self._cache(tested, "seq_len"), args=[], keywords=[])
            env[name] = Position(tested)
            self.sites += 1
        elif a.op == b.op != "none" and same(a.value, b.value):
            value, kind = self.expr(a.value, env)
            self.bind(ast.Name(id=name, ctx=ast.Store()), kind, env)
        else:
            return None
        return ast.copy_location(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=value), at)

    def branch_ops(self, stmts: list[ast.stmt]) -> list[BranchOp]:
        """The assignments of a branch that only assigns caches and locals (``Refused`` otherwise)."""
        ops: list[BranchOp] = []
        for stmt in stmts:
            if isinstance(stmt, ast.Pass):
                continue
            if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
                raise Refused("has a branch that does more than assign caches and locals")
            target, value = stmt.targets[0], stmt.value
            pairs = list(zip(target.elts, value.elts)) if isinstance(target, ast.Tuple) and isinstance(
                value, ast.Tuple) and len(target.elts) == len(value.elts) else [(target, value)]
            for t, v in pairs:
                attr = self_attr(t, self.self_name)
                if attr in self.caches:
                    op, operand = self.write_op(attr, v)
                    ops.append(BranchOp(("attr", attr), op, operand, v, stmt))
                elif isinstance(t, ast.Name):
                    read = dim_read(v, self.self_name)
                    if const_int(v) == 0:
                        ops.append(BranchOp(("name", t.id), "zero", None, v, stmt))
                    elif read is not None and read[0] in self.caches and read[1] == self.caches[read[0]]:
                        ops.append(BranchOp(("name", t.id), "length", read[0], v, stmt))
                    else:
                        ops.append(BranchOp(("name", t.id), "value", None, v, stmt))
                else:
                    raise Refused(f"assigns `{self._src(t)}` in a branch")
        if len({o.key for o in ops}) != len(ops):
            raise Refused("assigns a target twice in one branch")
        return ops
