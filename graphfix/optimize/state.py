"""``OptimizedState``: what ``optimize`` leaves on the model (``model.graphfix_optimized``) for ``verify``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphfix.optimize.verification import Trace


@dataclasses.dataclass
class OptimizedState:
    """The reference run, the front door that was installed, and the compiled callables' counts."""

    model: nn.Module
    kind: str
    """``hf``, ``meta`` or ``generic`` (any other codebase)."""
    reference: Trace
    """The original's run in its own dtype."""
    dtype: torch.dtype
    max_seq_len: int
    backend: str | None = None
    driver: Any = None
    """The loop verification runs the model through (a user's loop or a recognised convention's); ``None``: the
    HF (``generate``) or Meta (``forward(tokens, start_pos)``) runner."""
    front: Any = None
    """The installed front door: an ``HFRuntime``, a ``MetaCompiled`` or a ``PhasedForward``."""
    disable: Callable[[], None] | None = None
    quantization: Any = None
    """``optimize(quantize=...)``: a ``quantized.QuantizationInfo`` (scheme, measured error, parity tolerance)."""
    warm_recompiles: int = 0
    """Recompiles counted once warm-up ended: only later ones are recompiles after warm-up."""
    high: Any = None
    """The high-precision run of the original (``graphfix.optimize.reference.HighPrecision``) parity measures
    against; ``None``: none was recorded (the fixed tolerance decides)."""
    parity_options: dict[str, float] = dataclasses.field(default_factory=dict)
    """``tolerance``, ``multiplier``, ``floor`` that ``optimize`` was given (``verify`` uses them by default)."""

    @property
    def compiled(self) -> bool:
        return self.front is not None and getattr(self.front, "compiled", True)

    def graphs(self) -> dict[str, int]:
        """Graphs compiled per callable (HF: per phase, over its variants)."""
        return dict(self.front.graphs()) if self.front is not None else {}

    def all_recompiles(self) -> int:
        """Graphs beyond the first of each compiled callable (the HF runtime: of each call signature's variant)."""
        own = getattr(self.front, "recompiles", None)
        if callable(own):
            return int(own())
        return sum(max(0, n - 1) for n in self.graphs().values())

    def recompiles(self) -> int:
        """Recompiles after warm-up."""
        return max(0, self.all_recompiles() - self.warm_recompiles)

    def graph_runs(self) -> int:
        """Compiled graphs (or, where they cannot be counted, compiled calls) run so far."""
        return int(self.front.graph_runs()) if self.front is not None else 0

    def new_variants_enforced(self) -> list[str]:
        return list(getattr(self.front, "new_variants_enforced", []))

    def eager_calls(self) -> dict[str, int]:
        return dict(getattr(self.front, "eager_calls", {}) or {})

    def uncompile(self) -> None:
        if self.disable is not None:
            self.disable()
        self.front, self.disable = None, None
