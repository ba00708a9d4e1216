"""Weight-only quantization schemes: the arithmetic of packing a weight and of reading it back.

Two schemes, both stored as integer codes plus small float tensors, row by row (one row
per output feature, ``N`` rows of ``K`` weights):

- ``int8``: symmetric, ``w = q * scale`` with ``q`` in ``[-127, 127]``; one scale per row
  (``group_size=None``, per output channel) or one per group of ``group_size`` weights
  along ``K`` (what GGUF's Q8_0 stores, with groups of 32). Codes: ``int8`` ``(N, K)``.
- ``int4``: affine per group, ``w = q * scale + zero`` with ``q`` in ``[0, 15]``; ``zero`` is the
  value of code 0 (the group's minimum when graphfix quantizes). This form holds GGUF's
  Q4_1 (``d * q + m``) and Q4_0 (``d * (q - 8)``: ``zero = -8 d``) exactly, so those files
  re-pack without a trip through bf16. Codes: two per byte, ``uint8`` ``(N, K // 2)``,
  weight ``2j`` in the low nibble of byte ``j`` and weight ``2j + 1`` in the high one, so a
  kernel that loads ``B`` bytes of a row holds ``2B`` consecutive weights.

Scales (and zeros) are float32 for per-channel int8 (``N`` numbers: their size does not
matter, their precision does) and float16 for groups (half the bytes of float32 beside
weights of half a byte; GGUF stores them in float16 too).
"""

from __future__ import annotations

import dataclasses

import torch

from graphfix.errors import InputError

SCHEMES = ("int8", "int4")
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 128


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """``bits`` 8 or 4; ``group_size`` ``None`` (int8 per output channel) or the weights per scale along ``K``."""

    bits: int
    group_size: int | None = None

    @property
    def name(self) -> str:
        base = f"int{self.bits}"
        return base if self.group_size is None else f"{base}:{self.group_size}"

    @property
    def has_zeros(self) -> bool:
        return self.bits == 4

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.group_size is None else torch.float16

    def groups(self, in_features: int) -> int:
        """Scales per row: 1 per channel, else ``K / group_size``."""
        return 1 if self.group_size is None else in_features // self.group_size

    def check(self, in_features: int) -> str | None:
        """Why a linear of ``in_features`` inputs cannot take this scheme (``None``: it can)."""
        if self.group_size is not None and in_features % self.group_size:
            return f"{in_features} inputs are not a multiple of the group size {self.group_size}"
        if self.bits == 4 and in_features % 2:
            return f"{in_features} inputs: int4 packs two weights a byte"
        return None

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_json(cls, data: dict) -> QuantScheme:
        return parse_scheme(f"int{data['bits']}", data.get("group_size"))


def parse_scheme(scheme: str | QuantScheme, group_size: int | None = None) -> QuantScheme:
    """``"int8"``, ``"int4"``, ``"int4:64"`` (or ``group_size=64``) -> ``QuantScheme``; int4 defaults to groups of 128."""
    if isinstance(scheme, QuantScheme):
        return scheme
    name, _, group = str(scheme).partition(":")
    if name not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}", hint="int8, int4, or int4:32 / int4:64 / int4:128")
    if group:
        if not group.isdigit():
            raise InputError(f"quantization scheme {scheme!r}: the group size after ':' is a number")
        if group_size is not None and int(group) != group_size:
            raise InputError(f"quantization scheme {scheme!r} and group_size={group_size} disagree")
        group_size = int(group)
    if name == "int4":
        group_size = group_size or DEFAULT_INT4_GROUP
        if group_size not in INT4_GROUPS:
            raise InputError(f"int4 group size {group_size}", hint=f"one of {', '.join(map(str, INT4_GROUPS))}")
    elif group_size is not None and (group_size < 2 or group_size % 2):
        raise InputError(f"int8 group size {group_size}: an even number, or none (one scale per output channel)")
    return QuantScheme(int(name[3:]), group_size)


@dataclasses.dataclass
class Packed:
    """One quantized weight: ``codes`` and ``scales`` (and ``zeros`` for int4), as described in the module docstring."""

    scheme: QuantScheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    n, k = w.shape
    return w.reshape(n, scheme.groups(k), -1)


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> Packed:
    """Pack a float weight ``(N, K)``; rounding uses the stored (rounded) scales, so reading back is consistent."""
    why = scheme.check(weight.shape[1])
    if why:
        raise InputError(f"cannot quantize a weight of shape {tuple(weight.shape)} to {scheme.name}: {why}")
    w = _grouped(weight.detach().float(), scheme)
    if scheme.bits == 8:
        scales = (w.abs().amax(-1) / 127).clamp_min(1e-12).to(scheme.scale_dtype)
        q = torch.round(w / scales.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return Packed(scheme, q.reshape(weight.shape), scales, None, weight.shape[1])
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-6).to(scheme.scale_dtype)
    zeros = lo.to(scheme.scale_dtype)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return Packed(scheme, pack_int4(q.reshape(weight.shape)), scales, zeros, weight.shape[1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``(..., K)`` in ``[0, 15]`` -> bytes ``(..., K // 2)``: even positions low nibble, odd high."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``(..., K // 2)`` -> codes ``(..., K)`` (``uint8``)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``(..., K)`` of packed rows (any leading dims: a linear's rows or gathered embedding rows).

    float32 arithmetic, one rounding to ``dtype`` at the end: the reference the kernels are checked against.
    """
    q = unpack_int4(codes) if bits == 4 else codes
    groups = scales.shape[-1]
    qf = q.float().reshape(*q.shape[:-1], groups, -1)
    w = qf * scales.float()[..., None]
    if zeros is not None:
        w = w + zeros.float()[..., None]
    return w.reshape(q.shape).to(dtype)


def dequantize_packed(p: Packed, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(p.codes, p.scales, p.zeros, p.scheme.bits, dtype)
