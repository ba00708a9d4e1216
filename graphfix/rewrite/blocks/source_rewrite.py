"""Source-level method rewrites: ``inspect.getsource`` + an ``ast`` transform + ``compile``.

The new function gets the original's globals, closure cells, defaults and name,
and is compiled with the original file name and line numbers, so tracebacks and
graph-break locations still point at the user's source. It is bound to the one
instance (``types.MethodType``), never patched into the class. The original
function stays reachable (``original_method``) for verification, and the
rewritten tree is kept on the new function so that a second rewrite (another
pass) starts from it rather than from the file.

A rewrite happens only when the source is available and the transform matched
exactly; otherwise the caller reports the site as skipped with the reason.
"""

from __future__ import annotations

import ast
import builtins
import copy
import inspect
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

MISSING = object()
"""``resolve``'s answer for an expression that does not name a known object."""

_SKIPPED_PACKAGES = ("torch.", "graphfix.")


class Unrewritable(Exception):
    """The method cannot be rewritten safely; the message says why."""


def user_methods(module: nn.Module) -> Iterator[tuple[str, types.FunctionType]]:
    """``(name, function)`` of the methods the module's own classes define, as this instance sees them.

    Classes from ``torch`` and ``graphfix`` are skipped; an instance attribute set by a
    previous rewrite takes the place of the class's method.
    """
    seen: set[str] = set()
    for cls in type(module).__mro__:
        if cls is nn.Module or cls is object or cls.__module__.startswith(_SKIPPED_PACKAGES):
            continue
        for name, attr in vars(cls).items():
            if name in seen or not isinstance(attr, types.FunctionType):
                continue
            seen.add(name)
            bound = module.__dict__.get(name)
            fn = getattr(bound, "__func__", None) if isinstance(bound, types.MethodType) else None
            yield name, fn if isinstance(fn, types.FunctionType) else attr


def function_tree(fn: types.FunctionType) -> ast.FunctionDef:
    """A fresh ``ast.FunctionDef`` of ``fn`` with the file's line numbers (a previous rewrite's, if any)."""
    kept = getattr(fn, "__graphfix_ast__", None)
    if kept is not None:
        return copy.deepcopy(kept)
    try:
        lines, start = inspect.getsourcelines(fn)
    except (OSError, TypeError) as exc:
        raise Unrewritable(f"source of {fn.__qualname__} is not available ({exc})") from None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError as exc:
        raise Unrewritable(f"source of {fn.__qualname__} does not parse on its own ({exc.msg})") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) or tree.body[0].name != fn.__name__:
        raise Unrewritable(f"source of {fn.__qualname__} is not a plain def")
    ast.increment_lineno(tree, start - 1)
    return tree.body[0]


def resolve(fn: types.FunctionType, node: ast.AST) -> Any:
    """The object a ``Name``/``Attribute`` chain denotes in ``fn``'s scope, or ``MISSING``.

    Locals and parameters shadow globals, so a name ``fn`` binds itself is not
    resolved. Attributes are followed only on modules and classes (no properties
    of arbitrary objects run).
    """
    if isinstance(node, ast.Name):
        if node.id in fn.__code__.co_varnames:
            return MISSING
        if node.id in fn.__code__.co_freevars:
            cell = fn.__closure__[fn.__code__.co_freevars.index(node.id)]
            try:
                return cell.cell_contents
            except ValueError:
                return MISSING
        if node.id in fn.__globals__:
            return fn.__globals__[node.id]
        return getattr(builtins, node.id, MISSING)
    if isinstance(node, ast.Attribute):
        base = resolve(fn, node.value)
        if isinstance(base, (types.ModuleType, type)):
            return getattr(base, node.attr, MISSING)
    return MISSING


def is_call_to(fn: types.FunctionType, node: ast.AST, target: Any) -> bool:
    """Whether ``node`` is a call of exactly the object ``target``."""
    return isinstance(node, ast.Call) and resolve(fn, node.func) is target


