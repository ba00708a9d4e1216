"""Pass ``real-rope``: complex RoPE (``torch.polar`` tables, ``view_as_complex``) -> real cos/sin tables.

Two paths. Meta's ``Transformer`` (by class: its layers are swapped for ``MetaAttention``
with real tables in the checkpoint's layout). Any other model: the complex *construct*,
wherever it is (methods, the helpers they call, tables stored on modules), becomes the
paired-real form of ``graphfix.rewrite.blocks.paired_complex``; ``passes._complex_flow``
decides what can be rewritten without leaving a complex value half-converted.
"""

from __future__ import annotations

import ast

import torch
from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes import _complex_flow
from passes._common import as_meta_attention, layer_attentions, no_match, parsed_methods, rewrite_methods, site, where


class RealRopePass(Pass):
    name = "real-rope"
    summary = ("complex RoPE (torch.polar / view_as_complex / torch.complex, stored complex tables) -> real "
               "(cos, sin) pairs that Inductor fuses; Meta's Transformer -> real tables in its interleaved layout")
    fixes = frozenset({Category.COMPLEX_ROPE})
    order = 30

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if ml.is_meta_transformer(model):
            self._meta(model, result)
            _report_other_complex_rope(model, result)
        else:
            _pair_complex_values(model, result)
        return no_match(result, "complex RoPE graphfix can rewrite")

    def _meta(self, model: nn.Module, result: PassResult) -> None:
        attentions = layer_attentions(model)
        odd = [n for n, a in attentions if not (ml.is_meta_attention(a) or isinstance(a, ml.MetaAttention))]
        if odd:
            result.skipped.append((site(odd[0]), ("attention is not Meta's Attention: RoPE tables and every layer's "
                                   "attention must change together")))
            return
        if not model.freqs_cis.is_complex():  # already real
            return
        real = ml.real_freqs_table(model.params, end=model.freqs_cis.shape[0]).to(model.freqs_cis.device)
        same_shape = model.freqs_cis.shape == real.shape[:-1]
        diff = (torch.view_as_real(model.freqs_cis.to(torch.complex64)) - real).abs().max().item() if same_shape \
            else float("inf")
        if diff > 1e-6:
            result.skipped.append(("<root>", (f"freqs_cis does not match ModelArgs (max diff {diff:.2e}): the "
                                   "table was built with other parameters than model.params")))
            return
        for name, attn in attentions:
            attn = as_meta_attention(model, name, attn)
            attn.rope = "interleaved"
            result.rewritten += 1
        model.freqs_cis = real
        result.notes.append(f"freqs_cis is now a real (positions, head_dim/2, 2) float32 table of (cos, sin); "
                            f"interleaved layout, scaling={'llama3' if model.params.use_scaled_rope else 'none'}")


def _report_other_complex_rope(model: nn.Module, result: PassResult) -> None:
    complex_ops = {torch.view_as_complex, torch.polar}
    for fn, name, instances, tree in parsed_methods(model):
        module = instances[0][1]
        if isinstance(module, ml.MetaAttention):
            continue
        if any(isinstance(n, ast.Call) and sr.resolve(fn, n.func) in complex_ops for n in ast.walk(tree)):
            result.skipped.append((where([p for p, _ in instances], name),
                                   (f"{type(module).__qualname__}.{name} uses complex RoPE that graphfix "
                                   "has no matcher for: use graphfix.rewrite.blocks.rope.rope_tables + "
                                   "apply_rotary_interleaved (same layout as view_as_complex pairs)")))


def _pair_complex_values(model: nn.Module, result: PassResult) -> None:
    """Any codebase: complex values become ``PairedComplex`` where every use of them is supported."""
    plan = _complex_flow.analyse(model)
    result.skipped.extend(plan.skipped)
    shared: dict[int, tuple] = {}
    for path, owner, name in plan.storage:
        result.notes.append(f"{site(path)}: {pc.store_as_pairs(owner, name, shared)}")
        result.rewritten += 1
    for owner, name in plan.marks:
        pc.mark_paired(owner, name)
    rewrite_methods(model, result, plan.transform)
    if plan.storage:
        result.notes.append("complex tables are stored as real (..., 2) pairs: they move with the module's device, "
                            "keep float32 under dtype casts, and persistent ones are saved and loaded as the complex "
                            "tensors they were (same state-dict keys)")
    if result.rewritten == 0 and not result.skipped and plan.complex_sites:
        result.notes.append(f"{plan.complex_sites} complex construct(s) already in paired form: nothing to rewrite")
