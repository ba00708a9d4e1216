"""Pass ``inference-mode``: ``torch.inference_mode()`` inside the step -> outside the compiled region, or ``no_grad``.

The root forward's own site (its decorator, or a ``with`` around its whole body) moves into an
eager wrapper that enters inference mode around the core (``model.graphfix_forward_core``); any
other ``inference_mode(True)`` decorator or ``with`` in the step (submodule forwards, the methods
they call, helpers at any depth) becomes ``torch.no_grad()``. ``passes._mode_sites`` says why.
"""

from __future__ import annotations

import torch
from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import inference_mode as im
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes import _mode_sites as ms
from passes._common import no_match, rewrite_methods, where


class InferenceModePass(Pass):
    name = "inference-mode"
    summary = ("torch.inference_mode() in the step -> the root forward's is entered by an eager wrapper around the "
               "compiled core; any other (submodules, helpers) becomes torch.no_grad()")
    fixes = frozenset({Category.INFERENCE_MODE})
    order = 60

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        cover = None
        if model.__dict__.get("graphfix_inference_mode") == "inside":
            # Meta's tensor core installed by static-kv-cache, still entering inference mode itself.
            model.graphfix_inference_mode = "outside"
            result.rewritten += 1
        elif model.__dict__.get("graphfix_inference_mode") != "outside":
            cover = ms.root_cover(model)
        selected = ms.step_methods(model)
        scan = ms.scan_step(model, selected)
        sites = ms.InferenceModeSites(cover, scan.enables_grad)
        rewrite_methods(model, result, sites, select=lambda fn, _name: id(fn) in selected)
        if cover is not None:
            self._move_root_outside(model, cover, sites, result)
        if result.rewritten and "graphfix_inference_mode" in model.__dict__:
            core = "graphfix_step" if ml.has_tensor_core(model) else "graphfix_forward_core"
            result.notes.append(f"inference mode is entered by forward, outside model.{core} (compile that, or "
                                "set model.graphfix_core_fn)")
        if sites.converted:
            result.notes.append(
                f"{sites.converted} torch.inference_mode() site(s) inside the step became torch.no_grad(): the same "
                "values and requires_grad; the tensors made there are no longer inference tensors")
        if scan.kept:
            result.notes.append(f"{scan.kept} no_grad/enable_grad/set_grad_enabled/inference_mode(False) use(s) left "
                                "in place: Dynamo compiles them")
        result.notes.extend(_outside_the_step(model, selected))
        return no_match(result, "torch.inference_mode() decorator or with block in the step")

    def _move_root_outside(self, model: nn.Module, cover: ms.RootCover, sites: ms.InferenceModeSites,
                           result: PassResult) -> None:
        installed = getattr(model.__dict__.get("forward"), "__func__", None)
        if sites.root_moved and self.name in getattr(installed, "__graphfix_passes__", ()):
            core = installed
        elif cover.how == "decorator" and cover.undecorated is not None:
            core = cover.undecorated  # the source could not be rewritten: the function under the decorator
            result.rewritten += 1
        else:
            why = "the `with torch.inference_mode():` around its body stays: forward could not be rewritten (see above)"
            result.skipped.append(("<root>", why))
            return
        im.move_outside(model, cover.mode, core)


def _outside_the_step(model: nn.Module, selected: set[int]) -> list[str]:
    """Notes for methods decorated with ``inference_mode`` that do not run in the step (``generate``): left alone."""
    notes = []
    for fn, name, instances in reachable.methods_by_function(model):
        layer: object = fn
        while id(fn) not in selected and (found := im.grad_mode_decorator_of(layer)) is not None:
            if isinstance(found[0], torch.inference_mode):
                notes.append(f"{where([p for p, _ in instances], name)}: @torch.inference_mode() outside the step, "
                             "left as is (it is entered before the compiled call)")
                break
            layer = found[1]
    return notes
