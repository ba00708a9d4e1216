"""``.item()`` checks and value branches -> device-side forms (``torch._assert_async``, ``torch.where``).

Two shapes of data-dependent control flow have an exact tensor form:

- a check that only raises, ``if <cond>: raise E(msg)`` or ``assert <cond>, msg``,
  becomes ``torch._assert_async(<cond as a tensor>, "E: msg")``: no host sync, no
  graph break, and still an error when the condition fails (``RuntimeError``);
- a branch that only assigns tensors, ``if <cond>: h = h * s``, becomes
  ``h = select(<cond>, h * s, h)`` (``graphfix.rewrite.blocks.scalar_checks``):
  ``torch.where`` when both are tensors of one shape, dtype and device, else the
  Python branch as before. Both sides are computed, so every right-hand side must be
  free of side effects (``passes._purity``) and every name must be bound before.

A condition qualifies when it is built from ``.item()`` values only: comparisons of
them with numbers, names and attributes (``a.item() > self.limit``), ``+ - *``,
``abs``, ``math.isnan/isinf/isfinite``, a bare ``x.item()`` (its truth), combined
with ``and``/``or``/``not``. Every part is evaluated (no short circuit), which is
why every part must be an ``.item()`` read of a side-effect-free expression.
Anything else raises ``Unsupported`` with the reason, for the pass to report.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import types

import torch

from graphfix.rewrite.blocks import scalar_checks
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._purity import impurity

SCALAR_METHODS = ("item", "tolist")
SCALAR, SELECT, ASSERT, CONDITION = "_graphfix_scalar", "_graphfix_select", "_graphfix_assert_async", "_graphfix_cond"
HELPERS = {SCALAR: scalar_checks.scalar, SELECT: scalar_checks.select, ASSERT: torch._assert_async}
"""Names the rewritten code uses, bound as closure cells (``torch._assert_async`` is private but stable since 1.x)."""

_COMPARISONS = (ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq)
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult)
_MATH_TESTS = {math.isnan: "isnan", math.isinf: "isinf", math.isfinite: "isfinite"}


class Unsupported(Exception):
    """The construct has no exact tensor form here; the message says why."""


def scalar_calls(node: ast.AST) -> list[ast.Call]:
    """The ``x.item()`` / ``x.tolist()`` calls under ``node``."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in SCALAR_METHODS and not n.args and not n.keywords]


def is_data_dependent(node: ast.AST) -> bool:
    """An ``if``/``while``/``assert``/conditional expression whose test reads a tensor value on the host."""
    return isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)) and bool(scalar_calls(node.test))


def child_blocks(stmt: ast.stmt) -> list[list[ast.stmt]]:
    """The statement lists directly inside ``stmt`` (bodies, ``else``/``finally``, handlers, match cases)."""
    blocks = [getattr(stmt, f, None) for f in ("body", "orelse", "finalbody")]
    blocks += [h.body for h in getattr(stmt, "handlers", [])] + [c.body for c in getattr(stmt, "cases", [])]
    return [b for b in blocks if isinstance(b, list) and b and isinstance(b[0], ast.stmt)]


def rewrite(fn: types.FunctionType, tree: ast.FunctionDef, node: ast.stmt, receiver: str | None) -> list[ast.stmt]:
    """The statements that replace the check or branch ``node``; ``Unsupported`` when there is no exact form."""
    if isinstance(node, ast.While):
        raise Unsupported("a loop on a tensor value is not rewritten")
    if isinstance(node, ast.Assert):
        return [_located(_assert_statement(_condition(fn, node.test, receiver), _assert_message(node)), node)]
    if not isinstance(node, ast.If):
        raise Unsupported("a conditional expression is not rewritten")
    if node.orelse:
        raise Unsupported("it has an `else`/`elif` branch")
    if len(node.body) == 1 and isinstance(node.body[0], ast.Raise):
        failed = _condition(fn, node.test, receiver)
        check = _call(ASSERT, ast.UnaryOp(op=ast.Invert(), operand=failed), ast.Constant(_raise_message(node.body[0])))
        return [_located(ast.Expr(value=check), node)]
    return _select_statements(fn, tree, node, receiver)


