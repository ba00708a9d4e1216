"""Grad-mode sites in the step's source: which ``torch.inference_mode`` uses the ``inference-mode`` pass rewrites.

Measured on torch 2.13 (``tests/test_pass_modes_generic.py``): a compiled region that enters
inference mode itself fails under ``aot_eager``/``inductor`` as soon as it updates a view in
place ("Cannot set version_counter for inference tensor"), whatever mode the caller is in;
``no_grad``, ``enable_grad``, ``set_grad_enabled`` and ``inference_mode(False)`` compile. So only
``inference_mode(True)`` is rewritten, as a decorator or a ``with`` item, in the methods that run
in the step and in the helpers they call:

- the site that covers the whole root ``forward`` (its decorator, or a ``with`` around its whole
  body) is removed: the eager wrapper enters inference mode around the compiled core instead,
  which is exact;
- any other site becomes ``torch.no_grad()``: the same values and the same ``requires_grad``
  for every tensor, whatever mode the caller runs in (moving it out to the root would turn
  every tensor of the step into an inference tensor and drop the autograd the caller may
  record around it); the tensors made inside are no longer inference tensors.

A site is left alone and reported when its mode is a runtime value, when it binds ``as``, when
the function has decorators other than grad modes, or when grad is switched back on somewhere
in the step (``enable_grad``/``set_grad_enabled``): inside inference mode such a block records
nothing, under ``no_grad`` it would.
"""

from __future__ import annotations

import ast
import dataclasses
import types

import torch
from torch import nn

from graphfix.diagnose.findings import display_path
from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.grad_modes import (
    ModeUse,
    decorators_as_blocks,
    grad_mode_decorator_of,
    mode_use,
    split_docstring,
    without_grad_mode_decorators,
)

NO_GRAD = "_graphfix_no_grad"
"""The name the rewritten code calls ``torch.no_grad`` by (a closure cell, whatever the module imported)."""


def _no_grad_call() -> ast.Call:
    return ast.Call(func=ast.Name(id=NO_GRAD, ctx=ast.Load()), args=[], keywords=[])


def _where(fn: types.FunctionType, line: int) -> str:
    return f"{display_path(fn.__code__.co_filename)}:{line}"


# ---------------------------------------------------------------------------
# Which methods run in the step, and where the root forward's mode covers it all
# ---------------------------------------------------------------------------


def step_methods(model: nn.Module) -> set[int]:
    """Ids of the user methods that run in a step: every ``forward``/``__call__``, and the methods they call.

    A method is taken as called when a step method calls ``<anything>.<its name>(...)``; a
    ``generate`` that only calls ``self(...)`` stays out (its decorator runs outside the compiled call).
    """
    groups = reachable.methods_by_function(model)
    selected = {id(fn) for fn, name, _ in groups if name in ("forward", "__call__")}
    called: set[str] = set()
    while True:
        for fn, _, _ in groups:
            if id(fn) in selected:
                called |= _attribute_calls(fn)
        grown = {id(fn) for fn, name, _ in groups if name in called and reachable.runs_in_step(name)}
        if grown <= selected:
            return selected
        selected |= grown


