"""Helpers the built-in passes share: module swaps and source-rewrite plumbing."""

from __future__ import annotations

import ast
import re
import types
from collections.abc import Callable, Iterator

from torch import nn

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import PassResult


def replace_submodule(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Put ``new`` where ``qualified_name`` (e.g. ``layers.0.attention``) is in ``root``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new  # keeps the position in ModuleList/Sequential; same as setattr for a named child


def layer_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module path, attention)`` of every layer of Meta's ``Transformer`` (``layers.{i}.attention``)."""
    return [(f"layers.{i}.attention", layer.attention) for i, layer in enumerate(model.layers)]


def as_meta_attention(root: nn.Module, qualified_name: str, module: nn.Module) -> nn.Module:
    """``module``, or, when it is Meta's own ``Attention``, the ``MetaAttention`` put in its place
    (its projections moved, not copied) for a pass to set its RoPE, attention or cache."""
    if ml.is_meta_attention(module):
        module = ml.MetaAttention.from_meta(module)
        replace_submodule(root, qualified_name, module)
    return module


def site(name: str) -> str:
    """A module path for reports: ``<root>`` for the top module."""
    return name or "<root>"


def no_match(result: PassResult, what: str) -> PassResult:
    """Record that nothing matched (zero matches are reported, never silent)."""
    if result.rewritten == 0 and not result.skipped:
        result.notes.append(f"no {what} found")
    return result


def methods_by_function(model: nn.Module) -> list[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]]:
    """User methods grouped by function object: ``(function, method name, [(module path, module), ...])``."""
    return reachable.methods_by_function(model)


def parsed_methods(model: nn.Module) -> Iterator[tuple[types.FunctionType, str, list[tuple[str, nn.Module]], ast.FunctionDef]]:
    """Every user method and every helper they call (``name`` ``""``), with its parsed tree; no source, left out."""
    for fn, name, instances in reachable.reachable_functions(model):
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            continue
        yield fn, name, instances, tree


def where(paths: list[str], method: str = "forward") -> str:
    """A report location for a method shared by modules at ``paths``: ``layers.*.attention`` style."""
    collapsed = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", p) for p in paths}) if len(paths) > 1 else paths
    text = ", ".join(site(p) for p in collapsed)
    return text if method in ("forward", "") else f"{text}.{method}"


Transform = reachable.Transform
MethodFilter = Callable[[types.FunctionType, str], bool]


def rewrite_methods(model: nn.Module, result: PassResult, transform: Transform,
                    methods: list[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]] | None = None, *,
                    select: MethodFilter | None = None) -> None:
    """Apply a source transform to every user method of ``model`` (or to ``methods``) and to the helpers they call.

    ``methods`` narrows the methods to start from, e.g. to those that run in a step
    (``graphfix.rewrite.step_code``); its helpers (method name ``""``) are reached through their callers.
    The transform runs once per function object (instances of one class share it);
    ``rewritten`` counts the sites in the source, not the instances. A helper that
    changes is reached through a rewritten copy of each caller (``graphfix.rewrite.reachable``).
    Grad-mode decorators are seen through (``graphfix.rewrite.grad_modes``); ``select(fn, name)``
    keeps only the methods it returns True for (with the helpers they call).
    """
    rewriter = reachable.ReachableRewriter(transform)
    setup_only = reachable.ReachableRewriter(transform, follow_callees=False)
    for fn, name, instances in methods_by_function(model) if methods is None else methods:
        if not name or (select is not None and not select(fn, name)):
            continue
        outcome = (rewriter if reachable.runs_in_step(name) else setup_only).rewrite(fn)
        loc = where([p for p, _ in instances], name)
        result.skipped.extend((loc, r) for r in outcome.reasons)
        if outcome.changed:
            for _, module in instances:
                sr.install_method(module, name, outcome.function, result.name)
            result.rewritten += outcome.sites
            if outcome.sites:
                result.notes.append(f"{loc}: {outcome.sites} site(s) rewritten in {fn.__qualname__} "
                                    f"({len(instances)} instance(s))")
    for helper, outcome in rewriter.helpers_seen:
        result.skipped.extend((helper_site(helper), r) for r in outcome.reasons)
        if outcome.sites:
            result.rewritten += outcome.sites
            result.notes.append(f"{helper_site(helper)}: {outcome.sites} site(s) rewritten in helper "
                                f"{helper.__qualname__} (its callers use the rewritten copy)")


def helper_site(fn: types.FunctionType) -> str:
    """A report location for a module-level helper: ``file.py:LINE helper``."""
    from graphfix.diagnose.findings import display_path

    return f"{display_path(fn.__code__.co_filename)}:{fn.__code__.co_firstlineno} {fn.__qualname__}"
