"""Helpers the built-in passes share: module swaps and source-rewrite plumbing."""

from __future__ import annotations

import ast
import re
import types
from collections.abc import Callable, Iterator

from torch import nn

from graphfix.blocks import meta_llama as ml
from graphfix.blocks import source_rewrite as sr
from graphfix.pass_manager import PassResult


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


def user_methods_of(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, types.FunctionType]]:
    """``(module path, module, method name, function)`` for every user-defined method in ``model``."""
    for path, module in model.named_modules():
        for name, fn in sr.user_methods(module):
            yield path, module, name, fn


def methods_by_function(model: nn.Module) -> list[tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]]:
    """User methods grouped by function object: ``(function, method name, [(module path, module), ...])``."""
    groups: dict[int, tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]] = {}
    for path, module, name, fn in user_methods_of(model):
        groups.setdefault(id(fn), (fn, name, []))[2].append((path, module))
    return list(groups.values())


def parsed_methods(model: nn.Module) -> Iterator[tuple[types.FunctionType, str, list[tuple[str, nn.Module]], ast.FunctionDef]]:
    """``methods_by_function`` with each function's parsed tree; methods without source are left out."""
    for fn, name, instances in methods_by_function(model):
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            continue
        yield fn, name, instances, tree


def where(paths: list[str], method: str = "forward") -> str:
    """A report location for a method shared by modules at ``paths``: ``layers.*.attention`` style."""
    collapsed = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", p) for p in paths}) if len(paths) > 1 else paths
    text = ", ".join(site(p) for p in collapsed)
    return text if method == "forward" else f"{text}.{method}"


Transform = Callable[[types.FunctionType, ast.FunctionDef], tuple[int, list[str], dict]]
"""``(fn, tree) -> (sites rewritten in tree, reasons for sites left alone, helper names used)``; mutates tree."""


def rewrite_methods(model: nn.Module, result: PassResult, transform: Transform) -> None:
    """Apply a source transform to every user method of ``model``, installing the rewrite on each instance.

    The transform runs once per function object (instances of one class share it);
    ``rewritten`` counts the sites in the source, not the instances.
    """
    for fn, name, instances in methods_by_function(model):
        new, count, reasons = _rewrite_one(fn, transform)
        loc = where([p for p, _ in instances], name)
        result.skipped.extend((loc, r) for r in reasons)
        if new is not None:
            for _, module in instances:
                sr.install_method(module, name, new, result.name)
            result.rewritten += count
            result.notes.append(f"{loc}: {count} site(s) rewritten in {fn.__qualname__} "
                                f"({len(instances)} instance(s))")


def _rewrite_one(fn: types.FunctionType, transform: Transform) -> tuple[types.FunctionType | None, int, list[str]]:
    try:
        tree = sr.function_tree(fn)
    except sr.Unrewritable:
        return None, 0, []  # no source: nothing to scan (a C extension, a lambda, generated code)
    try:
        count, reasons, helpers = transform(fn, tree)
        if count == 0:
            return None, 0, reasons
        return sr.compile_function(fn, tree, helpers), count, reasons
    except sr.Unrewritable as exc:
        return None, 0, [str(exc)]
