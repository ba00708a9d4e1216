"""Which of a model's code runs in a forward step, as opposed to everything its classes define.

``reachable.methods_by_function`` lists every user method of every module: on a
Hugging Face model that is ~280 functions, ``save_pretrained``, ``generate`` and
``resize_token_embeddings`` among them, full of logging that never runs inside a
compiled step. A pass about what happens *in* the step (side effects) must look
only at the step: each module's ``forward`` (or ``__call__``), the methods those
call on ``self`` (``self._update_mask(...)``), and the module-level helpers they
call, at any depth.
"""

from __future__ import annotations

import ast
import types

from torch import nn

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import source_rewrite as sr

StepFunction = tuple[types.FunctionType, str, list[tuple[str, nn.Module]]]
"""``(function, method name or "" for a helper, [(module path, module), ...])``."""

ENTRY_METHODS = frozenset({"forward", "__call__"})


def step_functions(model: nn.Module) -> list[StepFunction]:
    """The functions a forward step of ``model`` can run: module forwards, the methods and helpers they call.

    Helpers come with the instances of the first method found calling them. Functions
    without source are listed but not followed. Calls through attributes of other
    objects (``self.cache.update(...)``) are not followed: only ``self.<method>(...)``.
    """
    groups = reachable.methods_by_function(model)
    by_id = {id(group[0]): group for group in groups}
    methods_cache: dict[int, dict[str, types.FunctionType]] = {}

    def method_of(module: nn.Module, name: str) -> types.FunctionType | None:
        if id(module) not in methods_cache:
            methods_cache[id(module)] = dict(sr.user_methods(module))
        return methods_cache[id(module)].get(name)

    stack = [group for group in reversed(groups) if group[1] in ENTRY_METHODS]
    seen: set[int] = set()
    found: list[StepFunction] = []
    while stack:
        fn, name, instances = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        found.append((fn, name, instances))
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            continue
        receiver = tree.args.args[0].arg if name and tree.args.args else None
        for node in (n for stmt in tree.body for n in ast.walk(stmt)):  # decorators run at definition, not here
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if receiver and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id == receiver:
                for _, module in instances:
                    method = method_of(module, func.attr)
                    if method is not None and id(method) in by_id:
                        stack.append(by_id[id(method)])
            target = sr.resolve(fn, func)
            if reachable.user_function(target):
                stack.append((target, "", instances))
    return found
