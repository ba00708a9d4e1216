"""What a function's names hold beyond its source text: the attributes of the modules a method is bound to,
and which expressions are provably Python numbers.

Source transforms read ``self.scale`` or ``self.attn_dropout`` and must know what they are: a float scale can
become SDPA's ``scale=``, a tensor cannot; an ``nn.Dropout`` can become ``dropout_p=``, another module cannot.
The values are read from the instances the method is bound to, without running properties or other user code.
"""

from __future__ import annotations

import ast
import inspect
import types
from typing import Any

from torch import nn

from graphfix.rewrite import dataflow
from graphfix.rewrite.blocks import source_rewrite as sr

MAX_DEPTH = 64
"""How deep the recursive questions about an expression go before answering no."""


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
        if depth > MAX_DEPTH:
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
            return bool(values) and all(python_number(v) for v in values)
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
        return python_number(sr.resolve(self.fn, node))


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


def python_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_size_call(node: ast.AST, nargs: int = 1) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size"
            and len(node.args) == nargs and not node.keywords)


def int_constant(node: ast.AST) -> int | None:
    """The value of an int literal, ``-1`` included; ``None`` for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = int_constant(node.operand)
        return None if inner is None else -inner
    return None


def constant_value(fn: types.FunctionType, node: ast.AST) -> Any:
    """The value of a constant-like expression (literals, ``float("...")``, module constants), else ``None``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = constant_value(fn, node.operand)
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
