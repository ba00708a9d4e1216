"""Pass ``inference-mode``: ``@torch.inference_mode()`` on forward -> entered around the compiled core."""

from __future__ import annotations

from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import inference_mode as im
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import no_match, site


class InferenceModePass(Pass):
    name = "inference-mode"
    summary = ("@torch.inference_mode() on the model's forward -> an eager wrapper enters inference mode and calls "
               "the undecorated forward (the part that is compiled)")
    fixes = frozenset({Category.INFERENCE_MODE})
    order = 60

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if model.__dict__.get("graphfix_inference_mode") == "inside":
            # Meta's tensor core installed by static-kv-cache, still entering inference mode itself.
            model.graphfix_inference_mode = "outside"
            result.rewritten += 1
        else:
            found = im.inference_mode_of(model.forward)
            if found is not None:
                mode, undecorated = found
                im.move_outside(model, mode, undecorated)
                result.rewritten += 1
        if result.rewritten:
            core = "graphfix_step" if ml.has_tensor_core(model) else "graphfix_forward_core"
            result.notes.append(f"inference mode is entered by forward, outside model.{core} (compile that, or "
                                "set model.graphfix_core_fn)")
        for name, module in model.named_modules():
            if module is not model and im.inference_mode_of(module.forward) is not None:
                result.skipped.append((site(name), ("@torch.inference_mode() on a submodule's forward is traced "
                                       "inside the parent's graph: remove it and enter inference mode around the "
                                       "model call")))
        return no_match(result, "@torch.inference_mode() forward")
