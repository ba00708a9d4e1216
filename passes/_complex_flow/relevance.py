"""Which code can touch complex values at all: a syntactic pre-pass that keeps the analysis small.

A Hugging Face model reaches hundreds of methods and helpers (saving, hub, generation
utilities); interpreting them all would cost seconds and find nothing. A function is
*relevant* when its source, or a helper it calls by name (any depth), has a complex construct:
torch's complex makers/readers or the stand-in's, a complex dtype, an FFT, a complex constant,
or an attribute name under which a module of the model holds a complex tensor (or pairs). A
module is relevant when one of its methods, or one of a submodule's, is: its methods may call
those submodules. The analysis follows a call only into relevant code, or when a complex value
is passed.
"""

from __future__ import annotations

import ast
import types

import torch
from torch import nn

from graphfix.rewrite import grad_modes, reachable
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._complex_flow import objects, surface


class Relevance:
    def __init__(self, model: nn.Module) -> None:
        self.complex_names = _complex_attribute_names(model)
        self._functions: dict[int, bool] = {}
        self._modules: dict[int, bool] = {}
        for module in model.modules():
            self._module(module)

    @property
    def any(self) -> bool:
        return any(self._modules.values())

    def module(self, module: object) -> bool:
        return self._modules.get(id(module), False)

    def function(self, fn: types.FunctionType) -> bool:
        """Whether ``fn`` or a helper it calls by name has a complex construct."""
        fn = grad_modes.without_grad_mode_decorators(fn)
        key = id(fn)
        if key not in self._functions:
            self._functions[key] = False  # a recursive call sees "not relevant" and stops
            nodes = list(objects.function_nodes(fn))
            self._functions[key] = self._has_construct(fn, nodes) or any(
                self.function(callee) for callee in _called_helpers(fn, nodes))
        return self._functions[key]

    def _module(self, module: nn.Module) -> bool:
        key = id(module)
        if key not in self._modules:
            own = any(self.function(fn) for _, fn in sr.user_methods(module))
            children = [self._module(child) for child in module.children()]  # every child gets its answer
            self._modules[key] = own or any(children)
        return self._modules[key]

    def _has_construct(self, fn: types.FunctionType, nodes: list[ast.AST]) -> bool:
        for node in nodes:
            if isinstance(node, ast.Constant) and isinstance(node.value, complex):
                return True
            if isinstance(node, ast.Attribute) and (node.attr in self.complex_names
                                                    or node.attr in surface.COMPLEX_TENSOR_METHODS):
                return True
            if isinstance(node, (ast.Name, ast.Attribute)):
                obj = sr.resolve(fn, node)
                if obj is sr.MISSING:
                    continue
                if surface.maker_name(obj) or id(obj) in surface.SPECTRAL or id(obj) in surface.OWN_ARITH \
                        or obj is pc or (isinstance(obj, torch.dtype) and obj in surface.COMPLEX_DTYPES):
                    return True
        return False


def _called_helpers(fn: types.FunctionType, nodes: list[ast.AST]) -> list[types.FunctionType]:
    found = []
    for node in nodes:
        if isinstance(node, ast.Call):
            target = sr.resolve(fn, node.func)
            if target is not sr.MISSING and reachable.user_function(target):
                found.append(target)
    return found


def _complex_attribute_names(model: nn.Module) -> frozenset[str]:
    """Names under which a module of ``model`` holds a complex tensor, or complex values as pairs."""
    names: set[str] = set()
    for module in model.modules():
        names |= pc.paired_names(module)
        for table in (vars(module), module._buffers, module._parameters):
            names |= {n for n, v in table.items() if isinstance(v, torch.Tensor) and v.is_complex()}
    return frozenset(names)