def _select_statements(fn: types.FunctionType, tree: ast.FunctionDef, node: ast.If,
                       receiver: str | None) -> list[ast.stmt]:
    assigns = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise Unsupported(f"its body does more than assign names (line {stmt.lineno}: "
                              f"`{_first_line(stmt)}`), which cannot run conditionally inside a graph")
        assigns.append(stmt)
    bound = bound_before(tree, node)
    for stmt in assigns:
        name = stmt.targets[0].id
        if name not in bound:
            raise Unsupported(f"`{name}` is not bound before the branch, so there is no value to keep when the "
                              "condition is false")
        reason = impurity(fn, stmt.value, receiver)
        if reason:
            raise Unsupported(f"both sides would be computed, and {reason}")
    condition = _condition(fn, node.test, receiver)
    statements: list[ast.stmt] = []
    if len(assigns) > 1:  # later right-hand sides may change what the condition reads: evaluate it once, first
        statements.append(ast.Assign(targets=[ast.Name(id=CONDITION, ctx=ast.Store())], value=condition))
        condition = ast.Name(id=CONDITION, ctx=ast.Load())
    for stmt in assigns:
        name = stmt.targets[0].id
        value = _call(SELECT, condition, stmt.value, ast.Name(id=name, ctx=ast.Load()))
        statements.append(ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=value))
    return [_located(s, node) for s in statements]


def _condition(fn: types.FunctionType, test: ast.expr, receiver: str | None) -> ast.expr:
    """``test`` as a 0-dim bool tensor expression, with ``scalar(x)`` for each ``x.item()``."""
    if isinstance(test, ast.BoolOp):
        op = ast.BitAnd() if isinstance(test.op, ast.And) else ast.BitOr()
        return _combine(op, [_condition(fn, v, receiver) for v in test.values])
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return ast.UnaryOp(op=ast.Invert(), operand=_condition(fn, test.operand, receiver))
    if isinstance(test, ast.Compare):
        operands = [test.left, *test.comparators]
        pairs = []
        for left, op, right in zip(operands, test.ops, operands[1:]):
            if not isinstance(op, _COMPARISONS):
                raise Unsupported(f"`{ast.unparse(test)}` uses `{type(op).__name__}`, which has no tensor form here")
            if not (scalar_calls(left) or scalar_calls(right)):
                raise Unsupported(f"`{ast.unparse(left)}` and `{ast.unparse(right)}` are compared without a .item() "
                                  "value (all parts are evaluated in the tensor form: no short circuit)")
            pairs.append(ast.Compare(left=_value(fn, left, receiver), ops=[op],
                                     comparators=[_value(fn, right, receiver)]))
        return _combine(ast.BitAnd(), pairs)
    if isinstance(test, ast.Call) and len(test.args) == 1 and not test.keywords:
        target = sr.resolve(fn, test.func)
        method = next((name for f, name in _MATH_TESTS.items() if f is target), None)
        if method:
            return ast.Call(func=ast.Attribute(value=_value(fn, test.args[0], receiver), attr=method, ctx=ast.Load()),
                            args=[], keywords=[])
    if scalar_calls(test):
        return ast.Compare(left=_value(fn, test, receiver), ops=[ast.NotEq()], comparators=[ast.Constant(0)])
    raise Unsupported(f"`{ast.unparse(test)}` is not built from .item() values (all parts are evaluated in the "
                      "tensor form: no short circuit)")


