"""The growing-cache construct in one method's source: find it, prove every use of it, rewrite it.

The construct is a module attribute that grows by concatenation and is read by attention::

    self.cache_k = k if self.cache_k is None else torch.cat([self.cache_k, k], dim=2)
    out = F.scaled_dot_product_attention(q, self.cache_k, self.cache_v, is_causal=T > 1)

After the pass the attribute is a ``PreallocatedCache`` (``graphfix.rewrite.blocks.kv_cache``)
and the method reads::

    self.cache_k.append(k)
    out = _graphfix_attend_written(self.cache_k.length, q, self.cache_k.buffer, self.cache_v.buffer, is_causal=T > 1)

A method is rewritten only when every appearance of a cache attribute is one of the forms
below, so the rewritten method provably computes what the original did:

- writes: ``torch.cat([self.A, x], dim)`` (append), ``None`` or a zero-length tensor (reset),
  any other tensor (the cache becomes it), the ``x if self.A is None else torch.cat(...)``
  conditional (a conditional on anything else stays a Python ``if`` around the writes), and ``if self.A is None: ... else: ...`` whose branches only write caches and
  locals (merged into one branch-free sequence: "is None" becomes the tensor ``is_empty()``);
- reads that reach ``F.scaled_dot_product_attention`` (or graphfix's ``sdpa``) as key and value
  through steps that keep the batch and sequence dims whole (``passes._cache_views``: transposes,
  dtype moves, head repeats, ``expand``/``reshape`` matched against the view's own sizes, also
  inside helpers such as Meta's ``repeat_kv``): attention runs over the whole buffer with a
  mask of the written positions, combined with SDPA's own ``is_causal`` or with the original's
  ``attn_mask`` widened to the buffer (``kv_cache.over_written``);
- the length (``self.A.shape[d]``, ``.size(d)``, ``0 if self.A is None else ...``), a tensor
  after the rewrite, used only as ``table[pos : pos + n]`` (becomes ``index_select``) or
  ``torch.arange(pos, pos + n)`` (becomes ``shifted_arange(pos, n)``).

Anything else is refused with its line, and the owner is left as it was.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import types

import torch
import torch.nn.functional as F

from graphfix.diagnose.findings import display_path
from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import attention, kv_cache
from graphfix.rewrite.blocks import source_rewrite as sr
from passes import _cache_views as cv
from passes._cache_views import SizeOf, View

HELPERS = {
    "_graphfix_attend_written": kv_cache.attend_written,
    "_graphfix_attend_written_grouped": kv_cache.attend_written_grouped,
    "_graphfix_take_positions": kv_cache.take_positions,
    "_graphfix_shifted_arange": kv_cache.shifted_arange,
}
RANK = 4
"""Caches are ``(batch, heads, seq, head_dim)`` or ``(batch, seq, heads, head_dim)``: what SDPA reads."""

_CATS = (torch.cat, torch.concat, torch.concatenate)
_EMPTY_MAKERS = (torch.empty, torch.zeros, torch.ones)
_LAYOUT_METHODS = frozenset({"contiguous", "float", "half", "bfloat16", "to", "type_as", "detach", "clone"})
_VIEW_FUNCTIONS = {torch.transpose: "transpose", torch.permute: "permute", torch.repeat_interleave: "repeat_interleave",
                   torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", attention.repeat_kv_heads: "repeat_kv_heads"}


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):  # pragma: no cover - a signature for bind_call, never called
    """``F.scaled_dot_product_attention``'s parameters (the builtin has no introspectable signature)."""


# ---------------------------------------------------------------------------
# Small matchers on expressions
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# What a value is, as far as the cache is concerned
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Position:
    """The cache's written length at some point (an int in the original, a 0-d tensor after)."""

    attr: str


@dataclasses.dataclass(frozen=True)
class PositionEnd:
    """``pos + count`` with ``pos`` a local holding a ``Position``."""

    start: str
    count_source: str
    """``ast.dump`` of the count: two ends are the same when their counts read the same."""
    count: ast.expr = dataclasses.field(compare=False, hash=False)


AMBIGUOUS = "ambiguous"
STALE = "stale"
"""A local that held a cache view before a later write to that cache (the original keeps the old tensor)."""
Kind = View | SizeOf | Position | PositionEnd | str | None
"""``None``: a plain value that has nothing to do with the cache."""


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


# ---------------------------------------------------------------------------
# The rewrite of one method
# ---------------------------------------------------------------------------


