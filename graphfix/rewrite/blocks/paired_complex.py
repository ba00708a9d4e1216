"""Complex tensors held as real ``(..., 2)`` pairs, for code written with complex RoPE.

Inductor has no complex code generation: ``torch.polar``, ``view_as_complex``,
``view_as_real`` and the complex product run as unfused ATen fallbacks. The
``real-rope`` pass rewrites the calls that create or read complex values into the
functions below, which return a ``PairedComplex``: a plain Python object around a
real tensor whose last dimension holds (real, imag). It offers the small tensor
surface RoPE code uses (shape, views, indexing, ``*``), so the user's code runs
unchanged around it; Dynamo traces it as an ordinary object, so the compiled graph
holds real tensors only and Inductor generates fused code.

Dtypes follow torch's promotion: a complex64 value is a float32 pair, complex128 a
float64 one, and a complex value times a real tensor promotes as the pair would.

Complex tensors already stored on modules (a table computed in ``__init__``) are
converted once by ``store_as_pairs``: the attribute then holds the real pair, the
rewritten code reads it through ``stored`` and writes it through ``storable``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PAIRED_ATTRS = "_graphfix_paired_complex"
"""Module attribute: the names of the module's attributes that hold complex values as real pairs."""

_PYTHON_COMPLEX = complex  # the builtin: this module defines torch.complex's stand-in under the same name
_REAL_OF = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}
_COMPLEX_OF = {real: cx for cx, real in _REAL_OF.items()}


def _pair_dim(dim: int) -> int:
    """A dimension of the complex value as a dimension of the pair tensor (negative ones skip the pair dim)."""
    return dim - 1 if dim < 0 else dim


