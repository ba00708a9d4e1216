"""Draft models for speculative decoding: checks, and a target's own first layers as a draft.

A draft must speak the target's vocabulary (token ids are compared one for one) and have
its own static cache at least as large as the target's requests. ``truncated_draft`` builds
one from the target itself, the embedding, the first ``n_layers`` blocks, the final norm and
the LM head (shared parameters: no memory besides its cache). It is the cheapest draft there
is and the one the tests and the SmolLM2 benchmark use when no smaller sibling model exists
(a layer-skip, self-speculative draft).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from graphfix.engine.llama import LlamaDecoder
from graphfix.engine.protocol import StepModel
from graphfix.errors import InputError


def truncated_draft(target: LlamaDecoder, n_layers: int, max_batch_size: int | None = None,
                    max_seq_len: int | None = None) -> LlamaDecoder:
    """A ``LlamaDecoder`` running ``target``'s first ``n_layers`` layers, sharing their parameters, with its own cache.

    With ``n_layers`` equal to the target's depth it computes the target exactly (a perfect
    draft: every proposal is accepted under greedy decoding; the tests use it).
    """
    cfg = target.config
    if not 1 <= n_layers <= cfg.n_layers:
        raise InputError(f"a truncated draft needs 1 to {cfg.n_layers} layers, got {n_layers}")
    attn0 = target.layers[0].attention
    qkv_bias = (attn0.wqkv if attn0.fused else attn0.wq).bias is not None
    draft = LlamaDecoder(dataclasses.replace(cfg, n_layers=n_layers, sliding_windows=None if cfg.sliding_windows is None
                                             else cfg.sliding_windows[:n_layers]),
                         fuse=target.fused, qkv_bias=qkv_bias, o_bias=attn0.wo.bias is not None)
    draft.tok_embeddings = target.tok_embeddings
    draft.layers = nn.ModuleList(list(target.layers[:n_layers]))
    draft.norm, draft.output = target.norm, target.output
    draft = _own_caches(draft)
    # the target's decode-kernel settings (every ``decode_*`` attribute: the draft's one-token steps are decode steps)
    for name, value in vars(target).items():
        if name.startswith("decode_"):
            setattr(draft, name, value)
    return draft.eval().allocate(max_batch_size or target.max_batch_size, max_seq_len or target.max_seq_len)


def _own_caches(draft: LlamaDecoder) -> LlamaDecoder:
    """Shared blocks would share ``kv_cache`` attributes: give the draft shallow copies of its blocks and attentions."""
    import copy

    blocks = []
    for block in draft.layers:
        mine = copy.copy(block)
        mine._modules = dict(block._modules)
        mine.attention = copy.copy(block.attention)
        mine.attention._modules = dict(block.attention._modules)
        mine.attention.kv_cache = None
        blocks.append(mine)
    draft.layers = nn.ModuleList(blocks)
    return draft


def check_draft(target: StepModel, draft: StepModel) -> None:
    """Refuse a draft with another vocabulary than ``target``'s (its cache size is checked per request)."""
    vocab_t, vocab_d = _vocab(target), _vocab(draft)
    if vocab_t is not None and vocab_d is not None and vocab_t != vocab_d:
        raise InputError(f"the draft's vocabulary ({vocab_d}) differs from the target's ({vocab_t})",
                         hint="a draft must use the target's tokenizer")


def _vocab(model: StepModel) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)
