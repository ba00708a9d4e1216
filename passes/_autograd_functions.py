"""Custom ``torch.autograd.Function``s that run a collective and break Dynamo: their ``apply`` calls, for inference.

fairscale's model-parallel mappings are the known case (``ctx.mark_dirty`` around an in-place
``dist.all_reduce``), but any codebase can write one. Dynamo traces most Functions today, with
a collective in them too; what it cannot trace is some ctx calls (measured on torch 2.13:
``ctx.mark_dirty`` -> "Unsupported autograd.Function context `mark_dirty`", in every call, even
without grad). So a Function is rewritten only when its forward (or a helper it passes ``ctx``
to) runs a collective *and* calls a ctx method outside ``TRACED_CTX_METHODS``: each
``Fn.apply(...)`` call in the step (or an alias such as fairscale's ``reduce = _Reduce.apply``)
becomes ``forward_for_inference(Fn, takes_ctx, ...)`` (``graphfix.rewrite.blocks.collectives``), which runs
the forward with a ctx that records nothing, so Dynamo traces the collective (an in-place
``dist.all_reduce`` becomes a functional one). Without grad that is what ``apply`` computes;
with grad on a tensor that requires it, the helper raises.

A Function with such a ctx call but no collective is not this pass's: it is reported and left.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import collectives as gc
from graphfix.rewrite.blocks import source_rewrite as sr

TRACED_CTX_METHODS = frozenset({"save_for_backward", "save_for_forward", "mark_non_differentiable",
                                "set_materialize_grads"})
"""ctx methods Dynamo traces inside a Function's forward (measured on torch 2.13, tests/test_pass_collectives_generic.py)."""

_C10D_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "scatter", "gather", "_all_gather_base", "_reduce_scatter_base")
_FUNCOL_NAMES = ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
                 "all_reduce_coalesced", "all_gather_into_tensor_coalesced")
COLLECTIVES = {obj: f"{mod.__name__.rpartition('.')[2]}.{name}"
               for mod, names in ((dist, _C10D_NAMES), (funcol, _FUNCOL_NAMES))
               for name in names if callable(obj := getattr(mod, name, None))}
"""c10d and functional collectives, by object (names that a torch version lacks are left out)."""

HELPER = "_graphfix_forward_for_inference"
_HELPER_DEPTH = 4
"""How deep helpers called from a Function's forward are followed when looking for a collective or a ctx call."""


@dataclasses.dataclass
class FunctionFacts:
    """What a custom Function's forward does that matters here."""

    function: type
    collectives: set[str] = dataclasses.field(default_factory=set)
    ctx_calls: set[str] = dataclasses.field(default_factory=set)
    source: bool = True

    @property
    def untraced_ctx_calls(self) -> set[str]:
        return self.ctx_calls - TRACED_CTX_METHODS

    @property
    def rewrite(self) -> bool:
        return bool(self.collectives and self.untraced_ctx_calls)


def applied_function(obj: Any) -> type | None:
    """The Function class when ``obj`` is its ``apply`` (``Fn.apply``, bound to the class), else ``None``."""
    owner = getattr(obj, "__self__", None)
    if not (isinstance(owner, type) and issubclass(owner, torch.autograd.Function)):
        return None
    return owner if getattr(obj, "__func__", None) is torch.autograd.Function.apply.__func__ else None


def function_facts(function: type) -> FunctionFacts:
    """The collectives and ctx calls of ``function``'s forward (and ``setup_context``), following user helpers."""
    facts = FunctionFacts(function)
    forward = inspect.getattr_static(function, "forward")
    forward = getattr(forward, "__func__", forward)
    if not isinstance(forward, types.FunctionType):
        facts.source = False
        return facts
    separate = not gc.forward_takes_ctx(function)
    params = list(inspect.signature(forward).parameters)
    facts.source = _scan(forward, set() if separate or not params else {params[0]}, facts, 0, set())
    if separate:
        setup = inspect.getattr_static(function, "setup_context")
        setup = getattr(setup, "__func__", setup)
        if isinstance(setup, types.FunctionType):
            names = list(inspect.signature(setup).parameters)
            _scan(setup, {names[0]} if names else set(), facts, 0, set())
    return facts


