"""Steps on a view of a growing cache that keep its batch and sequence dims, and reads of its sizes.

Transposes, permutes, new axes, dtype/device moves, head repeats and ``expand``/``reshape``/``view``
whose sizes are the view's own (``passes._cache_views`` keeps the dims' algebra); ``x.shape[i]``,
``x.size(i)`` and ``b, h, s, d = x.shape`` give size tokens, so a reshape can be matched to them.
"""

from __future__ import annotations

import ast
import types

import torch

from graphfix.rewrite.blocks import attention
from graphfix.rewrite.blocks import source_rewrite as sr
from passes import _cache_views as cv
from passes._cache_rewrite_base import Kind, RewriteBase
from passes._cache_syntax import const_int, is_none
from passes._cache_views import SizeOf, View

_LAYOUT_METHODS = frozenset({"contiguous", "float", "half", "bfloat16", "to", "type_as", "detach", "clone"})
_VIEW_FUNCTIONS = {torch.transpose: "transpose", torch.permute: "permute", torch.repeat_interleave: "repeat_interleave",
                   torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", attention.repeat_kv_heads: "repeat_kv_heads"}


class StepRewrite(RewriteBase):
    """Shape-keeping steps on cache views and the size tokens read from them."""

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