def _attribute_calls(fn: types.FunctionType) -> set[str]:
    try:
        tree = sr.function_tree(without_grad_mode_decorators(fn))
    except sr.Unrewritable:
        return set()
    return {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


@dataclasses.dataclass(frozen=True)
class RootCover:
    """An ``inference_mode`` site that covers the whole root forward."""

    function: types.FunctionType
    """The root forward without its grad-mode decorators (what the transform sees)."""
    mode: bool
    how: str
    """``decorator`` or ``with``."""
    undecorated: types.FunctionType | None
    """For a decorator: the function right under it (the core when the source cannot be rewritten)."""


def root_cover(model: nn.Module) -> RootCover | None:
    """The site that covers the root forward's whole body, if there is one and it is not moved out yet."""
    fn = getattr(model.forward, "__func__", None)
    if not isinstance(fn, types.FunctionType):
        return None
    plain = without_grad_mode_decorators(fn)
    layer: object = fn
    while (found := grad_mode_decorator_of(layer)) is not None:
        if isinstance(found[0], torch.inference_mode):
            return RootCover(plain, bool(found[0].mode), "decorator", found[1])
        layer = found[1]
    if not reachable.user_function(plain):
        return None
    try:
        tree = sr.function_tree(plain)
    except sr.Unrewritable:
        return None
    _, body = split_docstring(tree.body)
    if len(body) == 1 and isinstance(body[0], ast.With) and not body[0].items[0].optional_vars:
        use = mode_use(plain, body[0].items[0].context_expr)
        if use is not None and use.enters_inference:
            return RootCover(plain, True, "with", None)
    return None


# ---------------------------------------------------------------------------
# The scan: where grad is switched back on, and what is left in place
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class GradModeScan:
    """A transform that changes nothing: it records the grad-mode uses of every function it is shown."""

    enables_grad: list[str] = dataclasses.field(default_factory=list)
    """``file:line`` of each block or call that may switch grad on (``enable_grad``, ``set_grad_enabled``)."""
    kept: int = 0
    """Grad-mode uses that compile as they are (everything but ``inference_mode(True)``)."""

    def __call__(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        if not reachable.user_function(fn):
            return 0, [], {}
        for node in ast.walk(tree):
            exprs = [i.context_expr for i in node.items] if isinstance(node, ast.With) else []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                exprs = list(node.decorator_list)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                exprs = [node.value]  # torch.set_grad_enabled(True) as a statement
            for expr in exprs:
                use = mode_use(fn, expr)
                if use is None or use.enters_inference or (use.kind == "inference" and use.mode is None):
                    continue
                self.kept += 1
                if use.may_enable_grad:
                    self.enables_grad.append(_where(fn, expr.lineno))
        return 0, [], {}


def scan_step(model: nn.Module, selected: set[int]) -> GradModeScan:
    """The grad-mode uses in the step methods of ``model`` (ids in ``selected``) and the helpers they call."""
    scan = GradModeScan()
    rewriter = reachable.ReachableRewriter(scan)
    for fn, _, _ in reachable.methods_by_function(model):
        if id(fn) in selected:
            rewriter.rewrite(fn)
    return scan


# ---------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------


class InferenceModeSites:
    """The source transform of ``inference-mode``: each ``inference_mode(True)`` site removed (root cover) or
    turned into ``torch.no_grad()``; reasons for the sites left alone."""

    def __init__(self, cover: RootCover | None, enables_grad: list[str]) -> None:
        self.cover = cover
        self.enables_grad = enables_grad
        self.root_moved = False
        """The root cover was taken out of the root's tree (its rewrite may still fail to compile)."""
        self.converted = 0
        """Sites turned into ``torch.no_grad()``."""

    def __call__(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        if not reachable.user_function(fn):
            return 0, [], {}
        if getattr(fn, "__wrapped__", None) is not None:  # a decorator's wrapper: its source is another function's
            uses = [n for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute))
                    and sr.resolve(fn, n) is torch.inference_mode]
            return 0, [f"{fn.__qualname__} is wrapped by a decorator graphfix does not see through"] if uses else [], {}
        reasons: list[str] = []
        seen: set[int] = set()
        count = self._with_sites(fn, tree, reasons, seen)
        count += self._nested_decorators(fn, tree, reasons, seen)
        count += self._decorators(fn, tree, reasons, seen)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in seen \
                    and sr.resolve(fn, node) is torch.inference_mode:
                reasons.append(f"line {node.lineno}: torch.inference_mode used other than as a decorator or `with`: "
                               "enter it around the compiled call instead")
                seen.update(id(n) for n in ast.walk(node))
        return count, reasons, {NO_GRAD: torch.no_grad}

    # -- one site -------------------------------------------------------------------------------

    def _refusal(self, use: ModeUse, has_target: bool) -> str | None:
        """Why an ``inference_mode`` site stays, or ``None`` when it can become ``no_grad``."""
        if use.mode is None:
            return "its mode is a runtime value"
        if has_target:
            return "`with ... as` binds the context manager"
        if self.enables_grad:
            return (f"grad is switched on at {self.enables_grad[0]} in the step: inside inference mode that block "
                    "records nothing, under no_grad it would")
        return None

    def _mark(self, expr: ast.expr, seen: set[int]) -> None:
        seen.update(id(n) for n in ast.walk(expr))

    # -- with blocks -----------------------------------------------------------------------------

    def _with_sites(self, fn: types.FunctionType, tree: ast.FunctionDef, reasons: list[str], seen: set[int]) -> int:
        count = 0
        covering = self._covering_with(fn, tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.With):
                continue
            for item in list(node.items):
                use = mode_use(fn, item.context_expr)
                if use is None or use.kind != "inference" or use.mode is False:
                    continue
                self._mark(item.context_expr, seen)
                if node is covering and item is node.items[0]:
                    node.items.remove(item)
                    self.root_moved = True
                    count += 1
                    continue
                why = self._refusal(use, item.optional_vars is not None)
                if why:
                    reasons.append(f"line {item.context_expr.lineno}: `with torch.inference_mode()` left in place: "
                                   f"{why}")
                    continue
                item.context_expr = ast.copy_location(_no_grad_call(), item.context_expr)
                self.converted += 1
                count += 1
        if covering is not None and not covering.items:
            doc, _ = split_docstring(tree.body)
            tree.body = doc + covering.body  # the block's statements, one level up
        return count

    def _covering_with(self, fn: types.FunctionType, tree: ast.FunctionDef) -> ast.With | None:
        if self.cover is None or self.cover.how != "with" or fn is not self.cover.function:
            return None
        _, body = split_docstring(tree.body)
        return body[0] if len(body) == 1 and isinstance(body[0], ast.With) else None

    # -- decorators ------------------------------------------------------------------------------

    def _nested_decorators(self, fn: types.FunctionType, tree: ast.FunctionDef, reasons: list[str],
                           seen: set[int]) -> int:
        """``@torch.inference_mode()`` on a function defined inside ``fn``: the decorator becomes ``no_grad()``."""
        count = 0
        for node in ast.walk(tree):
            if node is tree or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for i, dec in enumerate(node.decorator_list):
                use = mode_use(fn, dec)
                if use is None or not (use.kind == "inference" and use.mode is not False):
                    continue
                self._mark(dec, seen)
                why = self._refusal(use, False)
                if why:
                    reasons.append(f"line {dec.lineno}: @torch.inference_mode() on {node.name} left in place: {why}")
                    continue
                node.decorator_list[i] = ast.copy_location(_no_grad_call(), dec)
                self.converted += 1
                count += 1
        return count

    def _decorators(self, fn: types.FunctionType, tree: ast.FunctionDef, reasons: list[str], seen: set[int]) -> int:
        """``fn``'s own ``inference_mode`` decorators: the root cover dropped, any other made ``no_grad()``.

        The rewritten function is compiled without decorators: the rewriter turns what is left into
        the ``with`` blocks they stand for (``grad_modes.decorators_as_blocks``).
        """
        decorators = tree.decorator_list
        uses = [mode_use(fn, d) for d in decorators]
        for dec in decorators:
            self._mark(dec, seen)
        if any(u is None or u.mode is None for u in uses):
            if any(u is not None and u.kind == "inference" for u in uses):
                why = "it has decorators other than grad modes" if None in uses else "a decorator's mode is a runtime value"
                reasons.append(f"line {decorators[0].lineno}: @torch.inference_mode() on {fn.__qualname__} left in "
                               f"place: {why}")
            return 0
        count, ours = 0, set()
        is_root = self.cover is not None and self.cover.how == "decorator" and fn is self.cover.function
        for i, (dec, use) in reversed(list(enumerate(zip(decorators, uses)))):
            if is_root and use.kind == "inference":
                del decorators[i]  # the wrapper enters it around the compiled core
                self.root_moved, is_root = True, False
                count += 1
            elif use.enters_inference:
                why = self._refusal(use, False)
                if why:
                    reasons.append(f"line {dec.lineno}: @torch.inference_mode() on {fn.__qualname__} left in place: "
                                   f"{why}")
                    continue
                decorators[i] = ast.copy_location(_no_grad_call(), dec)
                ours.add(id(decorators[i]))
                self.converted += 1
                count += 1
        decorators_as_blocks(fn, tree, frozenset(ours))
        return count