class MethodRewrite:
    """Rewrites the cache constructs of one method's tree in place; ``reasons`` lists what it could not prove.

    ``caches`` maps each cache attribute to its sequence dim (1 or 2). ``sites`` counts the
    constructs rewritten (a write, a reset, a length read, a position use, an attention call).
    """

    def __init__(self, fn: types.FunctionType, tree: ast.FunctionDef, caches: dict[str, int],
                 helper: bool = False) -> None:
        self.fn, self.tree, self.caches, self.helper = fn, tree, caches, helper
        params = tree.args.posonlyargs + tree.args.args
        self.self_name = params[0].arg if params and not helper else ""
        self.helpers: dict[str, types.FunctionType] = {}
        """Rewritten copies of the helpers this method hands the cache to, by the name the method calls them."""
        self.copies: dict[tuple, tuple[str, View | None] | None] = {}
        """``(helper, what its parameters hold)`` -> its rewritten copy's name and returned view (``None``: refused)."""
        self.sites = 0
        self.reasons: list[str] = []
        self.fresh = 0
        self.written: set[str] = set()
        """Caches written by the statement being rewritten (``invalidate_views`` after it)."""
        self.statement_index = 0
        self.returns: list[Kind] = []
        """What a helper's ``return`` statements give (a view of the cache handed in, or a plain value)."""

    @property
    def touches_cache(self) -> bool:
        return any(self_attr(n, self.self_name) in self.caches for n in ast.walk(self.tree))

    def run(self, env: dict[str, Kind] | None = None) -> None:
        """Rewrite the tree; ``env`` says what the parameters hold (a helper's cache views and positions)."""
        self.tree.body = self.block(self.tree.body, dict(env or {}))

    # -- reporting ---------------------------------------------------------

    def refuse(self, node: ast.AST, why: str) -> None:
        where = f"{display_path(self.fn.__code__.co_filename)}:{getattr(node, 'lineno', '?')}"
        self.reasons.append(f"{where}: {why}")

    def _src(self, node: ast.AST) -> str:
        text = ast.unparse(node)
        return text if len(text) <= 60 else text[:57] + "..."

    # -- small AST builders ------------------------------------------------

    def length_of(self, view: View) -> ast.expr:
        """The written length that masks ``view``: the cache's own, or, in a helper, the one its caller passes."""
        if self.helper:
            return ast.Name(id=length_parameter(view.attr), ctx=ast.Load())
        return self._cache(view.attr, "length")

    def _cache(self, attr: str, member: str | None = None) -> ast.expr:
        node: ast.expr = ast.Attribute(value=ast.Name(id=self.self_name, ctx=ast.Load()), attr=attr, ctx=ast.Load())
        return ast.Attribute(value=node, attr=member, ctx=ast.Load()) if member else node

    def _call(self, attr: str, method: str, args: list[ast.expr], at: ast.AST,
              keywords: list[ast.keyword] | None = None) -> ast.stmt:
        call = ast.Call(func=self._cache(attr, method), args=args, keywords=keywords or [])
        self.sites += 1
        self.written.add(attr)
        return ast.copy_location(ast.Expr(value=call), at)

    def invalidate_views(self, env: dict[str, Kind]) -> None:
        """After writes: locals holding a view of a written cache are stale (the original holds the old tensor)."""
        for name, kind in list(env.items()):
            if isinstance(kind, View) and kind.attr in self.written:
                env[name] = STALE
        self.written.clear()

    # -- statements ----------------------------------------------------------

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
                and len(target.elts) == len(stmt.value.elts) and not any(isinstance(e, ast.Starred) for e in target.elts):
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

    # -- cache writes --------------------------------------------------------

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

    # -- expressions -----------------------------------------------------------

    def peek(self, node: ast.expr, env: dict[str, Kind]) -> Kind:
        """What ``node`` holds, without rewriting it or counting or reporting anything."""
        state = (self.sites, len(self.reasons), self.fresh, dict(self.helpers), dict(self.copies))
        _, kind = self.expr(copy.deepcopy(node), dict(env))
        self.sites, self.fresh, self.helpers, self.copies = state[0], state[2], state[3], state[4]
        del self.reasons[state[1]:]
        return kind

    def refers_to_cache(self, node: ast.expr, env: dict[str, Kind]) -> bool:
        return any(self_attr(n, self.self_name) in self.caches or (isinstance(n, ast.Name) and env.get(n.id))
                   for n in ast.walk(node))

    def plain(self, node: ast.expr, env: dict[str, Kind]) -> ast.expr:
        """``node`` rewritten; it must not hold a cache value (a view, a position) itself."""
        new, kind = self.expr(node, env)
        if kind is not None and not (isinstance(kind, SizeOf) and not kind.differs):
            self.refuse(node, self._misuse(node, kind))
        return new

    def _misuse(self, node: ast.AST, kind: Kind) -> str:
        if isinstance(kind, View):
            cache = f"the cache handed to {self.fn.__qualname__} as `{kind.attr}`" if self.helper else \
                f"the cache self.{kind.attr}"
            return (f"`{self._src(node)}` uses {cache} other than as the key/value of "
                    "F.scaled_dot_product_attention (or graphfix's sdpa) through steps that keep its batch and "
                    "sequence dims")
        if isinstance(kind, SizeOf):
            return (f"`{self._src(node)}` is the cache's {'batch' if kind.token == cv.BATCH else 'length'} read "
                    "from its shape (another number after the rewrite) and is used other than to keep that dim "
                    "in expand/reshape")
        if isinstance(kind, (Position, PositionEnd)):
            return (f"`{self._src(node)}` uses the cache length (a tensor after the rewrite) other than as "
                    "table[pos : pos + n] or torch.arange(pos, pos + n)")
        if kind == STALE:
            return (f"`{self._src(node)}` holds the cache as it was before a later write; the preallocated cache "
                    "would show the write")
        return f"`{self._src(node)}` may hold a cache value or not, depending on a branch"

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
        inner = MethodRewrite(target, tree, {}, helper=True)
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

    def layout_call(self, node: ast.Call, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """Shape-keeping steps on a cache view (``passes._cache_views``): transpose, permute, unsqueeze, expand,
        reshape/view, dtype/device moves, repeats on a head dim, graphfix's ``repeat_kv_heads``."""
        target = sr.resolve(self.fn, node.func)
        if target in _VIEW_FUNCTIONS:
            if not node.args:
                return None
            base_node, args, method = node.args[0], node.args[1:], _VIEW_FUNCTIONS[target]
        elif isinstance(node.func, ast.Attribute) and not isinstance(sr.resolve(self.fn, node.func.value),
                                                                     types.ModuleType):
            base_node, args, method = node.func.value, node.args, node.func.attr
        else:
            return None
        if not isinstance(self.peek(base_node, env), View):
            return None
        if method == "size":
            return None  # a size read: size_read
        base, kind = self.expr(base_node, env)
        moved = self.moved(kind, method, args, node.keywords, env)
        if moved is None:
            self.refuse(node, self._misuse(node, kind))
            return node, None
        args = [self.size_argument(a, env) if method in ("expand", "reshape", "view") else self.plain(a, env)
                for a in args]
        for kw in node.keywords:
            kw.value = self.plain(kw.value, env)
        if isinstance(node.func, ast.Attribute) and node.func.value is base_node:
            node.func.value = base
        else:
            node.args[0] = base
        node.args[len(node.args) - len(args):] = args
        return node, moved

    def moved(self, view: View, method: str, args: list[ast.expr], keywords: list[ast.keyword],
              env: dict[str, Kind]) -> View | None:
        if method in _LAYOUT_METHODS:
            return view
        numbers = [const_int(a) for a in args]
        if method == "transpose" and len(args) == 2 and not keywords and None not in numbers:
            return cv.transposed(view, *numbers)
        if method == "permute" and not keywords:
            order = args[0].elts if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else args
            numbers = [const_int(a) for a in order]
            return None if None in numbers else cv.permuted(view, numbers)
        if method == "unsqueeze" and len(args) == 1 and not keywords and numbers[0] is not None:
            return cv.unsqueezed(view, numbers[0])
        if method == "repeat_interleave" and args:
            dim = const_int(args[1] if len(args) > 1 else next((k.value for k in keywords if k.arg == "dim"), None))
            return None if dim is None else cv.repeated(view, dim, self.size_token(args[0]))
        if method == "repeat_kv_heads" and len(args) == 1:  # graphfix's: (b, n_kv, s, d) -> (b, n_kv * n_rep, s, d)
            return cv.repeated(view, 1, self.size_token(args[0])) if view.sdpa_ready else None
        if method in ("expand", "reshape", "view") and not keywords:
            sizes = args[0].elts if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)) else args
            targets = [self.size_tokens(a, env) for a in sizes]
            if any(t == [] for t in targets):
                return None
            return cv.expanded(view, targets) if method == "expand" else cv.reshaped(view, targets)
        return None

    def size_argument(self, node: ast.expr, env: dict[str, Kind]) -> ast.expr:
        """An ``expand``/``reshape`` argument, already checked by ``moved`` (a batch or length read may stay)."""
        if isinstance(node, (ast.Tuple, ast.List)):
            node.elts = [self.expr(e, env)[0] for e in node.elts]
            return node
        return self.expr(node, env)[0]

    def size_token(self, node: ast.expr) -> str:
        """An opaque token for a plain int expression, equal only to the same text in the same statement."""
        return f"expr{self.statement_index}:{ast.dump(node)}"

    def size_tokens(self, node: ast.expr, env: dict[str, Kind]) -> list[str] | None:
        """What an ``expand``/``reshape`` size argument multiplies: ``None`` for ``-1``, ``[]`` if unknown."""
        if const_int(node) == -1:
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = self.size_tokens(node.left, env), self.size_tokens(node.right, env)
            return [] if left is None or right is None or [] in (left, right) else left + right
        if const_int(node) == 1:
            return [cv.UNIT]
        kind = self.peek(node, env)
        if isinstance(kind, SizeOf):
            return [kind.token]
        return [self.size_token(node)] if kind is None else []

    def size_read(self, node: ast.expr, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``x.shape[i]`` / ``x.size(i)`` of a cache view: its size token (batch and sequence differ after)."""
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "shape":
            base_node, index = node.value.value, const_int(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size" \
                and len(node.args) == 1 and not node.keywords:
            base_node, index = node.func.value, const_int(node.args[0])
        else:
            return None
        view = self.peek(base_node, env)
        if not isinstance(view, View) or index is None or not -len(view.sizes) <= index < len(view.sizes):
            return None
        base, _ = self.expr(base_node, env)
        if isinstance(node, ast.Subscript):
            node.value.value = base
        else:
            node.func.value = base
        return node, SizeOf(view.sizes[index])

    def shape_unpack(self, target: ast.expr, value: ast.expr, env: dict[str, Kind]) -> bool:
        """``bsz, h, seqlen, d = x.shape`` (or ``x.size()``) of a cache view: each name gets its size token."""
        if isinstance(value, ast.Attribute) and value.attr == "shape":
            base_node = value.value
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr == "size" \
                and not value.args and not value.keywords:
            base_node = value.func.value
        else:
            return False
        view = self.peek(base_node, env)
        if not isinstance(view, View) or not isinstance(target, (ast.Tuple, ast.List)) \
                or len(target.elts) != len(view.sizes) or not all(isinstance(e, ast.Name) for e in target.elts):
            return False
        base, _ = self.expr(base_node, env)
        if isinstance(value, ast.Attribute):
            value.value = base
        else:
            value.func.value = base
        for name, token in zip(target.elts, view.sizes):
            env[name.id] = SizeOf(token)
        return True

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

    def new_axes(self, node: ast.Subscript, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``x[:, :, None]``: new size-1 axes on a cache view (every other index a bare ``:``)."""
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if not any(is_none(p) for p in parts) or not isinstance(self.peek(node.value, env), View):
            return None
        if not all(is_none(p) or isinstance(p, ast.Slice) and p.lower is None and p.upper is None and p.step is None
                   for p in parts):
            return None
        base, view = self.expr(node.value, env)
        for index, part in enumerate(parts):
            if is_none(part):
                view = cv.unsqueezed(view, index)
        node.value = base
        return node, view

    def position_end(self, node: ast.BinOp, env: dict[str, Kind]) -> tuple[ast.expr, Kind] | None:
        """``pos + n`` with ``pos`` a local position: kept for a later ``table[pos:end]`` / ``arange(pos, end)``."""
        for start, count in ((node.left, node.right), (node.right, node.left)):
            if isinstance(start, ast.Name) and isinstance(env.get(start.id), Position):
                if self.peek(count, env) is not None:
                    return None
                return node, PositionEnd(start.id, ast.dump(count), copy.deepcopy(count))
        return None


def length_parameter(param: str) -> str:
    """The keyword a rewritten helper takes for the written length of the cache view in ``param``."""
    return f"_graphfix_length_{param}"


def _merge_into(env: dict[str, Kind], *branches: dict[str, Kind]) -> None:
    """``env`` after branches that ran one of ``branches``: a name that differs between them is ambiguous."""
    names = set().union(*branches)
    merged: dict[str, Kind] = {}
    for name in names:
        kinds = [b.get(name) for b in branches]
        merged[name] = kinds[0] if all(k == kinds[0] for k in kinds) else AMBIGUOUS
    env.clear()
    env.update({n: k for n, k in merged.items() if k is not None})
