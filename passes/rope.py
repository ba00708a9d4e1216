"""Pass ``real-rope``: complex RoPE (``torch.polar`` tables, ``view_as_complex``) -> real cos/sin tables."""

from __future__ import annotations

import ast

import torch
from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import as_meta_attention, layer_attentions, no_match, parsed_methods, site, where


class RealRopePass(Pass):
    name = "real-rope"
    summary = ("complex RoPE (torch.polar table, view_as_complex) -> real cos/sin tables in the checkpoint's "
               "interleaved layout, with the model's scaling (Llama 3 / linear)")
    fixes = frozenset({Category.COMPLEX_ROPE})
    order = 30

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if ml.is_meta_transformer(model):
            self._meta(model, result)
        _report_other_complex_rope(model, result)
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