class PairedComplex:
    """A complex tensor as a real tensor ``pair`` of shape ``(*shape, 2)``: ``pair[..., 0]`` real, ``[..., 1]`` imag.

    Only the operations complex RoPE code uses are defined; anything else raises
    ``AttributeError``/``TypeError`` rather than computing something else.
    """

    __slots__ = ("pair",)

    def __init__(self, pair: torch.Tensor) -> None:
        self.pair = pair

    def __repr__(self) -> str:
        return f"PairedComplex(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.pair.device})"

    # -- what the value is ------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.pair.shape[:-1]

    @property
    def ndim(self) -> int:
        return self.pair.dim() - 1

    def dim(self) -> int:
        return self.pair.dim() - 1

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.pair.numel() // 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pair.device

    @property
    def dtype(self) -> torch.dtype:
        return _COMPLEX_OF.get(self.pair.dtype, torch.complex64)

    def is_complex(self) -> bool:
        return True

    @property
    def real(self) -> torch.Tensor:
        return self.pair[..., 0]

    @property
    def imag(self) -> torch.Tensor:
        return self.pair[..., 1]

    # -- views and copies: the pair dimension stays last ------------------------------------------------------
    def view(self, *shape: Any) -> PairedComplex:
        return PairedComplex(self.pair.view(*_shape_args(shape), 2))

    def reshape(self, *shape: Any) -> PairedComplex:
        return PairedComplex(self.pair.reshape(*_shape_args(shape), 2))

    def expand(self, *sizes: Any) -> PairedComplex:
        return PairedComplex(self.pair.expand(*_shape_args(sizes), 2))

    def __getitem__(self, index: Any) -> PairedComplex:
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, types.EllipsisType) for i in index):
            index = index + (slice(None),)  # the Ellipsis must not swallow the pair dimension
        return PairedComplex(self.pair[index])

    def unsqueeze(self, dim: int) -> PairedComplex:
        return PairedComplex(self.pair.unsqueeze(_pair_dim(dim)))

    def squeeze(self, dim: int | None = None) -> PairedComplex:
        if dim is None:  # the pair dimension has size 2: squeeze() never removes it
            return PairedComplex(self.pair.squeeze())
        return PairedComplex(self.pair.squeeze(_pair_dim(dim)))

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> PairedComplex:
        return PairedComplex(self.pair.flatten(_pair_dim(start_dim), _pair_dim(end_dim)))

    def transpose(self, dim0: int, dim1: int) -> PairedComplex:
        return PairedComplex(self.pair.transpose(_pair_dim(dim0), _pair_dim(dim1)))

    def permute(self, *dims: Any) -> PairedComplex:
        dims = _shape_args(dims)
        return PairedComplex(self.pair.permute(*[d % self.ndim for d in dims], self.ndim))

    def contiguous(self) -> PairedComplex:
        return PairedComplex(self.pair.contiguous())

    def clone(self) -> PairedComplex:
        return PairedComplex(self.pair.clone())

    def detach(self) -> PairedComplex:
        return PairedComplex(self.pair.detach())

    def to(self, *args: Any, **kwargs: Any) -> PairedComplex | torch.Tensor:
        """Device moves keep the pair; a complex dtype sets its precision; a real dtype keeps the real part, as torch
        does when it casts a complex tensor to a real dtype."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (torch.Tensor, PairedComplex)):
                dtype = arg.dtype
                rest.append(arg.device)
            else:
                rest.append(arg)
        pair = self.pair.to(*rest, **kwargs) if rest or kwargs else self.pair
        if dtype is None:
            return PairedComplex(pair)
        if dtype.is_complex:
            return PairedComplex(pair.to(_REAL_OF[dtype]))
        return pair[..., 0].to(dtype)

    def type_as(self, other: torch.Tensor | PairedComplex) -> PairedComplex | torch.Tensor:
        return self.to(other.dtype)

    def conj(self) -> PairedComplex:
        return PairedComplex(torch.stack((self.real, -self.imag), dim=-1))

    # -- arithmetic -------------------------------------------------------------------------------------------
    def __mul__(self, other: Any) -> PairedComplex:
        if isinstance(other, _PYTHON_COMPLEX):  # a Python constant such as 1j
            c, d = other.real, other.imag
        else:
            other_pair = _pair_of(other)
            if other_pair is None:  # real tensor or real number: scales both parts
                return PairedComplex(self.pair * _broadcast_real(other))
            c, d = other_pair[..., 0], other_pair[..., 1]
        a, b = self.pair[..., 0], self.pair[..., 1]
        return PairedComplex(torch.stack((a * c - b * d, a * d + b * c), dim=-1))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> PairedComplex:
        if _pair_of(other) is not None:
            raise TypeError("PairedComplex divides by real values only")
        return PairedComplex(self.pair / _broadcast_real(other))

    def __add__(self, other: Any) -> PairedComplex:
        if isinstance(other, _PYTHON_COMPLEX):
            return PairedComplex(torch.stack((self.real + other.real, self.imag + other.imag), dim=-1))
        other_pair = _pair_of(other)
        if other_pair is not None:
            return PairedComplex(self.pair + other_pair)
        real = self.real + other  # a real value adds to the real part
        return PairedComplex(torch.stack((real, self.imag.expand_as(real)), dim=-1))

    __radd__ = __add__

    def __neg__(self) -> PairedComplex:
        return PairedComplex(-self.pair)

    def __sub__(self, other: Any) -> PairedComplex:
        return self + (-other)

    def __rsub__(self, other: Any) -> PairedComplex:
        return (-self) + other


def _shape_args(shape: tuple) -> tuple:
    """``view(2, 3)`` and ``view((2, 3))`` alike."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(shape[0])
    return tuple(shape)


def _pair_of(value: Any) -> torch.Tensor | None:
    """The (real, imag) pair tensor of a complex operand; ``None`` for a real one."""
    if isinstance(value, PairedComplex):
        return value.pair
    if isinstance(value, torch.Tensor) and value.is_complex():
        return torch.view_as_real(value.resolve_conj())  # a complex tensor from code the pass did not rewrite
    return None


def _broadcast_real(value: Any) -> Any:
    """A real operand broadcast against the pair: tensors get a trailing dimension of 1."""
    return value.unsqueeze(-1) if isinstance(value, torch.Tensor) else value


# -- what the rewritten code calls in place of torch's complex functions ----------------------------------------
def view_as_complex(input: torch.Tensor) -> PairedComplex:
    """``torch.view_as_complex``: the last dimension (of size 2) becomes (real, imag)."""
    if input.shape[-1] != 2:
        raise RuntimeError("Tensor must have a last dimension of size 2")
    return PairedComplex(input)


