"""The growing-cache rewrite's walk over statements: blocks, branches, loops, assignments, what locals hold.

It carries, statement by statement, what each local holds (a view of a cache, its length, a
position, or nothing to do with it), merges that over branches (a name that differs between
them is ambiguous), refuses a loop that changes it, and hands cache writes to
``passes._cache_writes`` and expressions to ``passes._cache_expressions``.
"""

from __future__ import annotations

import ast

from passes._cache_rewrite_base import AMBIGUOUS, Kind, RewriteBase
from passes._cache_syntax import none_test, self_attr
from passes._cache_views import View


class StatementRewrite(RewriteBase):
    """Statements of the method: control flow, assignments and the locals they bind."""

    def block(self, stmts: list[ast.stmt], env: dict[str, Kind]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in stmts:
            self.statement_index += 1
            out.extend(self.statement(stmt, env))
            self.invalidate_views(env)
        return out

    def statement(self, stmt: ast.stmt, env: dict[str, Kind]) -> list[ast.stmt]:
        if isinstance(stmt, ast.Assign):
            return self.assign(stmt, env)
        if isinstance(stmt, ast.If):
            test = none_test(stmt.test, self.self_name)
            if test is not None and test[0] in self.caches:
                return self.merge_if(stmt, test, env)
            stmt.test = self.plain(stmt.test, env)
            body_env, else_env = dict(env), dict(env)
            stmt.body = self.block(stmt.body, body_env) or [ast.Pass()]
            stmt.orelse = self.block(stmt.orelse, else_env)
            _merge_into(env, body_env, else_env)
            return [stmt]
        if isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
            return [self.loop(stmt, env)]
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                item.context_expr = self.plain(item.context_expr, env)
                if item.optional_vars is not None:
                    self.unbind(item.optional_vars, env)
            stmt.body = self.block(stmt.body, env)
            return [stmt]
        if isinstance(stmt, ast.Try):
            return [self.try_(stmt, env)]
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.no_cache_inside(stmt, env)
            return [stmt]
        if isinstance(stmt, ast.Return) and self.helper and stmt.value is not None:
            stmt.value, kind = self.expr(stmt.value, env)
            if kind is not None and not isinstance(kind, View):
                self.refuse(stmt, self._misuse(stmt.value, kind))
            self.returns.append(kind)
            return [stmt]
        if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
            if stmt.value is not None:
                stmt.value = self.plain(stmt.value, env)
            self.store_target(stmt.target, env)
            return [stmt]
        if isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                self.store_target(target, env)
            return [stmt]
        self.generic_statement(stmt, env)
        return [stmt]

    def generic_statement(self, stmt: ast.stmt, env: dict[str, Kind]) -> None:
        for field, value in ast.iter_fields(stmt):
            if isinstance(value, ast.expr):
                setattr(stmt, field, self.plain(value, env))
            elif isinstance(value, list):
                setattr(stmt, field, [self.plain(v, env) if isinstance(v, ast.expr) else v for v in value])

    def loop(self, stmt: ast.For | ast.AsyncFor | ast.While, env: dict[str, Kind]) -> ast.stmt:
        if isinstance(stmt, ast.While):
            stmt.test = self.plain(stmt.test, env)
        else:
            stmt.iter = self.plain(stmt.iter, env)
            self.unbind(stmt.target, env)
        body_env = dict(env)
        stmt.body = self.block(stmt.body, body_env)
        changed = {n for n in set(env) | set(body_env) if env.get(n) != body_env.get(n)}
        tracked = {n for n in changed if env.get(n) is not None or body_env.get(n) is not None}
        if tracked:
            self.refuse(stmt, f"a loop changes what {', '.join(sorted(tracked))} hold(s) from the cache")
        stmt.orelse = self.block(stmt.orelse, dict(env))
        _merge_into(env, env, body_env)
        return stmt

    def try_(self, stmt: ast.Try, env: dict[str, Kind]) -> ast.stmt:
        envs = [dict(env) for _ in range(len(stmt.handlers) + 1)]
        stmt.body = self.block(stmt.body, envs[0])
        for handler, handler_env in zip(stmt.handlers, envs[1:]):
            if handler.type is not None:
                handler.type = self.plain(handler.type, handler_env)
            handler.body = self.block(handler.body, handler_env)
        stmt.orelse = self.block(stmt.orelse, envs[0])
        _merge_into(env, *envs)
        stmt.finalbody = self.block(stmt.finalbody, env)
        return stmt

    def no_cache_inside(self, node: ast.AST, env: dict[str, Kind]) -> None:
        for sub in ast.walk(node):
            if self_attr(sub, self.self_name) in self.caches or (isinstance(sub, ast.Name) and env.get(sub.id)):
                self.refuse(sub, f"`{self._src(sub)}` is used inside a nested function or class")
                return

    def unbind(self, target: ast.AST, env: dict[str, Kind]) -> None:
        for sub in ast.walk(target):
            if isinstance(sub, ast.Name):
                env.pop(sub.id, None)
            elif self_attr(sub, self.self_name) in self.caches:
                self.refuse(sub, f"`{self._src(sub)}` is bound here in a form graphfix does not rewrite")

    def store_target(self, target: ast.expr, env: dict[str, Kind]) -> None:
        """A target that must not be a cache attribute; names in it lose what they held."""
        if isinstance(target, ast.Name):
            env.pop(target.id, None)
            return
        if self_attr(target, self.self_name) in self.caches:
            self.refuse(target, f"`{self._src(target)}` is written in a form graphfix does not rewrite")
            return
        if isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.store_target(elt, env)
            return
        if isinstance(target, ast.Starred):
            self.store_target(target.value, env)
            return
        for field, value in ast.iter_fields(target):  # x[i] = ..., obj.attr = ...: the parts are reads
            if isinstance(value, ast.expr) and not isinstance(value, ast.expr_context):
                setattr(target, field, self.plain(value, env))

    def assign(self, stmt: ast.Assign, env: dict[str, Kind]) -> list[ast.stmt]:
        attrs = [self_attr(t, self.self_name) for t in stmt.targets]
        if len(attrs) > 1 and all(a in self.caches for a in attrs) and all(
                self.write_op(a, stmt.value)[0] == "reset" for a in attrs):
            return [self._call(a, "reset", [], stmt) for a in attrs]  # self.cache_k = self.cache_v = None
        if len(stmt.targets) != 1:
            for target in stmt.targets:
                self.store_target(target, env)
            stmt.value = self.plain(stmt.value, env)
            return [stmt]
        target = stmt.targets[0]
        attr = self_attr(target, self.self_name)
        if attr in self.caches:
            return self.cache_write(attr, stmt.value, stmt, env)
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(stmt.value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(stmt.value.elts) \
                and not any(isinstance(e, ast.Starred) for e in target.elts):
            if any(self_attr(e, self.self_name) in self.caches for e in target.elts):
                return self.split_tuple(stmt, env)
            values = [self.expr(v, env) for v in stmt.value.elts]
            stmt.value.elts = [v for v, _ in values]
            for elt, (_, kind) in zip(target.elts, values):
                self.bind(elt, kind, env)
            return [stmt]
        if self.shape_unpack(target, stmt.value, env):
            return [stmt]
        value, kind = self.expr(stmt.value, env)
        stmt.value = value
        self.bind(target, kind, env)
        return [stmt]

    def bind(self, target: ast.expr, kind: Kind, env: dict[str, Kind]) -> None:
        if isinstance(target, ast.Name):
            if kind is None:
                env.pop(target.id, None)
            else:
                env[target.id] = kind
            return
        if kind is not None:
            self.refuse(target, f"a value read from the cache is stored in `{self._src(target)}`")
        self.store_target(target, env)

    def split_tuple(self, stmt: ast.Assign, env: dict[str, Kind]) -> list[ast.stmt]:
        """``self.cache_k, self.cache_v = k, v``: one write per element (no element reads another's target)."""
        targets, values = stmt.targets[0].elts, stmt.value.elts
        target_dumps = {ast.dump(t) for t in targets}
        if any(ast.dump(sub) in target_dumps for v in values for sub in ast.walk(v)):
            self.refuse(stmt, "a tuple assignment reads one of its own targets")
            return [stmt]
        out: list[ast.stmt] = []
        for target, value in zip(targets, values):
            single = ast.copy_location(ast.Assign(targets=[target], value=value), stmt)
            out.extend(self.assign(single, env))
        return out


def _merge_into(env: dict[str, Kind], *branches: dict[str, Kind]) -> None:
    """``env`` after branches that ran one of ``branches``: a name that differs between them is ambiguous."""
    names = set().union(*branches)
    merged: dict[str, Kind] = {}
    for name in names:
        kinds = [b.get(name) for b in branches]
        merged[name] = kinds[0] if all(k == kinds[0] for k in kinds) else AMBIGUOUS
    env.clear()
    env.update({n: k for n, k in merged.items() if k is not None})
