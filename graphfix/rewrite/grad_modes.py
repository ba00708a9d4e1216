"""Grad-mode context managers (``inference_mode``, ``no_grad``, ``enable_grad``, ``set_grad_enabled``) in a model's code.

Two views of the same construct. At run time, a function decorated with one of them is
torch's ``context_decorator`` wrapper: recognised exactly by its code object and closure,
and seen through to the function it wraps. In the source, the decorator or ``with`` item is
an expression that resolves to one of the classes; ``mode_use`` says which, with its mode.

Source rewrites compile a function without decorators (a decorator's wrapper is not the
function whose source is read), so a grad-mode decorator is turned into the ``with`` block
it stands for around the body (``decorators_as_blocks``): ``@torch.no_grad()`` on ``f`` runs
``f``'s body under ``torch.no_grad()``, which is what the block does.
"""

from __future__ import annotations

import ast
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import torch

from graphfix.rewrite.blocks import source_rewrite as sr

_DECORATED_CODE = torch.inference_mode()(lambda: None).__code__
"""The code object of ``torch.utils._contextlib.context_decorator``'s wrapper (shared by every grad-mode decorator)."""

GRAD_MODE_CLASSES = (torch.inference_mode, torch.no_grad, torch.enable_grad, torch.set_grad_enabled)
"""The context managers whose decorator form graphfix sees through (all switch autograd state only)."""

_KINDS = {torch.inference_mode: "inference", torch.no_grad: "no_grad", torch.enable_grad: "enable_grad",
          torch.set_grad_enabled: "set_grad_enabled"}


def grad_mode_decorator_of(fn: Any) -> tuple[Any, Callable] | None:
    """``(context manager, wrapped function)`` if ``fn`` is ``torch.<grad mode>(...)(f)``, else ``None``.

    Matched by the wrapper's code object and its closure (``ctx_factory`` is the
    bound ``clone`` of a grad-mode context manager instance), not by names.
    """
    fn = getattr(fn, "__func__", fn)
    if getattr(fn, "__code__", None) is not _DECORATED_CODE or not fn.__closure__:
        return None
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
    if "ctx_factory" not in cells or "func" not in cells:
        return None
    ctx = getattr(cells["ctx_factory"].cell_contents, "__self__", None)
    if not isinstance(ctx, GRAD_MODE_CLASSES):
        return None
    return ctx, cells["func"].cell_contents


def without_grad_mode_decorators(fn: types.FunctionType) -> types.FunctionType:
    """The plain function under any stack of grad-mode decorators (``fn`` itself when it has none).

    Its source still shows the decorators (``inspect`` reads from the first one), so a source
    transform sees them; ``decorators_as_blocks`` turns them into ``with`` blocks.
    """
    found = grad_mode_decorator_of(fn)
    while found is not None and isinstance(found[1], types.FunctionType):
        fn = found[1]
        found = grad_mode_decorator_of(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class ModeUse:
    """One grad-mode context manager in the source: ``torch.<kind>(<mode>)``."""

    kind: str
    """``inference``, ``no_grad``, ``enable_grad`` or ``set_grad_enabled``."""
    mode: bool | None
    """The constant mode (``inference_mode``, ``set_grad_enabled``; ``True`` for the others), ``None`` at runtime."""

    @property
    def enters_inference(self) -> bool:
        return self.kind == "inference" and self.mode is True

    @property
    def may_enable_grad(self) -> bool:
        return self.kind == "enable_grad" or (self.kind == "set_grad_enabled" and self.mode is not False)


def mode_use(fn: types.FunctionType, expr: ast.expr) -> ModeUse | None:
    """The grad-mode context manager ``expr`` builds in ``fn`` (``torch.no_grad()``, a bare ``@torch.inference_mode``)."""
    call = expr if isinstance(expr, ast.Call) else None
    target = sr.resolve(fn, call.func if call else expr)
    kind = next((k for cls, k in _KINDS.items() if cls is target), None)
    if kind is None:
        return None
    if kind in ("no_grad", "enable_grad") or call is None:
        return ModeUse(kind, True)
    try:
        value = sr.bind_call(call, torch.inference_mode if kind == "inference" else torch.set_grad_enabled).get("mode")
    except sr.Unrewritable:
        return ModeUse(kind, None)
    if value is None:
        return ModeUse(kind, True)
    constant = isinstance(value, ast.Constant) and isinstance(value.value, bool)
    return ModeUse(kind, value.value if constant else None)


def split_docstring(body: list[ast.stmt]) -> tuple[list[ast.stmt], list[ast.stmt]]:
    """``([docstring statement] or [], the rest)``."""
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[:1], body[1:]
    return [], body


def decorators_as_blocks(fn: types.FunctionType, tree: ast.FunctionDef, checked: frozenset[int] = frozenset()) -> None:
    """Turn ``tree``'s decorators into ``with`` blocks around its body (the outermost decorator outermost).

    ``Unrewritable`` unless every decorator is a grad-mode context manager with a constant mode
    (one with a runtime argument was evaluated once, at the ``def``; a block would evaluate it per call).
    ``checked``: ids of decorator nodes a transform put there itself (calls of its own helper names).
    """
    if not tree.decorator_list:
        return
    for dec in tree.decorator_list:
        if id(dec) in checked:
            continue
        use = mode_use(fn, dec)
        if use is None:
            raise sr.Unrewritable(f"{fn.__qualname__} is decorated; the rewrite would drop the decorator")
        if use.mode is None:
            raise sr.Unrewritable(f"{fn.__qualname__}'s @{ast.unparse(dec)}: the mode is a runtime value")
    doc, body = split_docstring(tree.body)
    for dec in reversed(tree.decorator_list):
        manager = dec if isinstance(dec, ast.Call) else ast.Call(func=dec, args=[], keywords=[])
        body = [ast.copy_location(ast.With(items=[ast.withitem(context_expr=manager, optional_vars=None)], body=body),
                                  dec)]
    tree.decorator_list = []
    tree.body = doc + body