def view_as_real(input: PairedComplex | torch.Tensor) -> torch.Tensor:
    """``torch.view_as_real``: the pair tensor (a complex tensor from unrewritten code is viewed as torch does)."""
    if isinstance(input, PairedComplex):
        return input.pair
    return torch.view_as_real(input)


def polar(abs: torch.Tensor, angle: torch.Tensor) -> PairedComplex:
    """``torch.polar``: ``abs * (cos(angle), sin(angle))``."""
    return PairedComplex(torch.stack((abs * torch.cos(angle), abs * torch.sin(angle)), dim=-1))


def complex(real: torch.Tensor, imag: torch.Tensor) -> PairedComplex:
    """``torch.complex``: pairs ``real`` and ``imag`` (broadcast against each other)."""
    real, imag = torch.broadcast_tensors(real, imag)
    return PairedComplex(torch.stack((real, imag), dim=-1))


# Dynamo (torch 2.13, measured) cannot trace `*`, `+`, `-`, `/` between a Python object and a tensor ("Failed to
# convert args/kwargs to proxy"), while it traces explicit method calls: the rewritten code calls these instead.
def mul(left: Any, right: Any) -> Any:
    """``left * right`` where either side may be a ``PairedComplex``."""
    if isinstance(left, PairedComplex):
        return left.__mul__(right)
    if isinstance(right, PairedComplex):
        return right.__rmul__(left)
    return left * right


def add(left: Any, right: Any) -> Any:
    """``left + right`` where either side may be a ``PairedComplex``."""
    if isinstance(left, PairedComplex):
        return left.__add__(right)
    if isinstance(right, PairedComplex):
        return right.__radd__(left)
    return left + right


def sub(left: Any, right: Any) -> Any:
    """``left - right`` where either side may be a ``PairedComplex``."""
    if isinstance(left, PairedComplex):
        return left.__sub__(right)
    if isinstance(right, PairedComplex):
        return right.__rsub__(left)
    return left - right


def truediv(left: Any, right: Any) -> Any:
    """``left / right``: a ``PairedComplex`` divided by a real value."""
    if isinstance(left, PairedComplex):
        return left.__truediv__(right)
    return left / right


def neg(value: Any) -> Any:
    """``-value``."""
    return value.__neg__() if isinstance(value, PairedComplex) else -value


def stored(value: Any) -> Any:
    """A read of an attribute that holds complex values as real pairs: the pair tensor becomes a ``PairedComplex``.

    ``None`` (a table not built yet) and ``PairedComplex`` values pass; a complex tensor put there by code the pass
    did not rewrite is paired.
    """
    if isinstance(value, torch.Tensor):
        return PairedComplex(torch.view_as_real(value.resolve_conj()) if value.is_complex() else value)
    return value


def storable(value: Any) -> Any:
    """A write to an attribute that holds complex values as real pairs: the value's pair tensor."""
    if isinstance(value, PairedComplex):
        return value.pair
    if isinstance(value, torch.Tensor) and value.is_complex():
        return torch.view_as_real(value.resolve_conj())
    return value


# -- complex tensors stored on modules ----------------------------------------------------------------------------
def store_as_pairs(module: nn.Module, name: str, memo: dict[int, tuple] | None = None) -> str:
    """Replace the complex tensor ``module.<name>`` (a buffer or a plain attribute) by its real pair; say what changed.

    The pair is a view of the complex tensor's memory (no copy); ``memo`` keeps one pair per tensor, so modules that
    shared a table still share it. A registered buffer keeps moving with the module's device, but never with a
    dtype cast (``model.half()`` leaves a complex buffer complex64: the pair stays float32 the same way; the
    ``model.to(torch.bfloat16)`` and ``to(torch.float64)`` that would drop a complex buffer's imaginary part leave
    the pair whole). A persistent buffer keeps its state-dict key and is saved as the complex tensor it was, and
    a checkpoint with the complex tensor (or with the pair) loads into it.
    """
    memo = {} if memo is None else memo
    value = getattr(module, name)
    if not (isinstance(value, torch.Tensor) and value.is_complex()) or isinstance(value, nn.Parameter):
        raise TypeError(f"{name} is not a complex tensor buffer or attribute")
    pair = memo.setdefault(id(value), (value, torch.view_as_real(value.detach().resolve_conj())))[1]  # keeps value
    mark_paired(module, name)
    if name in module._buffers:
        module._buffers[name] = pair
        _keep_pairs_float(module)
        if name not in module._non_persistent_buffers_set:
            _keep_checkpoints_complex(module)
        kind = "persistent buffer" if name not in module._non_persistent_buffers_set else "non-persistent buffer"
    else:
        object.__setattr__(module, name, pair)
        kind = "attribute"
    return f"{kind} {name} {tuple(value.shape)} {value.dtype} -> real pair {tuple(pair.shape)} {pair.dtype}"


