"""Recognise manual attention in a function's source: ``softmax(scale * q kᵀ + mask) v``, however it is spelled.

The match starts at a product of two tensors (``p @ v``, ``torch.matmul``, ``torch.bmm``, ``.matmul``,
``torch.einsum``) whose first factor reaches a softmax, and walks the data flow backwards through single
assignments of one block (a function body or a branch): probability casts and dropout, the softmax (with its
float32 upcast), masks (additive, ``masked_fill(..., -inf)``, ``torch.where``, also under ``if <test>:``),
scale factors (on the scores or on q), and the ``q kᵀ`` product. What it finds is a ``Site``: the three SDPA
operands in ``(batch..., heads, seq, head_dim)`` layout (transposes applied), the mask, dropout and scale
expressions, and the statements the rewrite removes. A construct that is attention but does not match in full
raises ``NoMatch`` with what did not match; nothing is ever half-rewritten.

Two readings are assumptions, stated so a reader can check them: ``k.transpose(2, 3)`` (positive dims) is read
as the transpose of the last two dims of a 4-D tensor, and a softmax over ``dim=3`` as the key dim of 4-D
scores. Every attention we know writes them so; negative dims and einsum subscripts need no assumption.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite import dataflow
from graphfix.rewrite.blocks import source_rewrite as sr

_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax)
_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
_CASTS = ("float", "half", "bfloat16", "type_as", "to", "type")
_IN_PLACE = {"masked_fill_": "masked_fill", "add_": ast.Add, "mul_": ast.Mult, "div_": ast.Div}
_MAX_DEPTH = 64
WHERE = "_graphfix_where"
"""The name a combined boolean-and-additive mask calls ``torch.where`` by (the rewrite binds it)."""


class NoMatch(Exception):
    """The construct is attention, but one part of it is not something SDPA expresses; the message says which."""

    def __init__(self, line: int | None, what: str) -> None:
        super().__init__(f"line {line}: {what}" if line else what)
        self.line = line
        self.what = what
        self.softmax: ast.Call | None = None
        """The softmax of the attention that did not match, when known (so it is reported once)."""


class _QueryReadElsewhere(NoMatch):
    """The scaled query, folded into SDPA's scale, is read elsewhere too: match again with it as a plain operand."""


@dataclasses.dataclass
class MaskPart:
    """One mask applied to the scores: additive, or boolean with True where a query may attend."""

    expr: ast.expr
    boolean: bool
    condition: ast.expr | None = None
    """Applied only when this holds (the mask was added under ``if <condition>:``)."""


@dataclasses.dataclass
class Site:
    """A matched attention: where it is, the SDPA arguments, and what the rewrite removes."""

    body: list[ast.stmt]
    index: int
    """The statement of ``body`` that computes the output (the product is replaced there)."""
    product: ast.expr
    softmax: ast.Call
    query: ast.expr
    key: ast.expr
    value: ast.expr
    output_perm: tuple[int, ...] | None
    """How the SDPA output's dims map to the original output's (``None``: the same layout)."""
    attn_mask: ast.expr | None
    scale: ast.expr
    dropout_p: ast.expr | None
    removed: list[Removal]
    upcast: bool
    """The original computed the softmax in float32 (and cast back)."""

    def statements(self) -> set[int]:
        """Ids of the statements the rewrite touches (removed ones, their ``if``, and the output's)."""
        touched = {id(r.stmt) for r in self.removed} | {id(r.outer) for r in self.removed if r.outer is not None}
        return touched | {id(self.body[self.index])}


@dataclasses.dataclass
class Removal:
    """A statement the rewrite deletes from ``block``; when it empties the body of ``outer`` (an ``if``), that goes."""

    block: list[ast.stmt]
    stmt: ast.stmt
    outer: ast.If | None = None


