"""Which passes a model needs: the ones its findings name, plus the ones a known structure always needs.

Shared by ``optimize`` (which applies them) and by the diagnosis's search for hidden breaks
(which applies them to a scratch copy to see what the first breaks hid).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from graphfix.diagnose.findings import Finding
from graphfix.rewrite.blocks import meta_llama
from graphfix.rewrite.pass_manager import PassContext, PassResult, available_passes

META_PASSES = ("functional-collectives", "real-rope", "sdpa-attention", "static-kv-cache", "inference-mode")
"""Passes that always run on Meta's ``Transformer`` (their breaks hide each other from diagnosis)."""


GENERIC_PASSES = ("real-rope", "sdpa-attention", "phase-split")
"""Passes every model outside the HF and Meta front doors gets: complex RoPE and manual attention (they cost speed,
not breaks, so no finding names them; each rewrites only what it matches and is verified) and the phase router."""


def plan_passes(model: nn.Module, findings: Iterable[Finding], extra: Sequence[str] = ()) -> list[str]:
    """Registered pass names, in registry order: those the findings name, ``extra``, the Meta set for Meta's
    ``Transformer``, the generic set for any other codebase's model."""
    registry = available_passes()
    wanted = {f.fix_pass for f in findings if f.fix_pass in registry} | {p for p in extra if p in registry}
    if meta_llama.is_meta_transformer(model):
        wanted |= {p for p in META_PASSES if p in registry}
    elif not _is_hf(model):
        wanted |= {p for p in GENERIC_PASSES if p in registry}
    return [p for p in registry if p in wanted]


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def apply_passes(model: nn.Module, names: Sequence[str], ctx: PassContext | None = None,
                 on_result: object = None) -> list[PassResult]:
    """Apply the named passes in order; ``on_result(result)`` is told each result as it comes."""
    registry = available_passes()
    ctx = ctx or PassContext()
    results = []
    for name in names:
        result = registry[name]().apply(model, ctx)
        if callable(on_result):
            on_result(result)
        results.append(result)
    return results
