"""What a ``Generator`` call returns: ``GenerationResult``, and ``StreamChunk`` for ``stream`` callbacks.

Plain data, apart from the generator so that the speculative path and the front doors can
build and read results without importing the generator's compile machinery.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class StreamChunk:
    """What a ``stream`` callback receives: tokens ``start .. start + k - 1`` of every row.

    ``tokens`` is a CPU ``LongTensor[B, k]``; a finished row shows its EOS token once,
    then the pad token. ``finished[b]`` says whether row ``b`` has produced an EOS so far.
    """

    tokens: torch.Tensor
    start: int
    finished: list[bool]


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New tokens per row, up to and including the first EOS."""
    prompt_lengths: list[int]
    finished: list[bool]
    """Whether each row stopped at an EOS token."""
    steps: int
    """Tokens produced per row, the first (from prefill) included, before trimming at EOS."""
    ttft_s: float
    """Call to first token computed on the device (prefill and first sample)."""
    decode_s: float
    total_s: float
    """Wall time of the call, host synchronized at the end."""
    logits: torch.Tensor | None = None
    """``(steps, B, V)`` float32 on CPU, when asked for (``record_logits``)."""
    speculation: dict[str, Any] | None = None
    """Speculative requests only (``engine.speculative``): rounds (target steps), verify_steps, plain_steps (no-match
    fallback), tokens_per_step, tokens_per_verify_step, acceptance (accepted over proposals verified)."""

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second per row (``steps / total_s``)."""
        return self.steps / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * self.decode_s / (self.steps - 1) if self.steps > 1 else float("nan")