def _value(fn: types.FunctionType, node: ast.expr, receiver: str | None) -> ast.expr:
    """A number-valued operand with ``.item()`` replaced by ``scalar(...)``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SCALAR_METHODS:
        if node.func.attr != "item" or node.args or node.keywords:
            raise Unsupported(f"`{ast.unparse(node)}` is not a scalar (`.item()`) read")
        reason = impurity(fn, node.func.value, receiver)
        if reason:
            raise Unsupported(f"every part of the condition would be evaluated, and {reason}")
        return _call(SCALAR, node.func.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node
    if isinstance(node, (ast.Name, ast.Attribute)) and not any(isinstance(n, ast.Call) for n in ast.walk(node)):
        return node
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return ast.UnaryOp(op=node.op, operand=_value(fn, node.operand, receiver))
    if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITHMETIC):
        return ast.BinOp(left=_value(fn, node.left, receiver), op=node.op, right=_value(fn, node.right, receiver))
    if isinstance(node, ast.Call) and sr.resolve(fn, node.func) is builtins.abs and len(node.args) == 1:
        return ast.Call(func=node.func, args=[_value(fn, node.args[0], receiver)], keywords=[])
    raise Unsupported(f"`{ast.unparse(node)}` is not a number, name, attribute or .item() value")


def _combine(op: ast.operator, parts: list[ast.expr]) -> ast.expr:
    return functools.reduce(lambda a, b: ast.BinOp(left=a, op=op, right=b), parts)


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])


def _assert_statement(condition: ast.expr, message: str) -> ast.If:
    """``if __debug__: _assert_async(...)``: like ``assert``, compiled away under ``python -O``."""
    check = ast.Expr(value=_call(ASSERT, condition, ast.Constant(message)))
    return ast.If(test=ast.Name(id="__debug__", ctx=ast.Load()), body=[check], orelse=[])


def _assert_message(node: ast.Assert) -> str:
    detail = _literal(node.msg) if node.msg is not None else f"assert {ast.unparse(node.test)}"
    return f"AssertionError: {detail}"


def _raise_message(node: ast.Raise) -> str:
    """``"ValueError: text"``: the exception's name and its message as written (placeholders kept literally)."""
    if node.exc is None:
        raise Unsupported("a bare `raise` re-raises the exception being handled")
    exc = node.exc
    name = ast.unparse(exc.func if isinstance(exc, ast.Call) else exc)
    args = exc.args if isinstance(exc, ast.Call) else []
    return f"{name}: {_literal(args[0])}" if args else name


def _literal(expr: ast.expr) -> str:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return expr.value
    if isinstance(expr, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in expr.values)
    return ast.unparse(expr)


def _located(stmt: ast.stmt, where: ast.stmt) -> ast.stmt:
    ast.copy_location(stmt, where)
    ast.fix_missing_locations(stmt)
    return stmt


def _first_line(node: ast.AST) -> str:
    return ast.unparse(node).splitlines()[0]


def bound_before(tree: ast.FunctionDef, target: ast.stmt) -> set[str]:
    """Names certainly bound when ``target`` runs: parameters, and unconditional bindings on the way to it."""
    args = tree.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    for block, index, stmt in _path(tree.body, target) or []:
        for earlier in block[:index]:
            names |= _bindings(earlier)
        if stmt is not target and isinstance(stmt, (ast.For, ast.AsyncFor)):
            names |= _target_names(stmt.target)
        if stmt is not target and isinstance(stmt, (ast.With, ast.AsyncWith)):
            names |= {n for item in stmt.items if item.optional_vars is not None
                      for n in _target_names(item.optional_vars)}
    return names


def _path(block: list[ast.stmt], target: ast.stmt) -> list[tuple[list[ast.stmt], int, ast.stmt]] | None:
    for index, stmt in enumerate(block):
        if stmt is target:
            return [(block, index, stmt)]
        for inner in child_blocks(stmt):
            found = _path(inner, target)
            if found is not None:
                return [(block, index, stmt), *found]
    return None


def _bindings(stmt: ast.stmt) -> set[str]:
    """Names ``stmt`` binds whenever it completes (not those bound only in a branch or loop body)."""
    if isinstance(stmt, ast.Assign):
        return {n for t in stmt.targets for n in _target_names(t)}
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        return _target_names(stmt.target)
    if isinstance(stmt, (ast.With, ast.AsyncWith)):
        names = {n for item in stmt.items if item.optional_vars is not None for n in _target_names(item.optional_vars)}
        return names.union(*(_bindings(s) for s in stmt.body))
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).partition(".")[0] for a in stmt.names}
    return set()


def _target_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return {n for e in target.elts for n in _target_names(e)}
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return set()
