"""Expressions in the growing-cache rewrite: what each one holds, attention over the caches, and helpers.

``expr`` is the dispatch every read of a cache goes through: a cache attribute becomes its
buffer (a view), and the forms the other parts know (lengths, sizes, positions, view steps) are
tried in turn; anything else must not hold a cache value. Attention that reads key and value
from caches becomes ``attend_written`` over the whole buffer, and a cache handed to a user
function is followed into a rewritten copy of that function.
"""

from __future__ import annotations

import ast
import types

import torch.nn.functional as F

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import attention
from graphfix.rewrite.blocks import source_rewrite as sr
from passes import _cache_views as cv
from passes._cache_rewrite_base import AMBIGUOUS, HELPERS, STALE, Kind, Position, RewriteBase, length_parameter
from passes._cache_syntax import none_test, self_attr
from passes._cache_views import SizeOf, View


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):  # pragma: no cover - a signature for bind_call, never called
    """``F.scaled_dot_product_attention``'s parameters (the builtin has no introspectable signature)."""


class ExpressionRewrite(RewriteBase):
    """The expression dispatch, attention calls over caches, and calls handing a cache to a helper."""

    def expr(self, node: ast.expr, env: dict[str, Kind]) -> tuple[ast.expr, Kind]:
        attr = self_attr(node, self.self_name)
        if attr in self.caches:
            if not isinstance(node.ctx, ast.Load):
                self.refuse(node, f"`{self._src(node)}` is written in a form graphfix does not rewrite")
                return node, None
            return self._cache(attr, "buffer"), View.of_cache(attr, self.caches[attr])
        if isinstance(node, ast.Name):
            kind = env.get(node.id)
            if kind in (AMBIGUOUS, STALE):
                self.refuse(node, self._misuse(node, kind))
                return node, None
            return node, kind
        length = self.length_read(node, env)
        if length is not None:
            return length
        size = self.size_read(node, env)
        if size is not None:
            return size
        if isinstance(node, ast.Call):
            for handler in (self.attention_call, self.arange_call, self.layout_call, self.helper_call):
                handled = handler(node, env)
                if handled is not None:
                    return handled
        if isinstance(node, ast.Subscript):
            handled = self.position_slice(node, env) or self.new_axes(node, env)
            if handled is not None:
                return handled
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            handled = self.position_end(node, env)
            if handled is not None:
                return handled
        if isinstance(node, ast.Compare) and none_test(node, self.self_name) and \
                none_test(node, self.self_name)[0] in self.caches:
            self.refuse(node, f"`{self._src(node)}` tests the cache outside the forms graphfix rewrites "
                              "(`if self.A is None:` writing caches, `x if self.A is None else torch.cat(...)`)")
            return node, None
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            self.no_cache_inside(node, env)
            return node, None
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.expr) and not isinstance(value, ast.expr_context):
                setattr(node, field, self.plain(value, env))
            elif isinstance(value, list):
                setattr(node, field, [self._plain_part(v, env) for v in value])
        return node, None

    def _plain_part(self, value: object, env: dict[str, Kind]) -> object:
        if isinstance(value, ast.expr):
            return self.plain(value, env)
        if isinstance(value, ast.keyword):
            value.value = self.plain(value.value, env)
        return value

    def attention_call(self, node: ast.Call, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        target = sr.resolve(self.fn, node.func)
        if target is F.scaled_dot_product_attention:
            signature, helper = _sdpa_signature, "_graphfix_attend_written"
        elif target is attention.sdpa:
            signature, helper = attention.sdpa, "_graphfix_attend_written_grouped"
        else:
            return None
        try:
            bound = sr.bind_call(node, signature)
        except sr.Unrewritable:
            return None
        if "key" in bound:
            key_name, value_name, query_name = "key", "value", "query"
        else:
            key_name, value_name, query_name = "k", "v", "q"
        if key_name not in bound or value_name not in bound:
            return None
        if not (self.refers_to_cache(bound[key_name], env) or self.refers_to_cache(bound[value_name], env)):
            return None
        reported = len(self.reasons)
        key, key_kind = self.expr(bound[key_name], env)
        value, value_kind = self.expr(bound[value_name], env)
        if len(self.reasons) > reported:
            return node, None
        problem = self.attention_problem(node, key_kind, value_kind)
        if problem:
            self.refuse(node, problem)
            return node, None
        query = self.plain(bound[query_name], env)
        keywords = [ast.keyword(arg=name, value=self.plain(value_node, env)) for name, value_node in bound.items()
                    if name not in (query_name, key_name, value_name)]
        self.sites += 1
        call = ast.Call(func=ast.Name(id=helper, ctx=ast.Load()),
                        args=[self.length_of(key_kind), query, key, value], keywords=keywords)
        return ast.copy_location(call, node), None

    def attention_problem(self, node: ast.Call, key_kind: Kind, value_kind: Kind) -> str | None:
        if not isinstance(key_kind, View) or not isinstance(value_kind, View):
            return f"`{self._src(node)}` attends over a cache for only one of key and value"
        if not (key_kind.sdpa_ready and value_kind.sdpa_ready):
            return (f"`{self._src(node)}`: graphfix cannot show that the cache's sequence dim reaches attention "
                    "as dim -2 (batch first)")
        return None

    def helper_call(self, node: ast.Call, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """A cache view or position handed to a user function: call a rewritten copy of it instead.

        The copy is analysed with its parameters holding what the call passes; for each view it
        gets a keyword ``_graphfix_length_<param>`` (the written length that masks it), which the
        call passes. A copy that returns a view of what it was handed (Meta's ``repeat_kv``) makes
        the call a view too. The function itself is left as it is for its other callers.
        """
        target = sr.resolve(self.fn, node.func)
        if not reachable.user_function(target):
            return None
        values = [*node.args, *(k.value for k in node.keywords)]
        if not any(self.refers_to_cache(v, env) for v in values) or not any(self.peek(v, env) for v in values):
            return None
        try:
            bound = sr.bind_call(node, target)
        except sr.Unrewritable as exc:
            self.refuse(node, f"the cache reaches {target.__qualname__}, which graphfix cannot follow: {exc}")
            return node, None
        passed: dict[str, Kind] = {}
        for param, arg in bound.items():
            if not isinstance(arg, ast.expr):  # *args / **kwargs of the helper: not followed
                if any(self.refers_to_cache(a, env) for a in (arg.values() if isinstance(arg, dict) else arg)):
                    self.refuse(node, f"`{self._src(node)}` hands the cache to {target.__qualname__} through "
                                      f"*{param}")
                    return node, None
                continue
            kind = self.peek(arg, env)
            if isinstance(kind, View):
                passed[param] = View(param, kind.sizes)
            elif isinstance(kind, Position):
                passed[param] = Position(param)
            elif kind is not None and not (isinstance(kind, SizeOf) and not kind.differs):
                self.refuse(node, f"`{self._src(node)}` hands {target.__qualname__} a cache value it cannot follow")
                return node, None
        key = (target, tuple(sorted(passed.items())))
        if key not in self.copies:
            self.copies[key] = self.helper_copy(node, target, passed)
        copied = self.copies[key]
        if copied is None:
            return node, None  # refused, reasons given at the first call
        name, returned = copied
        views = [p for p, k in passed.items() if isinstance(k, View)]
        lengths = {p: self.length_of(self.peek(bound[p], env)) for p in views}
        result = None if returned is None else View(self.peek(bound[returned.attr], env).attr, returned.sizes)
        node.args = [self.expr(a, env)[0] for a in node.args]
        for kw in node.keywords:
            kw.value = self.expr(kw.value, env)[0]
        node.keywords.extend(ast.keyword(arg=length_parameter(p), value=v) for p, v in lengths.items())
        node.func = ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node.func)
        return node, result

    def helper_copy(self, node: ast.Call, target: types.FunctionType,
                    passed: dict[str, Kind]) -> tuple[str, View | None] | None:
        """Rewrite a copy of ``target`` for parameters holding ``passed``: ``(name bound here, view it returns)``."""
        try:
            tree = sr.function_tree(target)
        except sr.Unrewritable as exc:
            self.refuse(node, f"the cache reaches {target.__qualname__}, which graphfix cannot follow: {exc}")
            return None
        inner = type(self)(target, tree, {}, helper=True)  # a MethodRewrite, like self
        inner.run(passed)
        returned = [k for k in inner.returns if isinstance(k, View)]
        view = cv.joined(returned, f"{target.__qualname__}.return") if returned else None
        if returned and (len(returned) != len(inner.returns) or view is None):
            inner.refuse(tree, f"{target.__qualname__} returns a view of the cache on some paths only, or views "
                               "whose batch or sequence dims differ")
        if inner.reasons:
            self.reasons.extend(inner.reasons)
            return None
        views = [p for p, k in passed.items() if isinstance(k, View)]
        tree.args.kwonlyargs.extend(ast.arg(arg=length_parameter(p)) for p in views)
        tree.args.kw_defaults.extend(None for _ in views)
        try:
            copy_fn = sr.compile_function(target, tree, {**HELPERS, **inner.helpers})
        except sr.Unrewritable as exc:
            self.refuse(node, str(exc))
            return None
        name = f"_graphfix_fn_{target.__name__}_{len(self.helpers)}"
        self.helpers[name] = copy_fn
        self.sites += inner.sites
        return name, view
