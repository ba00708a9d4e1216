"""What a name or attribute of the model denotes, found without running any of the user's code."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from graphfix.rewrite import grad_modes, reachable
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._complex_flow import surface


@dataclasses.dataclass(frozen=True)
class BoundMethod:
    """A user method bound to an object, as ``obj.name`` evaluates to."""

    obj: Any
    fn: types.FunctionType


def lookup(owner: Any, name: str) -> tuple[str, Any]:
    """What ``owner.name`` is: ``("value", v)``, ``("method", BoundMethod)``, ``("static", function)``
    (a user static or class method), or ``("unknown", None)`` (a property or other descriptor: its getter is
    code the analysis does not run)."""
    if isinstance(owner, (types.ModuleType, type)):
        return "value", getattr(owner, name, None)
    instance = getattr(owner, "__dict__", {})
    if isinstance(owner, nn.Module):
        for table in ("_parameters", "_buffers", "_modules"):
            if name in instance.get(table, {}):
                return "value", instance[table][name]
    if name in instance:
        value = instance[name]
        if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
            return "method", BoundMethod(owner, value.__func__)  # a method graphfix installed on the instance
        return "value", value
    try:
        attr = inspect.getattr_static(type(owner), name)
    except AttributeError:
        return "unknown", None
    if isinstance(attr, types.FunctionType):
        if reachable.user_function(attr):
            return "method", BoundMethod(owner, attr)
        return "value", types.MethodType(attr, owner)
    if isinstance(attr, (staticmethod, classmethod)) and reachable.user_function(attr.__func__):
        return "static", attr.__func__
    if hasattr(type(attr), "__get__"):
        return "unknown", None
    return "value", attr


def forward_of(module: nn.Module) -> types.FunctionType | None:
    """The user function ``module(...)`` runs (its ``forward``, a rewritten one if installed); ``None`` for library
    modules (``nn.Linear``)."""
    kind, value = lookup(module, "forward")
    return value.fn if kind == "method" else None


def elements(objs: tuple) -> list | None:
    """The elements iterating over what ``objs`` can be gives (module lists, lists, tuples, dict keys); else None."""
    out: list = []
    for obj in objs:
        if isinstance(obj, (nn.ModuleList, nn.Sequential, list, tuple)):
            out.extend(obj)
        elif isinstance(obj, (nn.ModuleDict, nn.ParameterDict, dict)):
            out.extend(obj.keys())
        else:
            return None
    return out


def holds_complex(value: Any) -> bool:
    """A complex tensor, or a list/tuple/dict with one."""
    if isinstance(value, torch.Tensor):
        return value.is_complex()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) and v.is_complex() for v in value)
    return False


def function_nodes(fn: types.FunctionType) -> Iterator[ast.AST]:
    """Every node of ``fn``'s source (a previous rewrite's, if any); none when the source is not available."""
    try:
        tree = sr.function_tree(fn)
    except sr.Unrewritable:
        return iter(())
    return ast.walk(tree)


def uses_complex(fn: types.FunctionType) -> bool:
    """Whether ``fn``'s own source calls torch's complex makers or readers."""
    return any(isinstance(n, ast.Call) and surface.is_torch_maker(sr.resolve(fn, n.func)) for n in function_nodes(fn))


def class_code_accesses(cls: type, name: str) -> Iterator[tuple[types.FunctionType, ast.Attribute]]:
    """``(function, node)`` of each ``.name`` in the user code of ``cls``: methods, properties, static methods."""
    for klass in cls.__mro__:
        if klass in (object, nn.Module) or klass.__module__.startswith(("torch.", "graphfix.")):
            continue
        for attr in vars(klass).values():
            if isinstance(attr, property):
                functions = [attr.fget, attr.fset]
            elif isinstance(attr, (staticmethod, classmethod)):
                functions = [attr.__func__]
            else:
                functions = [attr]
            for fn in functions:
                if isinstance(fn, types.FunctionType):
                    fn = grad_modes.without_grad_mode_decorators(fn)  # the function the rewrite reads
                    yield from ((fn, n) for n in function_nodes(fn) if isinstance(n, ast.Attribute) and n.attr == name)


def is_torch(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    return module.partition(".")[0] == "torch"


@functools.cache
def _torch_names() -> dict[int, str]:
    """``id -> "torch.fft.rfft"`` for torch's public functions (their ``__name__`` is often ``fft_rfft``)."""
    names: dict[int, str] = {}
    for prefix, namespace in (("torch.nn.functional", torch.nn.functional), ("torch.fft", torch.fft),
                              ("torch", torch)):
        for name, value in vars(namespace).items():
            if not name.startswith("_") and callable(value):
                names[id(value)] = f"{prefix}.{name}"
    return names


def display_name(obj: Any) -> str:
    """``torch.matmul``, ``len``, ``Linear module``: how a report names a callee."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, nn.Module):
        return f"a {type(obj).__name__} module"
    public = _torch_names().get(id(obj))
    if public:
        return public
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name