class _PairedNames(set):
    """The names a module holds as pairs. Pickling refuses them: pickle rebuilds an instance's rewritten methods
    as its class's (a bound method pickles as ``getattr(obj, name)``), so a pickled model would run the original
    code on the converted tables. ``copy.deepcopy`` keeps the rewritten methods and works."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("graphfix real-rope: this model holds complex tables as real pairs that only its rewritten "
                        "methods read, and pickling drops rewritten methods; save model.state_dict() (it holds the "
                        "complex tables as they were) and apply the pass again after loading")

    def __copy__(self) -> _PairedNames:
        return _PairedNames(self)

    def __deepcopy__(self, memo: dict) -> _PairedNames:
        return _PairedNames(self)


def mark_paired(module: nn.Module, name: str) -> set[str]:
    """Record that ``module.<name>`` holds complex values as real pairs (``stored``/``storable`` around its uses)."""
    names = module.__dict__.get(PAIRED_ATTRS)
    if names is None:
        names = _PairedNames()
        object.__setattr__(module, PAIRED_ATTRS, names)
    names.add(name)
    return names


def paired_names(module: Any) -> frozenset[str]:
    """The attributes of ``module`` that hold complex values as real pairs."""
    return frozenset(getattr(module, "__dict__", {}).get(PAIRED_ATTRS, ()))


def _keep_pairs_float(module: nn.Module) -> None:
    """Make the module's pair buffers follow device moves but not dtype casts, as complex buffers do under half().

    ``nn.Module`` has no public hook for ``to``/``cuda``/``half``: this replaces the instance's ``_apply``
    (private, ``_apply(fn, recurse=True)`` unchanged from torch 2.0 to 2.14), which they all go through.
    """
    if not isinstance(module.__dict__.get("_apply"), _ApplyKeepingPairs):
        object.__setattr__(module, "_apply", _ApplyKeepingPairs(module))


class _ApplyKeepingPairs:
    """A module's ``_apply`` that moves its pair buffers to the new device and leaves their dtype.

    An object rather than a bound method, so a model holding it can be deep-copied and pickled.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        module = self.module
        names = [n for n in paired_names(module) if module._buffers.get(n) is not None]
        pairs = {n: module._buffers.pop(n) for n in names}
        try:
            result = type(module)._apply(module, fn, *args, **kwargs)
        finally:
            for name, pair in pairs.items():
                probe = fn(torch.empty(0, dtype=pair.dtype, device=pair.device))
                module._buffers[name] = fn(pair) if probe.dtype == pair.dtype else pair.to(probe.device)
        return result


def _keep_checkpoints_complex(module: nn.Module) -> None:
    if module.__dict__.get("_graphfix_paired_hooks"):
        return
    module.register_state_dict_post_hook(_save_pairs_as_complex)
    module.register_load_state_dict_pre_hook(_load_complex_as_pairs)
    object.__setattr__(module, "_graphfix_paired_hooks", True)


def _persistent_pairs(module: nn.Module) -> list[str]:
    return [n for n in sorted(paired_names(module))
            if n in module._buffers and n not in module._non_persistent_buffers_set]


def _save_pairs_as_complex(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in _persistent_pairs(module):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and not value.is_complex():
            state_dict[prefix + name] = torch.view_as_complex(value.contiguous())


def _load_complex_as_pairs(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    for name in _persistent_pairs(module):
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.is_complex():
            state_dict[prefix + name] = torch.view_as_real(value.resolve_conj())
