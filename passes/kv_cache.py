"""Pass ``static-kv-cache``: KV caches that change shape or position every step -> preallocated static caches.

Two constructs are rewritten: Meta's ``Attention`` (slice-written ``cache_k``/``cache_v`` at an
int ``start_pos``; by structure, with the tensor-only core ``graphfix_step``), and, in any
module's code, a growing cache (``self.cache_k = torch.cat([self.cache_k, k], dim)`` read by
SDPA; ``passes._growing_cache``). Caches the caller owns (passed in and returned) and other
slice-written caches are reported.
"""

from __future__ import annotations

import ast

import torch
from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._cache_owners import already_static, find_owners, learn_shapes, report_list_caches, rewrite_owner
from passes._caller_cache import report_caller_owned
from passes._common import as_meta_attention, layer_attentions, no_match, parsed_methods, where

HF_NOTE = "HF caches are replaced by the runtime's StaticCache"


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


class StaticKVCachePass(Pass):
    name = "static-kv-cache"
    summary = ("Meta's cache_k/cache_v written at an int start_pos -> preallocated StaticKVCache written with "
               "index_copy_ at tensor positions, attention over the whole cache with a tensor-built mask; "
               "adds the tensor-only core model.graphfix_step(tokens, input_pos). Growing caches "
               "(self.cache_k = torch.cat([self.cache_k, k], dim) read by SDPA) in any module -> PreallocatedCache "
               "written at its device-tensor length")
    fixes = frozenset({Category.DYNAMIC_CACHE})
    order = 50

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        if _is_hf_model(model):
            result.notes.append(HF_NOTE)
            return result
        if ml.is_meta_transformer(model):
            self._meta(model, ctx, result)
        _growing_caches(model, ctx, result)
        report_caller_owned(model, result.skipped)
        report_list_caches(model, result.skipped)
        _report_other_caches(model, result)
        return no_match(result, "module-attribute KV cache graphfix can rewrite")

    def _meta(self, model: nn.Module, ctx: PassContext, result: PassResult) -> None:
        attentions = layer_attentions(model)
        kinds = [(n, a) for n, a in attentions
                 if ml.is_meta_attention(a) or (isinstance(a, ml.MetaAttention) and a.kv_cache is None)]
        if not kinds:  # already static
            return
        if len(kinds) != len(attentions):
            odd = next(n for n, a in attentions if all(a is not b for _, b in kinds))
            result.skipped.append((odd, ("attention module is neither Meta's Attention nor graphfix's: every layer "
                                   "must switch to tensor positions together")))
            return
        for name, attn in kinds:
            attn = as_meta_attention(model, name, attn)
            weight = attn.wq.weight
            attn.use_static_cache(ctx.dtype or weight.dtype, ctx.device or weight.device)
            result.rewritten += 1
        window = ctx.options.get("sliding_window")
        ml.install_tensor_core(model, window)
        cache = model.layers[0].attention.kv_cache.k_cache
        result.notes.append(
            f"StaticKVCache {tuple(cache.shape)} {cache.dtype} per layer (batch, kv_heads, max_seq_len, head_dim)"
            + (f", sliding window {window}" if window else "")
            + "; core: model.graphfix_step(tokens, input_pos)"
        )


def _growing_caches(model: nn.Module, ctx: PassContext, result: PassResult) -> None:
    """Rewrite every owner of a growing cache whose every use is proven, report the others (model unchanged)."""
    done = already_static(model)
    owners = find_owners(model)
    learn_shapes(owners, model, ctx)
    for owner in owners:
        if not owner.reasons:
            rewrite_owner(owner, ctx, result)
        result.skipped.extend(owner.reasons)
    if done and not owners:
        result.notes.append(f"{done} growing cache(s) already preallocated")


def _report_other_caches(model: nn.Module, result: PassResult) -> None:
    """Skip-report forwards that write a rank-4 tensor attribute by slice (a KV cache graphfix has no matcher for)."""
    for fn, name, instances, tree in parsed_methods(model):
        module = instances[0][1]
        if isinstance(module, ml.MetaAttention) or ml.is_meta_attention(module):
            continue
        written = sorted({t.value.attr for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                          if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute)
                          and isinstance(t.value.value, ast.Name) and t.value.value.id == "self"
                          and isinstance(getattr(module, t.value.attr, None), torch.Tensor)
                          and getattr(module, t.value.attr).dim() == 4})
        if written:
            attrs = ", ".join(f"self.{a}" for a in written)
            result.skipped.append((where([p for p, _ in instances], name),
                                   (f"{type(module).__qualname__}.{name} writes {attrs} by slice at "
                                   "Python-int positions (a recompile per position); graphfix rewrites only Meta's "
                                   "Attention: hold a graphfix.rewrite.blocks.kv_cache.StaticKVCache, call "
                                   "update(input_pos, k, v) with an int64 tensor input_pos, and mask with "
                                   "causal_mask(input_pos, max_seq_len)")))
