"""What the paired stand-in supports, and the functions the analysis recognises (by identity, not by name)."""

from __future__ import annotations

import ast

import torch

from graphfix.rewrite.blocks import paired_complex as pc

HELPER = "_graphfix_cx"
"""The name the rewritten code calls the block by (a closure cell holding ``paired_complex``)."""

TORCH_MAKERS = {id(torch.view_as_complex): "view_as_complex", id(torch.polar): "polar", id(torch.complex): "complex"}
TORCH_READERS = {id(torch.view_as_real): "view_as_real"}
OWN_MAKERS = {id(pc.view_as_complex): "view_as_complex", id(pc.polar): "polar", id(pc.complex): "complex"}
OWN_READERS = {id(pc.view_as_real): "view_as_real"}
OWN_ARITH = {id(f): f.__name__ for f in (pc.mul, pc.add, pc.sub, pc.truediv, pc.neg)}
"""The stand-in's functions, as a previous run of the pass left them in the code."""

_REAL_FFT_HELPERS = frozenset({"Tensor", "fftfreq", "rfftfreq", "fftshift", "ifftshift"})
SPECTRAL = frozenset(id(getattr(torch.fft, n)) for n in dir(torch.fft) if not n.startswith("_")
                     and n not in _REAL_FFT_HELPERS and callable(getattr(torch.fft, n))) | {id(torch.stft),
                                                                                           id(torch.istft)}
"""FFTs: they make (or read) complex tensors the stand-in does not cover."""
COMPLEX_DTYPES = (torch.complex32, torch.complex64, torch.complex128)
COMPLEX_TENSOR_METHODS = frozenset({"cfloat", "cdouble", "chalf"})

BINOPS = {ast.Mult: "mul", ast.Add: "add", ast.Sub: "sub", ast.Div: "truediv"}
"""Arithmetic on a complex value, by the stand-in function the rewrite calls (Dynamo cannot trace the operators
between a Python object and a tensor)."""

STRUCTURAL_METHODS = frozenset({"view", "reshape", "expand", "unsqueeze", "squeeze", "flatten", "transpose",
                                "permute", "contiguous", "clone", "detach", "conj"})
"""Methods of a complex value that give a complex value (views and copies)."""
SCALAR_METHODS = frozenset({"dim", "size", "numel", "is_complex"})
REAL_ATTRIBUTES = frozenset({"shape", "ndim", "device", "dtype", "real", "imag"})
"""Attributes of a complex value that are not complex."""
INFO_ATTRIBUTES = frozenset({"shape", "ndim", "device", "dtype"})
"""Attributes that are never complex, whatever the value is."""

NEUTRAL_BUILTINS = frozenset(id(f) for f in (len, isinstance, hasattr, id, type))
"""Builtins a complex value may be passed to (they read its type or length only)."""
CONCRETE_BUILTINS = frozenset(id(f) for f in (enumerate, zip, list, tuple, reversed))
"""Builtins the analysis evaluates on known containers (``enumerate(self.layers)``)."""
CONCRETE_METHODS = frozenset({"values", "items", "keys", "children", "modules", "named_children"})
"""Methods of ``nn.Module``/``dict`` containers evaluated likewise (``self.layers.values()``)."""


def maker_name(obj: object) -> str | None:
    """``view_as_complex``/``polar``/``complex``/``view_as_real`` for torch's function or the stand-in's."""
    key = id(obj)
    return TORCH_MAKERS.get(key) or TORCH_READERS.get(key) or OWN_MAKERS.get(key) or OWN_READERS.get(key)


def is_torch_maker(obj: object) -> bool:
    """torch's own complex maker or reader: the call the rewrite replaces."""
    return id(obj) in TORCH_MAKERS or id(obj) in TORCH_READERS


def op_text(op: ast.AST) -> str:
    return {ast.MatMult: "@", ast.Pow: "**", ast.Mod: "%", ast.FloorDiv: "//", ast.Div: "/", ast.Invert: "~",
            ast.Not: "not", ast.UAdd: "+", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
            ast.RShift: ">>"}.get(type(op), type(op).__name__)
