"""The source-rewrite machinery: closures, globals, line numbers, super(), and the refusals."""

from __future__ import annotations

import ast
import functools
import math
import traceback

import pytest
import torch
from torch import nn

from graphfix.rewrite.blocks import source_rewrite as sr

SCALE = 3.0


def _make_module():
    offset = 1.0  # a closure variable of forward

    class Base(nn.Module):
        def forward(self, x):
            return x

    class Child(Base):
        def forward(self, x):
            y = super().forward(x) * SCALE + offset
            return torch.sqrt(y) + math.pi

        def boom(self, x):
            return x.nonexistent_method()

    return Child()


class _Replace(ast.NodeTransformer):
    """Replace ``torch.sqrt(...)`` by ``_graphfix_helper(...)``."""

    def visit_Call(self, node):
        self.generic_visit(node)
        if ast.unparse(node.func) == "torch.sqrt":
            node.func = ast.Name(id="_graphfix_helper", ctx=ast.Load())
        return node


def test_rewrite_keeps_closure_globals_super_and_is_bound_to_the_instance():
    module = _make_module()
    other = type(module)()
    fn = dict(sr.user_methods(module))["forward"]
    tree = _Replace().visit(sr.function_tree(fn))
    new = sr.compile_function(fn, tree, {"_graphfix_helper": lambda t: t * 0 + 42.0})
    sr.install_method(module, "forward", new, "test-pass")
    x = torch.ones(2)
    assert torch.allclose(module(x), torch.full((2,), 42.0 + math.pi))
    assert torch.allclose(other(x), torch.full((2,), 2.0 + math.pi))  # other instances untouched
    assert torch.allclose(sr.original_method(module)(x), torch.full((2,), 2.0 + math.pi))
    assert "_graphfix_helper(" in sr.rewritten_source(module)
    assert new.__graphfix_passes__ == ("test-pass",)
    # a second transform starts from the rewritten tree
    assert "_graphfix_helper" in ast.unparse(sr.function_tree(dict(sr.user_methods(module))["forward"]))
    assert torch.allclose(torch.compile(module, backend="eager", fullgraph=True)(x), module(x))


def test_rewritten_code_reports_the_original_file_and_line():
    module = _make_module()
    fn = dict(sr.user_methods(module))["boom"]
    sr.install_method(module, "boom", sr.compile_function(fn, sr.function_tree(fn), {}), "test-pass")
    with pytest.raises(AttributeError) as info:
        module.boom(torch.ones(1))
    frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert frame.filename == __file__ and frame.lineno == fn.__code__.co_firstlineno + 1


def test_resolve_follows_scope_and_refuses_locals():
    def f(x):
        torch = None  # noqa: F841 - shadows the global
        return math.sqrt(x)

    tree = sr.function_tree(f)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call))
    assert sr.resolve(f, call.func) is math.sqrt
    assert sr.resolve(f, ast.parse("torch.sqrt", mode="eval").body) is sr.MISSING
    assert sr.resolve(f, ast.parse("print", mode="eval").body) is print


def test_refusals():
    class Private(nn.Module):
        def forward(self, x):
            return self.__hidden(x)

        def __hidden(self, x):
            return x

    fn = Private.forward
    with pytest.raises(sr.Unrewritable, match="private"):
        sr.compile_function(fn, sr.function_tree(fn), {})

    def deco(f):
        @functools.wraps(f)
        def wrapper(*a):
            return f(*a)
        return wrapper

    @deco
    def decorated(x):
        return x

    with pytest.raises(sr.Unrewritable):
        sr.compile_function(decorated, sr.function_tree(decorated.__wrapped__), {})
    with pytest.raises(sr.Unrewritable, match="not available"):
        sr.function_tree(eval("lambda x: x"))
