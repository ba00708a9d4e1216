"""Rewrite the code a model runs, not only its methods: helpers called from forward, at any depth.

Real codebases keep the constructs graphfix rewrites in plain functions (Meta's
``apply_rotary_emb``, a research file's ``attention(q, k, v, mask)``), called from a
module's ``forward`` or from each other. A pass's source transform must reach them
wherever they are, and the rewrite must stay local to the model being optimized: a
module-level function is never patched in its module (other models, other code use it).

So each *call site* of a rewritten helper is redirected: the caller is rewritten too,
its ``helper(...)`` becomes ``_graphfix_fn_helper(...)`` bound to the rewritten copy
through a closure cell, and the caller is installed on the model's instances as
usual. A helper that the transform leaves alone, and whose callees it leaves alone,
is never copied.

``user_function`` decides what is code of the model's codebase (its functions can be
rewritten) and what is library code (torch, graphfix, the standard library: never
rewritten, never followed).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator

from torch import nn

from graphfix.rewrite import grad_modes
from graphfix.rewrite.blocks import source_rewrite as sr

Transform = Callable[[types.FunctionType, ast.FunctionDef], tuple[int, list[str], dict]]
"""``(fn, tree) -> (sites rewritten in tree, reasons for sites left alone, helper names used)``; mutates tree."""

Unwrap = Callable[[types.FunctionType], types.FunctionType]
"""``wrapper -> the function it wraps`` for decorators a transform can see through (identity otherwise)."""

_LIBRARY_PACKAGES = frozenset({
    "torch", "graphfix", "passes", "numpy", "typing_extensions", "functorch", "triton", "sympy", "einops",
    "safetensors", "accelerate", "fairscale_internal_never",
})
_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])
_SETUP_METHODS = frozenset({"extra_repr", "reset_parameters", "init_weights", "_init_weights", "post_init"})
"""Methods that build or describe a module, never run in a step: their helpers are not followed."""


def runs_in_step(method_name: str) -> bool:
    """Whether a method of this name may run in a forward step (``__init__`` and dunders do not)."""
    if method_name == "__call__":
        return True
    return not method_name.startswith("__") and method_name not in _SETUP_METHODS


def user_function(obj: object) -> bool:
    """Whether ``obj`` is a plain Python function of a model's codebase (not torch, graphfix or stdlib)."""
    if not isinstance(obj, types.FunctionType):
        return False
    top = (obj.__module__ or "").partition(".")[0]
    if top in _LIBRARY_PACKAGES or top in sys.builtin_module_names:
        return False
    path = os.path.realpath(obj.__code__.co_filename)
    if path.startswith(_STDLIB + os.sep) and "site-packages" not in path:
        return False
    return not obj.__code__.co_filename.startswith("<")


@dataclasses.dataclass
class FunctionRewrite:
    """What rewriting one function (with its callees) gave."""

    function: types.FunctionType
    """The rewritten function, or the original when nothing changed."""
    sites: int = 0
    """Sites the transform rewrote in this function's own body (callees not counted)."""
    reasons: list[str] = dataclasses.field(default_factory=list)
    changed: bool = False


class ReachableRewriter:
    """Applies one transform to functions and, through their call sites, to the helpers they call.

    Results are memoised per function object: a helper called from 30 layers' forwards
    (one function) is rewritten once, and recursion through mutually calling helpers ends.
    """

    def __init__(self, transform: Transform, *, follow_callees: bool = True,
                 unwrap: Unwrap = grad_modes.without_grad_mode_decorators) -> None:
        self.transform = transform
        self.follow_callees = follow_callees
        self.unwrap = unwrap
        """Applied to every function before it is read: a decorator's wrapper has neither the source nor the
        globals and closure of the function it wraps, so the wrapped function is rewritten in its place, its
        grad-mode decorators turned into the ``with`` blocks they stand for (``grad_modes.decorators_as_blocks``)."""
        self.done: dict[int, FunctionRewrite] = {}
        self.helpers_seen: list[tuple[types.FunctionType, FunctionRewrite]] = []
        """Every module-level helper (not a method) the transform was shown, in order, changed or not: the
        reasons of a helper left alone are reported too."""

    @property
    def helpers_rewritten(self) -> list[tuple[types.FunctionType, FunctionRewrite]]:
        """Module-level helpers (not methods) that changed, in the order they were rewritten."""
        return [(fn, outcome) for fn, outcome in self.helpers_seen if outcome.changed]

    def rewrite(self, fn: types.FunctionType, *, is_method: bool = True) -> FunctionRewrite:
        fn = self.unwrap(fn)
        key = id(fn)
        if key in self.done:
            return self.done[key]
        outcome = FunctionRewrite(fn)
        self.done[key] = outcome  # a recursive call sees "unchanged" and stops
        if not is_method:
            self.helpers_seen.append((fn, outcome))
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            return outcome  # no source (C code, generated): nothing to scan
        helpers: dict[str, object] = {}
        callees_changed = self._redirect_callees(fn, tree, helpers) if self.follow_callees else False
        try:
            sites, reasons, used = self.transform(fn, tree)
        except sr.Unrewritable as exc:
            outcome.reasons.append(str(exc))
            sites, reasons, used = 0, [], {}
        outcome.reasons.extend(reasons)
        if sites == 0 and not callees_changed:
            return outcome
        helpers.update(used)
        try:
            grad_modes.decorators_as_blocks(fn, tree)
            new = sr.compile_function(fn, tree, helpers)
        except sr.Unrewritable as exc:
            outcome.reasons.append(str(exc))
            return outcome
        outcome.function, outcome.sites, outcome.changed = new, sites, True
        return outcome

    def _redirect_callees(self, fn: types.FunctionType, tree: ast.FunctionDef, helpers: dict[str, object]) -> bool:
        changed = False
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            target = sr.resolve(fn, node.func)
            if isinstance(target, types.FunctionType):
                target = self.unwrap(target)
            if not user_function(target):
                continue
            sub = self.rewrite(target, is_method=False)
            if not sub.changed:
                continue
            name = f"_graphfix_fn_{target.__name__}"
            helpers[name] = sub.function
            node.func = ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node.func)
            changed = True
        return changed


def methods_by_function(model: nn.Module) -> list[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]]:
    """User methods grouped by function object: ``(function, method name, [(module path, module), ...])``."""
    groups: dict[int, tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]] = {}
    for path, module in model.named_modules():
        for name, fn in sr.user_methods(module):
            groups.setdefault(id(fn), (fn, name, []))[2].append((path, module))
    return list(groups.values())


def reachable_functions(model: nn.Module) -> Iterator[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]]:
    """Every user method of ``model`` and every user helper they call (at any depth), once each.

    Helpers come with the method name ``""`` and the instances of the first method that calls them.
    """
    seen: set[int] = set()
    stack: list[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]] = list(reversed(methods_by_function(model)))
    while stack:
        fn, name, instances = stack.pop()
        fn = grad_modes.without_grad_mode_decorators(fn)
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        yield fn, name, instances
        if name and not runs_in_step(name):
            continue
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                target = sr.resolve(fn, node.func)
                if isinstance(target, types.FunctionType):
                    target = grad_modes.without_grad_mode_decorators(target)
                if user_function(target) and id(target) not in seen:
                    stack.append((target, "", instances))