class Scope:
    """What is known about a function's names beyond its source: the module instances a method is bound to."""

    def __init__(self, fn: types.FunctionType, tree: ast.FunctionDef, instances: list[nn.Module] | None) -> None:
        self.fn = fn
        self.tree = tree
        self.instances = instances or []
        params = tree.args.posonlyargs + tree.args.args
        self.self_name = params[0].arg if self.instances and params else None
        self.annotations = {a.arg: a.annotation for a in params + tree.args.kwonlyargs if a.annotation is not None}
        self.parents: dict[int, tuple[list[ast.stmt], int]] = {}
        """Block id -> (the block around it, the index of the statement that holds it)."""
        for block in dataflow.blocks(tree):
            for i, stmt in enumerate(block):
                for inner in dataflow.child_blocks(stmt):
                    self.parents[id(inner)] = (block, i)

    def attribute_values(self, node: ast.AST) -> list[Any] | None:
        """The values of ``self.a.b`` on every instance, or ``None`` (not such a chain, or not plain attributes)."""
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if not (chain and isinstance(node, ast.Name) and node.id == self.self_name):
            return None
        values = []
        for obj in self.instances:
            for attr in reversed(chain):
                obj = _plain_attribute(obj, attr)
                if obj is _MISSING:
                    return None
            values.append(obj)
        return values

    def is_number(self, node: ast.AST, at: int, body: list[ast.stmt], depth: int = 0) -> bool:
        """Whether ``node`` (read at ``body[at]``) is provably a Python int or float (SDPA's ``scale`` must be one)."""
        if depth > _MAX_DEPTH:
            return False
        again = lambda n: self.is_number(n, at, body, depth + 1)
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return again(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow,
                                                                ast.FloorDiv)):
            return again(node.left) and again(node.right)
        if isinstance(node, ast.Call):
            target = sr.resolve(self.fn, node.func)
            if target in (float, int, len) or getattr(target, "__module__", None) == "math":
                return True
            return _is_size_call(node)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "shape":
            return not isinstance(node.slice, ast.Slice)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) and _is_size_call(node.value, 0):
            return not isinstance(node.slice, ast.Slice)
        if isinstance(node, ast.Attribute):
            values = self.attribute_values(node)
            if values is None:
                values = [sr.resolve(self.fn, node)]
            return bool(values) and all(_python_number(v) for v in values)
        if isinstance(node, ast.Name):
            return self._is_number_name(node, at, body, depth)
        return False

    def _is_number_name(self, node: ast.Name, at: int, body: list[ast.stmt], depth: int) -> bool:
        j = dataflow.last_write(body, at, node.id)
        if j is not None:
            stmt = body[j]
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
                if isinstance(target, ast.Name):
                    return self.is_number(stmt.value, j, body, depth + 1)
                if isinstance(target, ast.Tuple) and any(isinstance(e, ast.Name) and e.id == node.id
                                                         for e in target.elts):
                    value = stmt.value  # b, h, t, d = x.shape / x.size()
                    return (isinstance(value, ast.Attribute) and value.attr == "shape") or _is_size_call(value, 0)
            return False
        parent = self.parents.get(id(body))
        if parent is not None and not dataflow.is_loop(parent[0][parent[1]]):
            return self._is_number_name(node, parent[1], parent[0], depth + 1)
        if node.id in self.fn.__code__.co_varnames:
            annotation = self.annotations.get(node.id)
            return annotation is not None and ast.unparse(annotation) in ("float", "int")
        return _python_number(sr.resolve(self.fn, node))


_MISSING = object()


def _plain_attribute(obj: Any, name: str) -> Any:
    """``obj.name`` when it is plain data (instance dict, a module's parameters/buffers/children, a class constant).

    Properties and other descriptors are not run: looking must not execute user code.
    """
    if isinstance(obj, nn.Module):
        for store in ("_parameters", "_buffers", "_modules"):
            table = obj.__dict__.get(store, {})
            if name in table:
                return table[name]
    if name in getattr(obj, "__dict__", {}):
        return obj.__dict__[name]
    try:
        static = inspect.getattr_static(obj, name)
    except AttributeError:
        return _MISSING
    if isinstance(static, (int, float, bool, str, type(None))):
        return static
    return _MISSING


def _python_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_size_call(node: ast.AST, nargs: int = 1) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size"
            and len(node.args) == nargs and not node.keywords)


