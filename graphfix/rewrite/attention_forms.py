"""The pieces manual attention is written with, one AST node at a time: products, softmax, dropout, casts, -inf.

``Forms`` answers "is this node a softmax (and of what, over which dim)?", "a dropout (with which p, under which
training flag)?", "a dtype cast?", "a product of two tensors?", and "does this expression carry the q·k scores?".
Names resolve through ``source_rewrite.resolve`` (what a name denotes in the function's scope, so ``F``,
``nn.functional`` and ``torch.nn.functional`` are the same function), and ``self.<attr>`` through the module
instances (``scope_facts.Scope``). ``peek`` follows a name back to the single assignment of the same block that
wrote it. ``graphfix.rewrite.attention_match`` puts the pieces together.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite import dataflow
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.scope_facts import MAX_DEPTH, Scope, constant_value

_CASTS = ("float", "half", "bfloat16", "type_as", "to", "type")
_IN_PLACE = {"masked_fill_": "masked_fill", "add_": ast.Add, "mul_": ast.Mult, "div_": ast.Div}


def method_call(node: ast.AST, *names: str) -> ast.Call | None:
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


def negated(cond: ast.expr) -> ast.expr:
    """The boolean mask that keeps what ``cond`` fills: ``m == 0`` -> ``m != 0``, ``~m`` -> ``m``, else ``~(cond)``."""
    if isinstance(cond, ast.Compare) and len(cond.ops) == 1 and isinstance(cond.ops[0], (ast.Eq, ast.NotEq)):
        op = ast.NotEq() if isinstance(cond.ops[0], ast.Eq) else ast.Eq()
        return ast.Compare(left=cond.left, ops=[op], comparators=cond.comparators)
    if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Invert):
        return cond.operand
    return ast.UnaryOp(op=ast.Invert(), operand=cond)


@dataclasses.dataclass
class Product:
    """A product of two tensors; ``spec`` holds an einsum's two operand subscripts and its output's."""

    kind: str  # "matmul", "bmm" or "einsum"
    left: ast.expr
    right: ast.expr
    spec: tuple[str, str, str] | None = None


@dataclasses.dataclass
class Step:
    """A value an intermediate name holds, read at ``body[at]``: its expression and where it was written."""

    value: ast.expr
    at: int
    condition: ast.expr | None
    stmt: ast.stmt
    block: list[ast.stmt]
    outer: ast.If | None


class Forms:
    """Recognisers for the nodes manual attention is made of, in one function's scope."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.fn = scope.fn

    def product(self, node: ast.AST) -> Product | None:
        """``a @ b``, ``torch.matmul/bmm(a, b)``, ``a.matmul/bmm(b)``, ``torch.einsum("..", a, b)``."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            return Product("matmul", node.left, node.right)
        if not isinstance(node, ast.Call) or node.keywords:
            return None
        target = sr.resolve(self.fn, node.func)
        if target in (torch.matmul, torch.bmm) and len(node.args) == 2:
            return Product("bmm" if target is torch.bmm else "matmul", *node.args)
        if target is torch.einsum:
            args = node.args
            if len(args) == 2 and isinstance(args[1], (ast.List, ast.Tuple)):
                args = [args[0], *args[1].elts]
            if len(args) == 3 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                spec = args[0].value.replace(" ", "")
                inputs, _, output = spec.partition("->")
                operands = inputs.split(",")
                if len(operands) == 2 and output:
                    return Product("einsum", args[1], args[2], (operands[0], operands[1], output))
            return None
        if target is sr.MISSING and method_call(node, "matmul", "bmm") and len(node.args) == 1 \
                and self.scope.attribute_values(node.func) is None:
            return Product(node.func.attr, node.func.value, node.args[0])
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
        if target is sr.MISSING and method_call(node, "softmax"):
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
        call = method_call(node, *_CASTS)
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
        return constant_value(self.fn, node) == -math.inf

    def reaches_softmax(self, body: list[ast.stmt], expr: ast.expr, at: int) -> ast.Call | None:
        """The softmax of a tensor product that ``expr`` comes from (through casts, dropout, other calls), if any."""
        for _ in range(MAX_DEPTH):
            if isinstance(expr, ast.Name):
                step = peek(body, expr, at)
                if step is None:
                    return None
                expr, at = step.value, step.at
                continue
            found = self._quietly(self.softmax, expr)
            if found is not None:
                return expr if self.from_product(body, found[0], at) else None
            inner = self.cast(expr) or self._quietly(self.dropout, expr) or _first_operand(expr)
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

    def from_product(self, body: list[ast.stmt], expr: ast.expr, at: int, depth: int = 0) -> bool:
        """Whether ``expr`` derives from a tensor product through element-wise steps (operators, tensor methods,
        torch functions), the way attention scores do; looser than ``scoreish``: it decides what is attention
        (and so is rewritten or reported), not how it is rewritten. Module and user-function calls stop it."""
        if depth > MAX_DEPTH:
            return False
        again = lambda e, b=body, a=at: self.from_product(b, e, a, depth + 1)
        if self.product(expr) is not None:
            return True
        if isinstance(expr, ast.Name):
            j = dataflow.last_write(body, at, expr.id)
            if j is None:
                parent = self.scope.parents.get(id(body))
                return parent is not None and again(expr, parent[0], parent[1])
            values = [n.value for n in ast.walk(body[j]) if isinstance(n, (ast.Assign, ast.AugAssign))
                      and expr.id in {t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                                      if isinstance(t, ast.Name)}]
            if any(isinstance(n, ast.AugAssign) for n in ast.walk(body[j])) or any(
                    method_call(n, *_IN_PLACE) for n in ast.walk(body[j])):
                values.append(expr)  # updated in place: what it held before counts too
            return any(again(v, body, j) for v in values)
        if isinstance(expr, ast.BinOp):
            return again(expr.left) or again(expr.right)
        if isinstance(expr, ast.UnaryOp):
            return again(expr.operand)
        if isinstance(expr, ast.IfExp):
            return again(expr.body) or again(expr.orelse)
        if not isinstance(expr, ast.Call):
            return False
        if isinstance(expr.func, ast.Attribute) and sr.resolve(self.fn, expr.func) is sr.MISSING:
            if self.scope.attribute_values(expr.func) is not None:
                return False  # self.<module>(...)
            return again(expr.func.value) or any(again(a) for a in expr.args)
        return _torch_function(sr.resolve(self.fn, expr.func)) and any(again(a) for a in expr.args)

    def scoreish(self, body: list[ast.stmt], expr: ast.expr, at: int, depth: int = 0) -> bool:
        """Whether ``expr`` carries the q·k scores (maybe scaled, masked, cast), rather than a mask or a scale."""
        if depth > MAX_DEPTH:
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
        fill = method_call(expr, "masked_fill")
        if fill is not None:
            return again(fill.func.value)
        if isinstance(expr, ast.Call) and sr.resolve(self.fn, expr.func) is torch.where and len(expr.args) == 3:
            return again(expr.args[1]) or again(expr.args[2])
        return False


def _torch_function(fn_obj: object) -> bool:
    return (getattr(fn_obj, "__module__", None) or "").partition(".")[0] == "torch"


def _first_operand(node: ast.AST) -> tuple[ast.expr] | None:
    """What an unknown call works on (its receiver or first argument): the walk looks through it for a softmax,
    so that attention with an unknown step is reported with that step rather than missed."""
    if not isinstance(node, ast.Call):
        return None
    if isinstance(node.func, ast.Attribute) and not node.args:
        return (node.func.value,)
    return (node.args[0],) if node.args else None


def peek(body: list[ast.stmt], name: ast.Name, at: int) -> Step | None:
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
    return None if value is None else Step(value, j, condition, stmt, block, outer)


def _written_value(stmt: ast.stmt, name: str) -> ast.expr | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
            and stmt.targets[0].id == name:
        return stmt.value
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
        return ast.copy_location(ast.BinOp(left=ast.copy_location(ast.Name(id=name, ctx=ast.Load()), stmt),
                                           op=stmt.op, right=stmt.value), stmt)
    call = method_call(getattr(stmt, "value", None), *_IN_PLACE) if isinstance(stmt, ast.Expr) else None
    if call is not None and isinstance(call.func.value, ast.Name) and call.func.value.id == name:
        kind = _IN_PLACE[call.func.attr]
        if isinstance(kind, str):
            func = ast.Attribute(value=call.func.value, attr=kind, ctx=ast.Load())
            return ast.copy_location(ast.Call(func=func, args=call.args, keywords=call.keywords), call)
        if len(call.args) == 1 and not call.keywords:
            return ast.copy_location(ast.BinOp(left=call.func.value, op=kind(), right=call.args[0]), call)
    return None


def written_name(stmt: ast.stmt) -> str | None:
    """The name a chain statement writes: ``x = ``, ``x op= ``, ``x.masked_fill_(...)``."""
    if isinstance(stmt, ast.Assign):
        return stmt.targets[0].id if isinstance(stmt.targets[0], ast.Name) else None
    if isinstance(stmt, ast.AugAssign):
        return stmt.target.id if isinstance(stmt.target, ast.Name) else None
    if isinstance(stmt, ast.Expr):
        return dataflow.root_name(stmt.value)
    return None
