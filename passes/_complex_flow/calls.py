"""Calls in the interpreted code: torch's complex functions, methods of complex values, user code, libraries.

A call into user code (a module-level helper, a method, a submodule's ``forward``, also through
``for layer in self.layers``) binds its arguments to the callee's context and takes the callee's
return value. A complex value passed anywhere else (torch, a library module, unknown code) is an
issue: the stand-in is not a tensor there.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import itertools
import types
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._complex_flow import objects, surface
from passes._complex_flow.values import COMPLEX, NONE, Val, join_all, outside, outside_part

if TYPE_CHECKING:
    from passes._complex_flow.analysis import Analysis, Context

_MAX_COMBINATIONS = 64


class CallRules:
    """The call half of ``Interpreter`` (it provides ``expr``, ``read_attribute`` and ``no_complex``)."""

    a: Analysis
    ctx: Context
    fn: types.FunctionType
    me: tuple
    spread_unknown: bool

    def e_Call(self, node: ast.Call, env: dict[str, Val]) -> Val:
        target = sr.resolve(self.fn, node.func)
        if target is pc.stored:  # a read the pass wrapped before: the attribute is a complex table
            if node.args and isinstance(node.args[0], ast.Attribute):
                self.e_Attribute(node.args[0], env, wrap=False)
            return COMPLEX
        method_of = callee = None
        if target is sr.MISSING:  # Python evaluates the callee before the arguments
            if isinstance(node.func, ast.Attribute):
                method_of = self.expr(node.func.value, env)
            else:
                callee = self.expr(node.func, env)
        args, kwargs = self.arguments(node, env)
        values = args + list(kwargs.values())
        if surface.maker_name(target):
            return self.complex_call(node, target, args, kwargs)
        if id(target) in surface.OWN_ARITH or target is pc.storable:
            return COMPLEX if target is not pc.storable and any(v.is_complex for v in values) else NONE
        if id(target) in surface.SPECTRAL:
            self.a.maker(self.fn, node)
            self.a.issue(self.fn, node, f"calls {objects.display_name(target)}: FFTs make complex values graphfix "
                         "does not pair")
            return NONE
        if id(target) in surface.CONCRETE_BUILTINS:
            return self.call_objects(node, (target,), args, kwargs)
        if target is not sr.MISSING:
            if reachable.user_function(target):
                return self.call_function(node, target, (), args, kwargs)
            return self.library_call(node, target, values)
        if method_of is not None:
            return self.method_call(node, method_of, args, kwargs)
        if callee.objs is not None:
            return self.call_objects(node, callee.objs, args, kwargs)
        return self.library_call(node, ast.unparse(node.func), values,
                                 result=outside(f"the result of `{ast.unparse(node.func)}(...)`"))

    def arguments(self, node: ast.Call, env: dict[str, Val]) -> tuple[list[Val], dict[str, Val]]:
        """The call's arguments; ``*t`` of a tuple whose items are known is spread (``f(x, *args)`` forwarding),
        any other ``*``/``**`` sets ``spread_unknown``."""
        unknown = False
        args: list[Val] = []
        for arg in node.args:
            value = self.expr(arg.value if isinstance(arg, ast.Starred) else arg, env)
            if isinstance(arg, ast.Starred) and value.items is not None:
                args.extend(value.items)
            else:
                unknown |= isinstance(arg, ast.Starred)
                args.append(value)
        kwargs: dict[str, Val] = {}
        for keyword in node.keywords:
            unknown |= keyword.arg is None
            kwargs[keyword.arg or f"**{len(kwargs)}"] = self.expr(keyword.value, env)
        self.spread_unknown = unknown
        return args, kwargs

    def complex_call(self, node: ast.Call, target: Any, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """view_as_complex / polar / complex / view_as_real: torch's (the rewrite replaces them), or the stand-in's
        (a previous run of the pass)."""
        name = surface.maker_name(target)
        values = args + list(kwargs.values())
        self.a.maker(self.fn, node)
        try:
            inspect.signature(getattr(pc, name)).bind(*args, **kwargs)
        except TypeError:
            self.a.issue(self.fn, node, f"calls {name} with arguments graphfix's stand-in does not take (`out=`, "
                         f"`*args`): `{ast.unparse(node)}`")
        if name == "view_as_real":
            value = values[0] if values else NONE
            if not value.is_complex:
                where = f"from outside the model ({value.all_origin})" if value.is_outside else \
                    "from code graphfix does not follow"
                self.a.issue(self.fn, node, f"`{ast.unparse(node)}` reads a complex value {where}")
            result = NONE
        else:
            for value in values:
                self.no_complex(value, node, f"is passed to {name}")
            result = COMPLEX
        if surface.is_torch_maker(target):
            self.a.site(self.fn, node, "call", name)
        return result

    def method_call(self, node: ast.Call, base: Val, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """``x.name(...)``, ``x`` evaluated."""
        name = node.func.attr
        if base.is_complex:
            return self.complex_method(node, name, args, kwargs)
        if base.objs is not None:
            return self.object_call(node, base, args, kwargs)
        self.a.unresolved_access(self.fn, node.func, name)
        if name in surface.COMPLEX_TENSOR_METHODS:
            self.a.maker(self.fn, node)
            self.a.issue(self.fn, node, f"`.{name}()` makes a complex tensor graphfix does not pair")
        return self.library_call(node, f"`.{name}()`", [base, *args, *kwargs.values()])

    def complex_method(self, node: ast.Call, name: str, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """A method of a complex value: what the stand-in has, with the value it gives."""
        values = args + list(kwargs.values())
        if name in surface.SCALAR_METHODS:
            return NONE
        if name == "type_as":  # to the other's dtype: complex only if the other is
            return COMPLEX if any(v.is_complex for v in values) else NONE
        if name == "to":
            to_real = any(v.objs and all(isinstance(o, torch.dtype) and not o.is_complex for o in v.objs)
                          for v in values)
            return NONE if to_real else COMPLEX
        if name in surface.STRUCTURAL_METHODS:
            for value in values:
                self.no_complex(value, node, f"is an argument of `.{name}()`")
            return COMPLEX
        self.a.issue(self.fn, node, f"`.{name}()` of a complex value: not in graphfix's paired form")
        return NONE

    def object_call(self, node: ast.Call, base: Val, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """``obj.name(...)`` where the objects ``obj`` can be are known: methods, submodules, containers."""
        name = node.func.attr
        callee = self.read_attribute(node.func, base, wrap=True)
        if callee.objs is not None and all(isinstance(o, (objects.BoundMethod, nn.Module)) for o in callee.objs):
            return self.call_objects(node, callee.objs, args, kwargs)
        if name in surface.CONCRETE_METHODS and all(isinstance(o, (nn.Module, dict)) for o in base.objs):
            return Val(objs=tuple(tuple(getattr(o, name)()) for o in base.objs))
        if callee.is_complex:
            self.a.issue(self.fn, node, f"calls `.{name}`, a complex value")
            return NONE
        return self.library_call(node, f"`.{name}()`", [*args, *kwargs.values()],
                                 result=outside_part(callee) if callee.is_outside else None)

    def call_objects(self, node: ast.Call, objs: tuple, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """A call of a value that can be any of ``objs``: the join of what each gives."""
        results: list[Val] = []
        selves_of: dict[int, tuple[types.FunctionType, list]] = {}
        values = [*args, *kwargs.values()]
        for obj in objs:
            if isinstance(obj, objects.BoundMethod):
                selves_of.setdefault(id(obj.fn), (obj.fn, []))[1].append(obj.obj)
            elif isinstance(obj, nn.Module) and objects.forward_of(obj) is not None:
                forward = objects.forward_of(obj)
                selves_of.setdefault(id(forward), (forward, []))[1].append(obj)
            elif isinstance(obj, types.FunctionType) and reachable.user_function(obj):
                results.append(self.call_function(node, obj, (), args, kwargs))
            elif id(obj) in surface.CONCRETE_BUILTINS and all(a.objs is not None for a in args) and not kwargs:
                combos = itertools.islice(itertools.product(*(a.objs for a in args)), _MAX_COMBINATIONS)
                results.append(Val(objs=tuple(tuple(obj(*combo)) for combo in combos)))
            else:
                results.append(self.library_call(node, obj, values))
        for fn, selves in selves_of.values():
            results.append(self.call_function(node, fn, tuple(selves), args, kwargs))
        return join_all(results)

    def call_function(self, node: ast.Call, fn: types.FunctionType, selves: tuple, args: list[Val],
                      kwargs: dict[str, Val]) -> Val:
        """A call into user code: bind the arguments to the callee's parameters, take its return value."""
        values = args + list(kwargs.values())
        if not any(v.is_complex for v in values) and not self.a.follows(fn, selves):
            return outside_part(*values)  # no complex construct there, none passed in
        if not selves and not self.ctx.follows_helpers:
            self.no_complex_args(node, values, f"{fn.__qualname__} (called from a setup method: graphfix does not "
                                 "redirect those calls)")
            return outside(f"the result of {fn.__qualname__}, called from a setup method")
        ctx = self.a.context(fn, selves)
        if ctx is None:
            self.no_complex_args(node, values, f"{fn.__qualname__} (its source is not available)")
            return outside(f"the result of {fn.__qualname__}")
        bound = self.bind(node, ctx.fn, selves, args, kwargs)
        if bound is None:
            return outside(f"the result of {fn.__qualname__}")
        self.a.bind_params(ctx, bound)
        if any(v.is_complex for v in values) or ctx.result.is_complex:
            self.a.connect(self.me, ("fn", id(ctx.fn)))
        return ctx.result

    def bind(self, node: ast.Call, fn: types.FunctionType, selves: tuple, args: list[Val],
             kwargs: dict[str, Val]) -> dict[str, Val] | None:
        """The callee's parameters as this call sets them (``self`` left out)."""
        params = inspect.signature(fn).parameters
        names = list(params)[1:] if selves else list(params)
        values = args + list(kwargs.values())
        if self.spread_unknown:
            self.no_complex_args(node, values, f"{fn.__qualname__} through *args/**kwargs")
            return {p: outside(f"arguments of {fn.__qualname__} passed with *args/**kwargs") for p in names}
        try:
            binding = inspect.signature(fn).bind(*([Val(objs=selves)] if selves else []), *args, **kwargs)
        except TypeError:
            self.no_complex_args(node, values, f"{fn.__qualname__} with arguments that do not match it")
            return None
        bound: dict[str, Val] = {}
        for name, value in binding.arguments.items():
            if name not in names:
                continue
            if params[name].kind is inspect.Parameter.VAR_POSITIONAL:
                value = Val(items=tuple(value))
            elif params[name].kind is inspect.Parameter.VAR_KEYWORD:
                value = join_all(value.values())
            bound[name] = value
        return bound

    def library_call(self, node: ast.Call, target: Any, values: list[Val], result: Val | None = None) -> Val:
        """A call into torch, the standard library or unknown code: no complex value may go there."""
        if id(target) in surface.NEUTRAL_BUILTINS:
            return NONE
        self.no_complex_args(node, values, objects.display_name(target))
        if result is not None:
            return result
        known = isinstance(target, (str, type, nn.Module)) or objects.is_torch(target) \
            or getattr(builtins, getattr(target, "__name__", ""), None) is target
        return outside_part(*values) if known else outside(f"the result of {objects.display_name(target)}")

    def no_complex_args(self, node: ast.Call, values: list[Val], callee: str) -> None:
        if any(v.is_complex for v in values):
            self.a.issue(self.fn, node, f"passes a complex value to {callee}: not in graphfix's paired form")