def _int_constant(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_constant(node.operand)
        return None if inner is None else -inner
    return None


def _method(node: ast.AST, *names: str) -> ast.Call | None:
    """``node`` when it is a call ``<receiver>.<name>(...)`` of one of ``names``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names:
        return node
    return None


def permuted(expr: ast.expr, perm: tuple[int, ...]) -> ast.expr:
    """``expr`` with its dims in the order ``perm`` (a transpose when two dims swap, else a permute)."""
    moved = [i for i, p in enumerate(perm) if i != p]
    if not moved:
        return expr
    if len(moved) == 2:
        args = [ast.Constant(moved[0]), ast.Constant(moved[1])]
        name = "transpose"
    else:
        args = [ast.Constant(p) for p in perm]
        name = "permute"
    return ast.Call(func=ast.Attribute(value=expr, attr=name, ctx=ast.Load()), args=args, keywords=[])


def _negated(cond: ast.expr) -> ast.expr:
    """The boolean mask that keeps what ``cond`` fills: ``m == 0`` -> ``m != 0``, ``~m`` -> ``m``, else ``~(cond)``."""
    if isinstance(cond, ast.Compare) and len(cond.ops) == 1 and isinstance(cond.ops[0], (ast.Eq, ast.NotEq)):
        op = ast.NotEq() if isinstance(cond.ops[0], ast.Eq) else ast.Eq()
        return ast.Compare(left=cond.left, ops=[op], comparators=cond.comparators)
    if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Invert):
        return cond.operand
    return ast.UnaryOp(op=ast.Invert(), operand=cond)


@dataclasses.dataclass
class _Product:
    kind: str  # "matmul", "bmm" or "einsum"
    left: ast.expr
    right: ast.expr
    spec: tuple[str, str, str] | None = None


@dataclasses.dataclass
class _Step:
    """A value an intermediate name holds, read at ``body[at]``: its expression and where it was written."""

    value: ast.expr
    at: int
    condition: ast.expr | None
    stmt: ast.stmt
    block: list[ast.stmt]
    outer: ast.If | None


class Matcher:
    """Finds attention sites in one function; ``match`` answers for one product node of one block."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.fn = scope.fn

    # --- recognisers for single nodes -------------------------------------------------------------

    def product(self, node: ast.AST) -> _Product | None:
        """``a @ b``, ``torch.matmul/bmm(a, b)``, ``a.matmul/bmm(b)``, ``torch.einsum("..", a, b)``."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return _Product("matmul", node.left, node.right)
        if not isinstance(node, ast.Call) or node.keywords:
            return None
        target = sr.resolve(self.fn, node.func)
        if target in (torch.matmul, torch.bmm) and len(node.args) == 2:
            return _Product("bmm" if target is torch.bmm else "matmul", *node.args)
        if target is torch.einsum:
            args = node.args
            if len(args) == 2 and isinstance(args[1], (ast.List, ast.Tuple)):
                args = [args[0], *args[1].elts]
            if len(args) == 3 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                spec = args[0].value.replace(" ", "")
                inputs, _, output = spec.partition("->")
                operands = inputs.split(",")
                if len(operands) == 2 and output:
                    return _Product("einsum", args[1], args[2], (operands[0], operands[1], output))
            return None
        if target is sr.MISSING and _method(node, "matmul", "bmm") and len(node.args) == 1:
            return _Product(node.func.attr, node.func.value, node.args[0])
        return None

    def softmax(self, node: ast.AST) -> tuple[ast.expr, ast.expr | None, ast.expr | None] | None:
        """``(input, dim, dtype)`` of ``F.softmax``, ``torch.softmax``, ``x.softmax``, or an ``nn.Softmax`` module."""
        if not isinstance(node, ast.Call):
            return None
        target = sr.resolve(self.fn, node.func)
        if target is F.softmax:
            args = sr.bind_call(node, F.softmax)
            return args["input"], args.get("dim"), args.get("dtype")
        keywords = {k.arg: k.value for k in node.keywords}
        if target is torch.softmax and node.args:
            rest = list(node.args[1:]) + [None, None]
            return node.args[0], keywords.get("dim", rest[0]), keywords.get("dtype", rest[1])
        modules = self.scope.attribute_values(node.func)
        if modules is not None:  # self.<name>(x): a module, never the tensor method
            if all(type(m) is nn.Softmax for m in modules) and len(node.args) == 1 and not node.keywords:
                dims = {m.dim for m in modules}
                return node.args[0], ast.Constant(dims.pop()) if len(dims) == 1 else None, None
            return None
        if target is sr.MISSING and _method(node, "softmax"):
            rest = list(node.args) + [None, None]
            return node.func.value, keywords.get("dim", rest[0]), keywords.get("dtype", rest[1])
        return None

    def dropout(self, node: ast.AST) -> tuple[ast.expr, ast.expr | None, ast.expr | None] | None:
        """``(input, p, training)`` of ``F.dropout``/``torch.dropout`` or an ``nn.Dropout`` module (``p`` ``None``:
        an ``nn.Identity``, no dropout)."""
        if not isinstance(node, ast.Call):
            return None
        target = sr.resolve(self.fn, node.func)
        if target is F.dropout:
            args = sr.bind_call(node, F.dropout)
            return args["input"], args.get("p", ast.Constant(0.5)), args.get("training", ast.Constant(True))
        if target is torch.dropout and len(node.args) == 3 and not node.keywords:
            return tuple(node.args)
        modules = self.scope.attribute_values(node.func)
        if modules and len(node.args) == 1 and not node.keywords:
            if all(type(m) is nn.Dropout for m in modules):
                attr = lambda name: ast.Attribute(value=copy.deepcopy(node.func), attr=name, ctx=ast.Load())
                return node.args[0], attr("p"), attr("training")
            if all(type(m) is nn.Identity for m in modules):
                return node.args[0], None, None
        return None

    def cast(self, node: ast.AST) -> tuple[ast.expr, bool] | None:
        """``(receiver, to float32)`` of a dtype cast: ``.float()``, ``.type_as(x)``, ``.to(x.dtype)``, ..."""
        call = _method(node, *_CASTS)
        if call is None:
            return None
        name, args, keywords = call.func.attr, call.args, {k.arg: k.value for k in call.keywords}
        if name in ("float", "half", "bfloat16"):
            return (call.func.value, name == "float") if not args and not keywords else None
        if name == "type_as":
            return (call.func.value, False) if len(args) == 1 and not keywords else None
        dtype = keywords.pop("dtype", None) if not args else (args[0] if len(args) == 1 else None)
        if dtype is None or keywords:
            return None
        return call.func.value, sr.resolve(self.fn, dtype) is torch.float32

    def neg_inf(self, node: ast.AST) -> bool:
        """Whether ``node`` is minus infinity: ``float("-inf")``, ``-math.inf``, ``-torch.inf``, ..."""
        return _constant_value(self.fn, node) == -math.inf

    # --- the walk -------------------------------------------------------------------------------

    def match(self, body: list[ast.stmt], index: int, node: ast.AST) -> Site | None:
        """The attention whose output product is ``node`` (in ``body[index]``); ``None``: not attention.

        ``NoMatch`` says what did not match when it is attention.
        """
        found = self.product(node)
        if found is None:
            return None
        operands = [(found.left, found.right, 0)]
        if found.kind == "einsum":
            operands.append((found.right, found.left, 1))
        for probs, value, position in operands:
            softmax = self._reaches_softmax(body, probs, index)
            if softmax is None:
                continue
            try:
                try:
                    return _Walk(self, body, index, fold_named_query=True).run(node, found, probs, value, position)
                except _QueryReadElsewhere:
                    return _Walk(self, body, index, fold_named_query=False).run(node, found, probs, value, position)
            except sr.Unrewritable as exc:
                error = NoMatch(node.lineno, str(exc))
            except NoMatch as exc:
                error = exc
            error.softmax = softmax
            raise error
        return None

    def _reaches_softmax(self, body: list[ast.stmt], expr: ast.expr, at: int) -> ast.Call | None:
        """The softmax call ``expr`` comes from through casts and dropout, if any."""
        for _ in range(_MAX_DEPTH):
            if isinstance(expr, ast.Name):
                step = peek(body, expr, at)
                if step is None:
                    return None
                expr, at = step.value, step.at
                continue
            if self._quietly(self.softmax, expr) is not None:
                return expr
            inner = self.cast(expr) or self._quietly(self.dropout, expr)
            if inner is None:
                return None
            expr = inner[0]
        return None

    @staticmethod
    def _quietly(recogniser, expr: ast.expr):
        try:
            return recogniser(expr)
        except sr.Unrewritable:
            return None

    def scoreish(self, body: list[ast.stmt], expr: ast.expr, at: int, depth: int = 0) -> bool:
        """Whether ``expr`` carries the ``q kᵀ`` scores (possibly scaled, masked, cast), as opposed to a mask or scale."""
        if depth > _MAX_DEPTH:
            return False
        again = lambda e, a=at: self.scoreish(body, e, a, depth + 1)
        if self.product(expr) is not None:
            return True
        if isinstance(expr, ast.Name):
            step = peek(body, expr, at)
            return step is not None and again(step.value, step.at)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Add, ast.Mult, ast.Div, ast.Sub)):
            return again(expr.left) or again(expr.right)
        cast = self.cast(expr)
        if cast is not None:
            return again(cast[0])
        fill = _method(expr, "masked_fill")
        if fill is not None:
            return again(fill.func.value)
        if isinstance(expr, ast.Call) and sr.resolve(self.fn, expr.func) is torch.where and len(expr.args) == 3:
            return again(expr.args[1]) or again(expr.args[2])
        return False


def peek(body: list[ast.stmt], name: ast.Name, at: int) -> _Step | None:
    """What ``name``, read at ``body[at]``, holds when a single assignment of this block wrote it last.

    The assignment may be ``x = e``, ``x op= e``, ``x.masked_fill_/add_/mul_/div_(...)``, or the last
    statement of an ``if <test>:`` without ``else`` (then ``condition`` is the test). ``None``: anything else.
    """
    j = dataflow.last_write(body, at, name.id)
    if j is None:
        return None
    stmt, condition, block, outer = body[j], None, body, None
    if isinstance(stmt, ast.If) and not stmt.orelse:
        outer, block, condition = stmt, stmt.body, stmt.test
        stmt = stmt.body[-1]
        if any(dataflow.binds(s, name.id) or dataflow.mutates(s, name.id) for s in block[:-1]):
            return None
    value = _written_value(stmt, name.id)
    return None if value is None else _Step(value, j, condition, stmt, block, outer)


def _written_value(stmt: ast.stmt, name: str) -> ast.expr | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
            and stmt.targets[0].id == name:
        return stmt.value
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
        return ast.copy_location(ast.BinOp(left=ast.copy_location(ast.Name(id=name, ctx=ast.Load()), stmt),
                                           op=stmt.op, right=stmt.value), stmt)
    call = _method(getattr(stmt, "value", None), *_IN_PLACE) if isinstance(stmt, ast.Expr) else None
    if call is not None and isinstance(call.func.value, ast.Name) and call.func.value.id == name:
        kind = _IN_PLACE[call.func.attr]
        if isinstance(kind, str):
            func = ast.Attribute(value=call.func.value, attr=kind, ctx=ast.Load())
            return ast.copy_location(ast.Call(func=func, args=call.args, keywords=call.keywords), call)
        if len(call.args) == 1 and not call.keywords:
            return ast.copy_location(ast.BinOp(left=call.func.value, op=kind(), right=call.args[0]), call)
    return None


def _constant_value(fn: types.FunctionType, node: ast.AST) -> Any:
    """The value of a constant-like expression (literals, ``float("...")``, module constants), else ``None``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _constant_value(fn, node.operand)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
        return None
    if isinstance(node, ast.Call) and sr.resolve(fn, node.func) is float and len(node.args) == 1 \
            and not node.keywords and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        try:
            return float(node.args[0].value)
        except ValueError:
            return None
    if isinstance(node, (ast.Name, ast.Attribute)):
        value = sr.resolve(fn, node)
        return value if isinstance(value, float) else None
    return None


class _Walk:
    """One attempt to match an output product, collecting what the site needs; ``NoMatch`` on a mismatch."""

    def __init__(self, matcher: Matcher, body: list[ast.stmt], index: int, fold_named_query: bool) -> None:
        self.m = matcher
        self.fn = matcher.fn
        self.body = body
        self.index = index
        self.fold_named_query = fold_named_query
        self.edges: set[int] = set()
        self.intermediates: set[str] = set()
        self.removed: list[tuple[list[ast.stmt], ast.stmt]] = []
        self.origins: list[int] = []
        self.moved: list[tuple[ast.expr, int]] = []
        self.masks: list[MaskPart] = []
        self.scale_num: list[ast.expr] = []
        self.scale_den: list[ast.expr] = []
        self.upcast = False
        self.rank: int | None = None
        self.folded_query: str | None = None

    def fail(self, node: ast.AST, what: str) -> NoMatch:
        return NoMatch(getattr(node, "lineno", None), what)

    def follow(self, name: ast.Name, at: int) -> _Step:
        """The step that wrote intermediate ``name``; it joins the statements the rewrite removes."""
        step = peek(self.body, name, at)
        if step is None:
            j = dataflow.last_write(self.body, at, name.id)
            where = f"is written at line {self.body[j].lineno}" if j is not None else "comes from outside this block"
            raise self.fail(name, f"`{name.id}` {where}, not by a single assignment in the same straight-line block")
        self.edges.add(id(name))
        self.intermediates.add(name.id)
        self.removed.append(Removal(step.block, step.stmt, step.outer))
        self.origins.append(step.at)
        if step.condition is not None:
            if any(isinstance(n, (ast.Call, ast.NamedExpr, ast.Await)) for n in ast.walk(step.condition)):
                raise self.fail(step.outer, f"`if {ast.unparse(step.condition)}` calls a function: the SDPA call "
                                            "would evaluate it again")
            self._move(step.condition, step.at)
            for kept in step.block[:-1]:
                if any(dataflow.binds(kept, n) for n in dataflow.names_read(step.condition)):
                    raise self.fail(kept, f"the branch changes what `if {ast.unparse(step.condition)}` tests")
        return step

    def _move(self, expr: ast.expr, origin: int) -> None:
        self.moved.append((expr, origin))

    # --- output ---------------------------------------------------------------------------------

    def run(self, node: ast.expr, product: _Product, probs: ast.expr, value: ast.expr, position: int) -> Site:
        value_in, output_perm = value, None
        if product.kind == "bmm":
            self.rank = 3
        if product.kind == "einsum":
            value_in, output_perm = self._einsum_output(node, product.spec, position, value)
        softmax, dropout_p = self._probabilities(probs, self.index)
        query, key = self._scores(softmax)
        self._check_reads()
        self._check_moves()
        return Site(self.body, self.index, node, softmax[0], query, key, value_in, output_perm, self._attn_mask(),
                    self._scale_expr(), dropout_p, self.removed, self.upcast)

    def _attn_mask(self) -> ast.expr | None:
        """One SDPA mask for every mask the scores got: a sum of additive ones, an AND of boolean ones."""
        parts = self.masks
        if not parts:
            return None
        if len(parts) == 1:
            part = parts[0]
            if part.condition is None or (_tests_not_none(part.condition, part.expr) and not part.boolean):
                return part.expr
            return ast.IfExp(test=part.condition, body=part.expr, orelse=ast.Constant(None))
        if any(p.condition is not None for p in parts):
            raise NoMatch(parts[0].expr.lineno, "several masks, one of them under `if`: no single SDPA mask")
        additive = _joined([p.expr for p in parts if not p.boolean], ast.Add())
        keep = _joined([p.expr for p in parts if p.boolean], ast.BitAnd())
        if keep is None or additive is None:
            return keep or additive
        where = ast.Name(id=WHERE, ctx=ast.Load())
        return ast.Call(func=where, args=[keep, additive, ast.Constant(-math.inf)], keywords=[])

    def _scale_expr(self) -> ast.expr:
        """SDPA's ``scale``: the product of the factors over the product of the divisors (1.0 when none)."""
        scale = _joined(self.scale_num, ast.Mult()) or ast.Constant(1.0)
        for divisor in self.scale_den:
            scale = ast.BinOp(left=scale, op=ast.Div(), right=divisor)
        return scale

    def _check_reads(self) -> None:
        """The values the chain computes must be read only along it (weights returned or stored: no rewrite)."""
        first_writes: dict[str, ast.stmt] = {}
        for removal in reversed(self.removed):  # the walk goes backwards: the last removal is the first write
            name = _written_name(removal.stmt)
            if name is not None and name not in first_writes:
                first_writes[name] = removal.stmt
        chain = {id(r.stmt) for r in self.removed}
        stray = dataflow.stray_reads(self.m.scope.tree, first_writes, chain, self.edges)
        if not stray:
            return
        node = stray[0]
        error = _QueryReadElsewhere if {n.id for n in stray} == {self.folded_query} else NoMatch
        raise error(node.lineno, f"`{node.id}`, computed by the attention at line {first_writes[node.id].lineno}, "
                                 "is also read here (attention weights returned, stored or logged?); SDPA does not "
                                 "produce them")

    def _check_moves(self) -> None:
        """Each operand moves to the output statement: nothing in between may change what it reads."""
        gone = {id(r.stmt) for r in self.removed if r.outer is None}
        gone |= {id(r.outer) for r in self.removed if r.outer is not None
                 and all(any(s is q.stmt for q in self.removed) for s in r.outer.body)}
        for expr, origin in self.moved:
            reason = dataflow.movable(self.body, origin, self.index, expr, gone)
            if reason:
                raise NoMatch(getattr(expr, "lineno", None), f"{reason} before the attention output")

    def _einsum_output(self, node: ast.expr, spec: tuple[str, str, str], position: int,
                       value: ast.expr) -> tuple[ast.expr, tuple[int, ...]]:
        p_spec, v_spec, o_spec = (spec[0], spec[1], spec[2]) if position == 0 else (spec[1], spec[0], spec[2])
        _check_letters(self, node, p_spec, v_spec, o_spec)
        batch, q_letter, k_letter = p_spec[:-2], p_spec[-2], p_spec[-1]
        extra = set(v_spec) & set(o_spec) - set(p_spec)
        if len(extra) != 1:
            raise self.fail(node, f"einsum `{','.join(spec[:2])}->{spec[2]}` has no single value dim")
        e = extra.pop()
        if set(v_spec) != set(batch) | {k_letter, e} or set(o_spec) != set(batch) | {q_letter, e} \
                or len(o_spec) != len(p_spec):
            raise self.fail(node, f"einsum `{','.join(spec[:2])}->{spec[2]}` is not probabilities times values "
                                  f"over the last dim `{k_letter}`")
        self.rank = len(p_spec)
        v_perm = tuple(v_spec.index(c) for c in batch + k_letter + e)
        canonical = batch + q_letter + e
        return permuted(value, v_perm), tuple(canonical.index(c) for c in o_spec)

    # --- probabilities --------------------------------------------------------------------------

    def _probabilities(self, expr: ast.expr, at: int) -> tuple[tuple[ast.Call, int], ast.expr | None]:
        dropout_p = None
        while True:
            if isinstance(expr, ast.Name):
                step = self.follow(expr, at)
                if step.condition is not None:
                    raise self.fail(step.stmt, f"the probabilities change under `if {ast.unparse(step.condition)}`")
                expr, at = step.value, step.at
                continue
            if self.m.softmax(expr) is not None:
                return (expr, at), dropout_p
            cast = self.m.cast(expr)
            if cast is not None:
                expr = cast[0]
                continue
            dropped = self.m.dropout(expr)
            if dropped is None:
                raise self.fail(expr, f"`{ast.unparse(expr)}` between the softmax and the product with v is not a "
                                      "cast or a dropout")
            if dropout_p is not None:
                raise self.fail(expr, "dropout is applied twice to the probabilities")
            expr, p, training = dropped
            dropout_p = self._dropout_p(expr, p, training, at)

    def _dropout_p(self, node: ast.expr, p: ast.expr | None, training: ast.expr | None, at: int) -> ast.expr:
        if p is None:
            return ast.Constant(0.0)
        if not self.m.scope.is_number(p, at, self.body):
            raise self.fail(node, f"dropout probability `{ast.unparse(p)}` is not provably a Python number")
        self._move(p, at)
        self._move(training, at)
        constant = _constant_value(self.fn, training)
        if constant is True:
            return p
        if constant is False:
            return ast.Constant(0.0)
        return ast.IfExp(test=training, body=p, orelse=ast.Constant(0.0))

    # --- softmax and scores ---------------------------------------------------------------------

    def _scores(self, softmax: tuple[ast.Call, int]) -> tuple[ast.expr, ast.expr]:
        call, at = softmax
        expr, dim, dtype = self.m.softmax(call)
        if dtype is not None:
            if sr.resolve(self.fn, dtype) is not torch.float32:
                raise self.fail(call, f"softmax in dtype `{ast.unparse(dtype)}` (SDPA keeps the input dtype)")
            self.upcast = True
        self._softmax_dim = (call, dim)
        scaled = False
        for _ in range(_MAX_DEPTH):
            if isinstance(expr, ast.Name):
                step = self.follow(expr, at)
                expr, at = step.value, step.at
                if step.condition is not None:
                    expr = self._mask(expr, at, scaled, step)
                continue
            product = self.m.product(expr)
            if product is not None:
                query, key = self._qk(product, at)
                self._check_softmax_dim()
                return query, key
            cast = self.m.cast(expr)
            if cast is not None:
                expr, upcast = cast
                self.upcast |= upcast
                continue
            masked = self._mask_or_none(expr, at, scaled)
            if masked is not None:
                expr = masked
                continue
            factor = self._scale(expr, at)
            if factor is None:
                raise self.fail(expr, f"`{ast.unparse(expr)}` between the q·k product and the softmax is not a "
                                      "scale, a mask or a cast")
            expr, scaled = factor, True
        raise self.fail(call, "the scores chain is too long")

    def _check_softmax_dim(self) -> None:
        call, dim = self._softmax_dim
        value = _int_constant(dim) if dim is not None else None
        if value == -1 or (value is not None and self.rank is not None and value == self.rank - 1):
            return
        raise self.fail(call, f"softmax over dim `{ast.unparse(dim) if dim is not None else None}`, not provably "
                              "the key dim (-1)")

    def _mask(self, expr: ast.expr, at: int, scaled: bool, step: _Step) -> ast.expr:
        """A mask written under ``if``: it must mask the name itself, so that skipping it leaves the scores."""
        masked = self._mask_or_none(expr, at, scaled)
        if masked is None or not (isinstance(masked, ast.Name) and isinstance(step.stmt, (ast.Assign, ast.AugAssign,
                                                                                          ast.Expr))):
            raise self.fail(step.stmt, f"under `if {ast.unparse(step.condition)}` the scores change by more than a "
                                       "mask")
        target = _written_name(step.stmt)
        if masked.id != target:
            raise self.fail(step.stmt, f"under `if {ast.unparse(step.condition)}` the scores are not masked in place")
        self.masks[-1].condition = step.condition
        return masked

    def _mask_or_none(self, expr: ast.expr, at: int, scaled: bool) -> ast.expr | None:
        """The scores operand of a mask applied to them (the mask is recorded), or ``None``: not a mask."""
        scoreish = lambda e: self.m.scoreish(self.body, e, at)
        part = None
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left, right = scoreish(expr.left), scoreish(expr.right)
            if left == right:
                raise self.fail(expr, f"cannot tell the scores from the mask in `{ast.unparse(expr)}`")
            scores, mask = (expr.left, expr.right) if left else (expr.right, expr.left)
            part = MaskPart(mask, boolean=False)
        fill = _method(expr, "masked_fill")
        if fill is not None:
            args = {**dict(zip(("mask", "value"), fill.args)), **{k.arg: k.value for k in fill.keywords}}
            if set(args) != {"mask", "value"}:
                raise self.fail(expr, "masked_fill with unexpected arguments")
            if not self.m.neg_inf(args["value"]):
                raise self.fail(expr, f"masked_fill with `{ast.unparse(args['value'])}`, not -inf: SDPA's boolean "
                                      "mask fills -inf, and rows masked everywhere would differ")
            scores, part = fill.func.value, MaskPart(_negated(args["mask"]), boolean=True)
        if isinstance(expr, ast.Call) and sr.resolve(self.fn, expr.func) is torch.where and len(expr.args) == 3 \
                and not expr.keywords:
            cond, a, b = expr.args
            if scoreish(a) and self.m.neg_inf(b):
                scores, part = a, MaskPart(cond, boolean=True)
            elif scoreish(b) and self.m.neg_inf(a):
                scores, part = b, MaskPart(_negated(cond), boolean=True)
            else:
                raise self.fail(expr, "torch.where on the scores with something other than -inf")
        if part is None:
            return None
        if scaled:
            raise self.fail(expr, "a mask is applied before a scale (SDPA scales first, then masks)")
        self._move(part.expr, at)
        self.masks.append(part)
        return scores

    def _scale(self, expr: ast.expr, at: int) -> ast.expr | None:
        """The scores operand of ``scores * s`` / ``s * scores`` / ``scores / s`` (``s`` recorded), else ``None``."""
        if not (isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div))):
            return None
        scoreish = lambda e: self.m.scoreish(self.body, e, at)
        if isinstance(expr.op, ast.Div) or scoreish(expr.left):
            scores, factor = expr.left, expr.right
        else:
            scores, factor = expr.right, expr.left
        if not scoreish(scores):
            return None
        self._factor(factor, isinstance(expr.op, ast.Div), at, expr)
        return scores

    def _factor(self, factor: ast.expr, divide: bool, at: int, where: ast.AST) -> None:
        if not self.m.scope.is_number(factor, at, self.body):
            raise self.fail(where, f"scale `{ast.unparse(factor)}` is not provably a Python number (SDPA's scale "
                                   "must be a float)")
        self._move(factor, at)
        (self.scale_den if divide else self.scale_num).append(factor)

    # --- the q·k product ------------------------------------------------------------------------

    def _qk(self, product: _Product, at: int) -> tuple[ast.expr, ast.expr]:
        if product.kind == "einsum":
            query, key = self._einsum_scores(product)
        else:
            if product.kind == "bmm":
                self.rank = 3
            query, key = product.left, self._untransposed(product.right)
        query = self._query(query, at)
        self._move(query, at)
        self._move(key, at)
        return query, key

    def _einsum_scores(self, product: _Product) -> tuple[ast.expr, ast.expr]:
        a_spec, b_spec, s_spec = product.spec
        _check_letters(self, product.left, a_spec, b_spec, s_spec)
        q_letter, k_letter = s_spec[-2], s_spec[-1]
        if q_letter in a_spec and k_letter in b_spec:
            (q, q_spec), (k, k_spec) = (product.left, a_spec), (product.right, b_spec)
        elif q_letter in b_spec and k_letter in a_spec:
            (q, q_spec), (k, k_spec) = (product.right, b_spec), (product.left, a_spec)
        else:
            raise self.fail(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` does not end in query, key dims")
        batch = s_spec[:-2]
        head = set(q_spec) & set(k_spec) - set(s_spec)
        if len(head) != 1:
            raise self.fail(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` does not contract one head dim")
        d = head.pop()
        if set(q_spec) != set(batch) | {q_letter, d} or set(k_spec) != set(batch) | {k_letter, d} \
                or k_letter in q_spec or q_letter in k_spec:
            raise self.fail(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` is not q·kᵀ over batch dims "
                                          f"`{batch}`")
        if self.rank is not None and self.rank != len(s_spec):
            raise self.fail(product.left, "the scores and the output have different ranks")
        self.rank = len(s_spec)
        q_perm = tuple(q_spec.index(c) for c in batch + q_letter + d)
        k_perm = tuple(k_spec.index(c) for c in batch + k_letter + d)
        self._einsum_query_perm = q_perm
        return _Permute(q, q_perm), permuted(k, k_perm)

    def _untransposed(self, kt: ast.expr) -> ast.expr:
        """``k`` from ``k.transpose(-2, -1)``/``.mT``/``.permute(0, 1, 3, 2)``; else ``kt.transpose(-2, -1)`` (exact)."""
        if isinstance(kt, ast.Attribute) and kt.attr == "mT":
            return kt.value
        call = _method(kt, "transpose", "swapaxes", "swapdims", "permute")
        receiver, dims = None, None
        if call is not None and not call.keywords:
            receiver, dims = call.func.value, [_int_constant(a) for a in call.args]
        elif isinstance(kt, ast.Call) and sr.resolve(self.fn, kt.func) is torch.transpose and len(kt.args) == 3:
            receiver, dims = kt.args[0], [_int_constant(a) for a in kt.args[1:]]
        if receiver is not None and None not in dims:
            if call is not None and call.func.attr == "permute":
                rank = len(dims)
                if dims == list(range(rank - 2)) + [rank - 1, rank - 2] and self.rank in (None, rank):
                    self.rank = rank
                    return receiver
            elif len(dims) == 2 and sorted(dims) == [-2, -1]:
                return receiver
            elif len(dims) == 2 and min(dims) >= 0 and abs(dims[0] - dims[1]) == 1:
                rank = max(dims) + 1
                if self.rank in (None, rank):
                    self.rank = rank
                    return receiver
        return ast.Call(func=ast.Attribute(value=kt, attr="transpose", ctx=ast.Load()),
                        args=[ast.Constant(-2), ast.Constant(-1)], keywords=[])

    def _query(self, query: ast.expr, at: int) -> ast.expr:
        """Fold a scale applied to q (``(q * s) @ kᵀ``, or ``q = q * s`` just before) into SDPA's scale."""
        permute = query if isinstance(query, _Permute) else None
        inner = permute.expr if permute else query
        folded = self._query_scale(inner, at)
        if folded is None and isinstance(inner, ast.Name) and self.fold_named_query:
            step = peek(self.body, inner, at)
            if step is not None and step.condition is None and self._query_scale(step.value, step.at, probe=True):
                step = self.follow(inner, at)
                self.folded_query = inner.id
                folded = self._query_scale(step.value, step.at)
        result = folded if folded is not None else inner
        return permuted(result, permute.perm) if permute else result

    def _query_scale(self, expr: ast.expr, at: int, probe: bool = False) -> ast.expr | None:
        if not (isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div))):
            return None
        number = lambda e: self.m.scope.is_number(e, at, self.body)
        if isinstance(expr.op, ast.Div):
            q, factor = (expr.left, expr.right) if number(expr.right) else (None, None)
        elif number(expr.right):
            q, factor = expr.left, expr.right
        elif number(expr.left):
            q, factor = expr.right, expr.left
        else:
            q, factor = None, None
        if q is None or probe:
            return q
        self._factor(factor, isinstance(expr.op, ast.Div), at, expr)
        return q


@dataclasses.dataclass
class _Permute:
    """A query operand that still needs a permutation (einsum scores), kept apart so a scale on it can fold."""

    expr: ast.expr
    perm: tuple[int, ...]


def _joined(exprs: list[ast.expr], op: ast.operator) -> ast.expr | None:
    if not exprs:
        return None
    joined = exprs[0]
    for expr in exprs[1:]:
        joined = ast.BinOp(left=joined, op=op, right=expr)
    return joined


def _tests_not_none(test: ast.expr, expr: ast.expr) -> bool:
    """Whether ``test`` is ``expr is not None`` for the name ``expr`` (then ``expr if test else None`` is ``expr``)."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None
            and isinstance(test.left, ast.Name) and isinstance(expr, ast.Name) and test.left.id == expr.id)


def _written_name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.Assign):
        return stmt.targets[0].id if isinstance(stmt.targets[0], ast.Name) else None
    if isinstance(stmt, ast.AugAssign):
        return stmt.target.id if isinstance(stmt.target, ast.Name) else None
    if isinstance(stmt, ast.Expr):
        return dataflow.root_name(stmt.value)
    return None


def _check_letters(walk: _Walk, node: ast.AST, *specs: str) -> None:
    for spec in specs:
        if not spec.isalpha() or len(set(spec)) != len(spec):
            raise walk.fail(node, f"einsum operand `{spec}` uses `...`, a repeated letter or a non-letter")
