"""Pass ``phase-split``: prefill and decode calls routed to callables of their own, so neither recompiles the other.

Recompiles from a change *between calls* (the prompt length becoming one token, int64
positions in prefill and int32 in decode, normal tensors then inference tensors, an
integer module attribute that counts positions) are not constructs in one line of code
that a source rewrite could change: they come from one compiled forward serving calls of
different kinds. The fix is structural: the model's forward becomes a router that sends
each call, by the number of new tokens it carries, to a prefill or a decode callable,
each a copy of the forward with a code object (and so a Dynamo cache) of its own, with
the prompt length marked dynamic and integer module attributes made dynamic on their
first change (``graphfix.rewrite.blocks.phase_router``). Numerics are untouched: both
callables run the original code.
"""

from __future__ import annotations

from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import meta_llama
from graphfix.rewrite.blocks.phase_router import install_router, router_of
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import site


def _has_own_front_door(model: nn.Module) -> str | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return "a Hugging Face model: graphfix's HF runtime compiles prefill and decode apart"
    if meta_llama.is_meta_transformer(model):
        return "Meta's Transformer: its tensor core is compiled per phase (after the static-kv-cache pass)"
    return None


class PhaseSplitPass(Pass):
    name = "phase-split"
    summary = ("one forward serving prefill and decode calls -> a router to a prefill and a decode callable of their "
               "own (prompt length dynamic, integer module attributes dynamic on their first change)")
    fixes = frozenset({Category.INT_ATTRIBUTE, Category.DTYPE_RECOMPILE})
    order = 90

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        own = _has_own_front_door(model)
        if own is not None:
            result.notes.append(f"nothing to route: {own}")
            return result
        if router_of(model) is not None:
            result.notes.append("already routed per phase")
            return result
        router = install_router(model)
        result.rewritten = 1
        where = "model.graphfix_core_fn (the inference-mode wrapper's core)" if router.installed_as != "forward" \
            else f"{site('')}.forward"
        result.notes.append(f"{where}: prefill and decode calls routed to callables of their own")
        return result