def bind_call(node: ast.Call, signature_of: Callable) -> dict[str, ast.expr]:
    """The call's argument expressions by parameter name of ``signature_of``; ``Unrewritable`` for ``*``/``**``."""
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise Unrewritable("the call passes *args or **kwargs")
    try:
        bound = inspect.signature(signature_of).bind(*node.args, **{k.arg: k.value for k in node.keywords})
    except TypeError as exc:
        raise Unrewritable(f"the call does not match {signature_of.__name__}{inspect.signature(signature_of)}: {exc}")
    return dict(bound.arguments)


def compile_function(orig: types.FunctionType, fdef: ast.FunctionDef, helpers: dict[str, Any]) -> types.FunctionType:
    """Compile the transformed ``fdef`` into a function like ``orig``.

    ``helpers`` are extra names the transform refers to; they are given as closure
    cells, so the module's globals are left untouched.
    """
    if fdef.decorator_list:
        raise Unrewritable(f"{orig.__qualname__} is decorated; the rewrite would drop the decorator")
    if any(_is_private(n) for n in ast.walk(fdef)):
        raise Unrewritable(f"{orig.__qualname__} uses a class-private name (name mangling would change)")
    freevars = list(orig.__code__.co_freevars)
    cells = dict(zip(freevars, orig.__closure__ or ()))
    params = freevars + [h for h in helpers if h not in cells]
    factory = ast.FunctionDef(
        name="__graphfix_factory__",
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=[fdef, ast.Return(value=ast.Name(id=fdef.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
        **({"type_params": []} if "type_params" in ast.FunctionDef._fields else {}),
    )
    module = ast.Module(body=[factory], type_ignores=[])
    ast.copy_location(factory, fdef)
    ast.fix_missing_locations(module)
    code = compile(module, orig.__code__.co_filename, "exec", dont_inherit=True)
    factory_code = _const_code(code, "__graphfix_factory__")
    inner = _const_code(factory_code, fdef.name)
    closure = tuple(cells[n] if n in cells else types.CellType(helpers[n]) for n in inner.co_freevars)
    new = types.FunctionType(inner, orig.__globals__, orig.__name__, orig.__defaults__, closure)
    new.__kwdefaults__ = copy.copy(orig.__kwdefaults__)
    new.__qualname__ = orig.__qualname__
    new.__module__ = orig.__module__
    new.__doc__ = orig.__doc__
    new.__annotations__ = dict(getattr(orig, "__annotations__", {}))
    new.__graphfix_ast__ = copy.deepcopy(fdef)
    new.__graphfix_original__ = getattr(orig, "__graphfix_original__", orig)
    new.__graphfix_passes__ = tuple(getattr(orig, "__graphfix_passes__", ()))
    return new


def _is_private(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name.startswith("__") and not name.endswith("__")


def _const_code(code: types.CodeType, name: str) -> types.CodeType:
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            return const
    raise Unrewritable(f"compiled rewrite has no code object {name!r}")  # pragma: no cover - compiler invariant


def install_method(module: nn.Module, name: str, fn: types.FunctionType, pass_name: str) -> None:
    """Bind ``fn`` to ``module`` as its ``name`` method; the first original stays in ``original_method``."""
    originals = module.__dict__.setdefault("_graphfix_original_methods", {})
    originals.setdefault(name, getattr(module, name))
    done = tuple(getattr(fn, "__graphfix_passes__", ()))
    if pass_name not in done:
        fn.__graphfix_passes__ = done + (pass_name,)
    object.__setattr__(module, name, types.MethodType(fn, module))


def original_method(module: nn.Module, name: str = "forward") -> Callable:
    """The method as it was before any graphfix source rewrite (bound to ``module``)."""
    return module.__dict__.get("_graphfix_original_methods", {}).get(name, getattr(module, name))


def rewritten_source(module: nn.Module, name: str = "forward") -> str | None:
    """The source of a rewritten method (``ast.unparse``), or ``None`` if it was not rewritten."""
    fn = getattr(getattr(module, name, None), "__func__", None)
    tree = getattr(fn, "__graphfix_ast__", None)
    return ast.unparse(tree) if tree is not None else None


def statement_lists(node: ast.AST) -> Iterator[list[ast.stmt]]:
    """Every list of statements under ``node`` (bodies, ``else``/``finally`` blocks, handlers)."""
    for child in ast.walk(node):
        for field in ("body", "orelse", "finalbody"):
            value = getattr(child, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                yield value
