"""What a value is to the growing-cache rewrite, and the state one method's rewrite carries.

``MethodRewrite`` (``passes._growing_cache``) is put together from parts, one per kind of
construct (statements, cache writes, expressions, view steps, positions); each part is a class
over ``RewriteBase``, which holds what they share: the method, the caches and their sequence
dims, the sites counted, the reasons refused, and the few calls every part makes (``peek``,
``plain``, ``refuse``, the ``self.<cache>`` builders). The parts call each other through
``self``; ``RewriteBase`` declares the two they all recurse into (``block``, ``expr``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import types

from graphfix.diagnose.findings import display_path
from graphfix.rewrite.blocks import kv_cache
from passes import _cache_views as cv
from passes._cache_syntax import self_attr
from passes._cache_views import SizeOf, View

HELPERS = {
    "_graphfix_attend_written": kv_cache.attend_written,
    "_graphfix_attend_written_grouped": kv_cache.attend_written_grouped,
    "_graphfix_take_positions": kv_cache.take_positions,
    "_graphfix_shifted_arange": kv_cache.shifted_arange,
}
"""The functions the rewritten source calls, by the names it calls them."""


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


def length_parameter(param: str) -> str:
    """The keyword a rewritten helper takes for the written length of the cache view in ``param``."""
    return f"_graphfix_length_{param}"


class RewriteBase:
    """The state of one method's rewrite and the calls every part of it makes; ``MethodRewrite`` is the whole."""

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

    # -- what the parts recurse into ------------------------------------------

    def block(self, stmts: list[ast.stmt], env: dict[str, Kind]) -> list[ast.stmt]:
        raise NotImplementedError  # StatementRewrite.block

    def expr(self, node: ast.expr, env: dict[str, Kind]) -> tuple[ast.expr, Kind]:
        raise NotImplementedError  # ExpressionRewrite.expr

    # -- expressions every part reads ----------------------------------------

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
