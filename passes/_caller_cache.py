"""Caches the caller owns: passed into forward and handed back, so the calling loop holds them.

IBM fms passes ``past_key_value_state`` (a tuple) into each attention and returns the grown
one; Hugging Face-style code passes a cache object whose ``update(k, v, layer)`` returns the
keys and values so far. The construct, whatever the names: an optional argument (default
``None``) that is concatenated onto (``torch.cat([arg..., x])``) or updated
(``arg.update(k, v, ...)``). The model alone cannot make such a cache static (the caller's
loop reads what forward returns), so it is reported, never rewritten.
"""

from __future__ import annotations

import ast
import types

import torch
from torch import nn

from graphfix.diagnose.findings import display_path
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._common import helper_site, parsed_methods, where

_CATS = (torch.cat, torch.concat, torch.concatenate)


def _optional_params(tree: ast.FunctionDef) -> set[str]:
    args = tree.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    return {name for name, d in defaults.items() if isinstance(d, ast.Constant) and d.value is None}


def _root(node: ast.AST) -> str | None:
    """The name an expression like ``past[0]``, ``cache.k`` or ``past`` starts from."""
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _unpacked_from(tree: ast.FunctionDef, optional: set[str]) -> dict[str, str]:
    """Locals unpacked or indexed out of the optional arguments (``past_key, past_value = layer_past``),
    mapped to the argument they come from; the arguments map to themselves."""
    origin = {name: name for name in optional}
    for _ in range(2):  # a second round catches aliases of aliases
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _root(node.value) in origin:
                for target in node.targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            origin.setdefault(sub.id, origin[_root(node.value)])
    return origin


def _grown_argument(fn: types.FunctionType, node: ast.AST, origin: dict[str, str]) -> str | None:
    """The optional argument ``node`` grows: ``torch.cat([arg..., x])`` or ``arg.update(k, v, ...)``."""
    if not isinstance(node, ast.Call):
        return None
    if any(sr.is_call_to(fn, node, c) for c in _CATS) and node.args:
        tensors = node.args[0]
        if isinstance(tensors, (ast.List, ast.Tuple)) and len(tensors.elts) == 2:
            return origin.get(_root(tensors.elts[0]))
    if isinstance(node.func, ast.Attribute) and node.func.attr == "update" and len(node.args) >= 2:
        return origin.get(_root(node.func.value))
    return None


def report_caller_owned(model: nn.Module, skipped: list[tuple[str, str]]) -> None:
    """Add one skip per function that grows a cache it was handed (first site, with file:line)."""
    for fn, name, instances, tree in parsed_methods(model):
        if name == "__init__":
            continue
        optional = _optional_params(tree)
        if not optional:
            continue
        origin = _unpacked_from(tree, optional)
        for node in ast.walk(tree):
            argument = _grown_argument(fn, node, origin)
            if argument is None:
                continue
            how = "updated" if isinstance(node.func, ast.Attribute) and node.func.attr == "update" else \
                "grown by torch.cat"
            site = where([p for p, _ in instances], name) if name else helper_site(fn)
            skipped.append((site, (
                f"caller-owned cache: `{argument}` is passed in and {how} at "
                f"{display_path(fn.__code__.co_filename)}:{node.lineno} (`{ast.unparse(node)[:60]}`); the caller's "
                "loop keeps what forward returns, so graphfix leaves it alone: compiled with a dynamic cache length "
                "instead")))
            break