def _scan(fn: types.FunctionType, ctx_names: set[str], facts: FunctionFacts, depth: int, seen: set[int]) -> bool:
    """Record ``fn``'s collectives and calls on ``ctx_names``; False when its source is not available."""
    if id(fn) in seen:
        return True
    seen.add(id(fn))
    try:
        tree = sr.function_tree(fn)
    except sr.Unrewritable:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ctx_names:
            facts.ctx_calls.add(func.attr)
            continue
        target = sr.resolve(fn, func)
        if _hashable(target) and target in COLLECTIVES:
            facts.collectives.add(COLLECTIVES[target])
        elif reachable.user_function(target) and depth < _HELPER_DEPTH:
            _scan(target, _ctx_params(target, node, ctx_names), facts, depth + 1, seen)
    return True


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _ctx_params(callee: types.FunctionType, call: ast.Call, ctx_names: set[str]) -> set[str]:
    """The parameter names of ``callee`` that receive one of ``ctx_names`` in ``call``."""
    try:
        bound = sr.bind_call(call, callee)
    except sr.Unrewritable:
        return set()
    return {p for p, arg in bound.items() if isinstance(arg, ast.Name) and arg.id in ctx_names}


class FunctionApplySites:
    """The source transform: ``Fn.apply(...)`` of each Function worth rewriting -> ``forward_for_inference(Fn, ...)``."""

    def __init__(self) -> None:
        self.facts: dict[type, FunctionFacts] = {}
        self.rewritten: dict[str, int] = {}
        """Call sites rewritten, by Function name (for the notes)."""

    def facts_of(self, function: type) -> FunctionFacts:
        if function not in self.facts:
            self.facts[function] = function_facts(function)
        return self.facts[function]

    def __call__(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        if not reachable.user_function(fn):
            return 0, [], {}
        count, reasons, helpers, called = 0, [], {}, set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            function = applied_function(sr.resolve(fn, node.func))
            if function is None:
                continue
            called.add(id(node.func))
            facts = self.facts_of(function)
            if not facts.rewrite:
                continue
            if any(isinstance(a, ast.Starred) for a in node.args) or node.keywords:
                reasons.append(f"line {node.lineno}: {function.__qualname__}.apply is called with *args or keywords")
                continue
            name = _helper_name(function, helpers)
            helpers[name] = function
            helpers[HELPER] = gc.forward_for_inference
            takes_ctx = ast.Constant(gc.forward_takes_ctx(function))
            node.args = [ast.Name(id=name, ctx=ast.Load()), takes_ctx, *node.args]
            node.func = ast.copy_location(ast.Name(id=HELPER, ctx=ast.Load()), node.func)
            self.rewritten[function.__qualname__] = self.rewritten.get(function.__qualname__, 0) + 1
            count += 1
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in called:
                function = applied_function(sr.resolve(fn, node))
                if function is not None and self.facts_of(function).rewrite:
                    called.update(id(n) for n in ast.walk(node))
                    reasons.append(f"line {node.lineno}: {function.__qualname__}.apply is used other than called; "
                                   "call it where it is used")
        return count, reasons, helpers

    def left_alone(self) -> list[tuple[str, str]]:
        """``(Function, reason)`` for the Functions seen that Dynamo cannot trace but that are not rewritten."""
        found = []
        for function, facts in self.facts.items():
            if facts.untraced_ctx_calls and not facts.collectives:
                calls = ", ".join(f"ctx.{c}" for c in sorted(facts.untraced_ctx_calls))
                why = (f"autograd.Function calls {calls} (a graph break) but runs no collective: left alone (graphfix "
                       "rewrites such Functions only around collectives)")
                found.append((function.__qualname__, why))
            elif not facts.source:
                found.append((function.__qualname__, "autograd.Function whose forward has no source: not analysed"))
        return found

    def traced(self) -> list[str]:
        """Functions with a collective that Dynamo traces as they are."""
        return sorted(f.__qualname__ for f, facts in self.facts.items() if facts.collectives and not facts.rewrite)


def _helper_name(function: type, helpers: dict[str, object]) -> str:
    name = f"_graphfix_autograd_{function.__name__}"
    suffix = 0
    while helpers.get(name, function) is not function:
        suffix += 1
        name = f"_graphfix_autograd_{function.__name__}_{suffix}"
    return name
