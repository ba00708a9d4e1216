"""Tensor names and RoPE layouts of the three formats, and Meta's model-parallel split axes.

Why the Q/K permutation exists: Meta's reference code applies RoPE to
*adjacent pairs* of a head's channels (it views them as complex numbers),
while Hugging Face's ``rotate_half`` pairs channel ``i`` with ``i + head_dim/2``.
The same model therefore needs its Q and K projection rows reordered inside
every head when moving between the two. The reorder is per head, so under
grouped-query attention K uses the KV head count and Q the query head count.
llama.cpp's GGUF stores Q/K in Meta's layout (its converter permutes HF
weights), so GGUF is undone with the same Meta-to-HF permutation that
``transformers`` applies in ``LlamaTensorProcessor._reverse_permute_weights``.
"""

from __future__ import annotations

import re

import torch

# ---------------------------------------------------------------- RoPE layout


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows from Meta's interleaved-pair layout to HF's rotate-half layout."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`meta_to_hf_rope`: HF rotate-half rows back to Meta's interleaved pairs."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rope_heads(hf_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """Head count to permute ``hf_name`` with, or None when the tensor needs no permutation."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return n_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return n_kv_heads
    return None


# ---------------------------------------------------------------- names

_LAYER_HF_TO_META = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
_LAYER_META_TO_HF = {v: k for k, v in _LAYER_HF_TO_META.items()}
_TOP_HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_TOP_META_TO_HF = {v: k for k, v in _TOP_HF_TO_META.items()}

_LAYER_GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def _map(name: str, top: dict[str, str], layer_re: re.Pattern[str], layer: dict[str, str], prefix: str) -> str | None:
    if name in top:
        return top[name]
    m = layer_re.match(name)
    if m and m.group(2) in layer:
        return f"{prefix}{m.group(1)}.{layer[m.group(2)]}"
    return None


def hf_to_meta_name(name: str) -> str | None:
    """Meta name for an HF tensor name, or None if Meta has no such tensor."""
    return _map(name, _TOP_HF_TO_META, _HF_LAYER, _LAYER_HF_TO_META, "layers.")


def meta_to_hf_name(name: str) -> str | None:
    """HF name for a Meta tensor name, or None if it is not a Llama weight."""
    return _map(name, _TOP_META_TO_HF, _META_LAYER, _LAYER_META_TO_HF, "model.layers.")


def gguf_to_hf_name(name: str) -> str | None:
    """HF name for a llama.cpp GGUF tensor name, or None if it is not a Llama weight."""
    return _map(name, _TOP_GGUF_TO_HF, _GGUF_LAYER, _LAYER_GGUF_TO_HF, "model.layers.")


# ---------------------------------------------------------------- model parallel

#: Meta tensors split along dim 0 (fairscale ColumnParallelLinear and, in
#: llama_models' Llama 3 code, VocabParallelEmbedding, which partitions the
#: vocabulary rows: see fairscale.nn.model_parallel.layers.VocabParallelEmbedding).
_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
           "feed_forward.w1.weight", "feed_forward.w3.weight")
#: split along dim 1 (RowParallelLinear: the input features are partitioned).
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def meta_split_dim(meta_name: str) -> int | None:
    """Axis Meta shards ``meta_name`` along across model-parallel ranks, None if replicated.

    ``tok_embeddings`` is reported as 0, the axis llama_models (Llama 3)
    writes; Llama 2's ``ParallelEmbedding`` used axis 1, which readers detect
    from the shard shapes instead of trusting this table.
    """
    if meta_name in ("tok_embeddings.weight", "output.weight") or meta_name.endswith(_COLUMN):
        return 0
    if meta_name.endswith(_ROW):
        return 1
    return None
