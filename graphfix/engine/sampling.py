"""Token sampling in tensor ops only: no host syncs, no RNG state, the same draws eager or compiled.

Modes (each compiles to its own graph, chosen on the host from ``SamplingParams``):

- ``greedy``: ``argmax(logits)`` (temperature 0);
- ``sample``: softmax of ``logits / temperature``, drawn by an exponential race;
- ``filtered``: as ``sample`` after top-k and/or top-p (nucleus) filtering, applied in
  Hugging Face's order (temperature, then top-k, then top-p on the renormalized rest).
  ``top_k`` and ``top_p`` are per-row tensors, so changing them never recompiles.

The draw is gpt-fast's exponential race, ``argmax(probs / q)`` with ``q ~ Exp(1)``:
it picks token ``i`` with probability ``probs[i]``. The noise is not taken from
torch's generators: it is a counter-based hash of ``(seed of the row, step, token
id)`` computed with 32-bit integer arithmetic in int64 tensors (every product stays
below 2**49, so nothing overflows). A request's seed therefore fixes its tokens on
any device and backend, inside CUDA graphs, with nothing to save or restore.
"""

from __future__ import annotations

import dataclasses

import torch

MODES = ("greedy", "sample", "filtered")
_M32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` 0/None and ``top_p`` 1.0/None are off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def mode(self) -> str:
        if self.temperature == 0:
            return "greedy"
        if (self.top_k or 0) > 0 or (self.top_p is not None and self.top_p < 1.0):
            return "filtered"
        return "sample"


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (16-bit halves of ``c``)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' ``lowbias32``) of int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(B, vocab)`` float32 uniforms in ``(0, 1)``, a function of ``(seeds[b], step, v)`` only."""
    row = hash32(hash32(seeds & _M32) ^ hash32((step + 0x9E3779B9) & _M32))
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = hash32((row.unsqueeze(-1) + idx * 0x9E37) & _M32)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` what top-k (``top_k[b]`` 0: off) then top-p (``top_p[b]`` 1.0: off) remove.

    Top-p keeps the smallest set of most likely tokens whose probability reaches
    ``top_p``: a token stays if the tokens ranked above it hold less than ``top_p``
    (the most likely token always stays). Ties are broken by ``torch.sort``.
    """
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
    keep = rank < k
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    above = probs.cumsum(-1) - probs
    keep = keep & ((above < top_p.unsqueeze(-1)) | (rank == 0))
    keep_vocab = torch.zeros_like(keep).scatter(-1, order, keep)
    return logits.masked_fill(~keep_vocab, float("-inf"))


def sample(logits: torch.Tensor, mode: str, seeds: torch.Tensor, step: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Next tokens ``(B,)`` from float ``logits`` ``(B, V)``; ``mode`` is static (one graph per mode)."""
    if mode == "greedy":
        return torch.argmax(logits, dim=-1)
    scaled = logits / temperature.unsqueeze(-1)
    if mode == "filtered":
        scaled = filter_logits(scaled, top_k, top_p)
    elif mode != "sample":
        raise ValueError(f"unknown sampling mode {mode!r}")
    probs = torch.softmax(scaled, dim=-1)
    q = -torch.log(uniform_noise(seeds, step, logits.shape[-1]))
    return torch.argmax(probs / q, dim=-1)
