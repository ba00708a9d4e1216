"""The model side of the generation engine: ``StepModel``.

A step model computes logits for a block of tokens at given positions over a
KV cache it owns. The cache is allocated once (``max_batch_size`` rows of
``max_seq_len`` slots) at fixed addresses, and nothing in ``step`` depends on a
Python int derived from the position: so one compiled decode graph serves every
position, and CUDA graphs can replay it.

Position contract (per row, no shared offsets):

- ``input_pos[b, t]`` is both the RoPE position of ``tokens[b, t]`` and the cache
  slot its key/value are written to;
- the query at ``input_pos[b, t]`` attends to the slots ``<= input_pos[b, t]`` of
  row ``b`` (and, with a sliding window, to the last ``window`` of them);
- the caller guarantees that every slot a query can see holds a token of that
  row's sequence. The engine (``Generator``) keeps each row's tokens at positions
  ``0 .. len-1``; padding goes to positions *above* a row's prompt, where decode
  overwrites it before any query can see it (docs/runtime.md).

So rows of different lengths need no pad-offset masks, and a row can be reused
for a new sequence without clearing it: ``reset`` has nothing to free or move.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class StepModel(Protocol):
    """What ``graphfix.engine.Generator`` drives.

    Optional attributes the engine looks for:

    - ``per_row_positions`` (default ``True``): ``False`` means all rows must share
      positions (e.g. Meta's ``graphfix_step``, which takes one ``(T,)`` position vector);
    - ``supports_logits_index`` (default ``False``): ``step`` takes a keyword
      ``logits_index`` (``LongTensor[B]``) and returns ``logits[B, 1, V]`` of only that
      column per row (prefill then skips the LM head for the other columns);
    - ``supports_kv_len`` (default ``False``): ``step`` takes a keyword ``kv_len`` (a static
      int): attend to the first ``kv_len`` cache slots only (decode length buckets);
    - ``supports_shared_rows`` (default ``False``): ``step`` takes a keyword ``shared_rows``: at batch 1 the
      tokens are consecutive positions of the one sequence that may run as rows of a batched decode step
      (a speculative verify step on ``LlamaDecoder``'s decode kernels);
    - ``compile_key`` (default ``None``): a hashable value naming what ``step`` traces besides
      its tensors (e.g. ``LlamaDecoder``'s decode-kernel setting). The engine compiles a separate
      set of callables per value, so a model switched between settings never recompiles.
    """

    max_batch_size: int
    max_seq_len: int

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """``tokens``, ``input_pos``: ``LongTensor[B, T]``; returns ``logits[B, T, V]``."""
        ...

    def reset(self) -> None:
        """Forget the current sequences. Never reallocates: cache addresses stay fixed."""
        ...


def per_row_positions(model: object) -> bool:
    return bool(getattr(model, "per_row_positions", True))


def supports_logits_index(model: object) -> bool:
    return bool(getattr(model, "supports_logits_index", False))


def supports_kv_len(model: object) -> bool:
    return bool(getattr(model, "supports_kv_len", False))


def supports_shared_rows(model: object) -> bool:
    return bool(getattr(model, "supports_shared_rows", False))


def compile_key(model: object) -> object:
    """The model's ``compile_key`` now (``None`` when it has none): the engine's compiled callables are keyed by it."""
    return getattr(model, "compile_key", None)
