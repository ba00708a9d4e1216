"""Building a rank's ``LlamaDecoder``: the plan's slices read from a source, the communicating layers swapped in.

The result is an ordinary ``LlamaDecoder`` (so ``Generator``, ``use_decode_kernels``,
``use_triton_gemv`` and the benchmarks take it as they are) whose config is the rank's
shape (its heads, KV heads and MLP width) and whose ``wo``, ``w2``, LM head (and, if
asked, embedding) are the layers of ``tp.layers``. It carries ``tp`` (the ``TPGroup``) and
``shard_plan`` for the engine and the reports.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from graphfix.engine.llama import DecoderConfig, LlamaDecoder
from graphfix.engine.tp.group import TPGroup, main_print
from graphfix.engine.tp.layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from graphfix.engine.tp.plan import ShardPlan
from graphfix.engine.tp.readers import TensorSource, read_slice


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` around ``weight`` with no allocation of its own."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = _param(weight)
    return linear


def build_shard(source: TensorSource, full: DecoderConfig, tp: TPGroup, *, fuse: bool = True,
                qkv_bias: bool = False, o_bias: bool = False, dtype: torch.dtype | None = None,
                max_batch_size: int = 1, max_seq_len: int = 2048, vocab_parallel_embedding: bool = False,
                progress: bool = False) -> LlamaDecoder:
    """This rank's decoder over ``source``'s weights (Meta-named), placed on ``tp.device``."""
    plan = ShardPlan(full, tp.rank, tp.world_size, vocab_parallel_embedding)
    dec = LlamaDecoder(plan.local_config(), fuse=fuse, qkv_bias=qkv_bias, o_bias=o_bias)
    started = time.perf_counter()

    def get(name: str) -> torch.Tensor:
        return read_slice(source, name, plan.slice_for(name), dtype, tp.device)

    emb = get("tok_embeddings.weight")
    if vocab_parallel_embedding:
        table = nn.Embedding(emb.shape[0], emb.shape[1], device="meta")
        table.weight = _param(emb)
        dec.tok_embeddings = VocabParallelEmbedding(table, plan.vocab_start, tp)
    else:
        dec.tok_embeddings.weight = _param(emb)
    for i, block in enumerate(dec.layers):
        _fill_block(block, f"layers.{i}.", get, fuse, qkv_bias, o_bias, tp)
        if progress and (i + 1 == full.n_layers or (i + 1) % max(1, full.n_layers // 8) == 0):
            main_print(tp, f"graphfix tp={tp.world_size}: {i + 1}/{full.n_layers} layers loaded on each rank "
                           f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    dec.norm.weight = _param(get("norm.weight"))
    dec.output = VocabParallelHead(_linear(get("output.weight")), full.vocab_size, tp)
    dec.tp = tp
    dec.shard_plan = plan
    return dec.eval().allocate(max_batch_size, max_seq_len)


def _fill_block(block: nn.Module, prefix: str, get: Any, fuse: bool, qkv_bias: bool, o_bias: bool,
                tp: TPGroup) -> None:
    attn, ffn = block.attention, block.feed_forward
    names = ("wq", "wk", "wv")
    weights = [get(f"{prefix}attention.{n}.weight") for n in names]
    biases = [get(f"{prefix}attention.{n}.bias") for n in names] if qkv_bias else [None] * 3
    if fuse:
        attn.wqkv.weight = _param(torch.cat(weights))
        if qkv_bias:
            attn.wqkv.bias = _param(torch.cat(biases))
    else:
        for n, w, b in zip(names, weights, biases):
            getattr(attn, n).weight = _param(w)
            if b is not None:
                getattr(attn, n).bias = _param(b)
    del weights, biases
    out_bias = _param(get(f"{prefix}attention.wo.bias")) if o_bias else None
    attn.wo = RowParallelLinear(_linear(get(f"{prefix}attention.wo.weight")), out_bias, tp)
    gate, up = get(f"{prefix}feed_forward.w1.weight"), get(f"{prefix}feed_forward.w3.weight")
    if fuse:
        ffn.w13.weight = _param(torch.cat([gate, up]))
    else:
        ffn.w1.weight, ffn.w3.weight = _param(gate), _param(up)
    del gate, up
    ffn.w2 = RowParallelLinear(_linear(get(f"{prefix}feed_forward.w2.weight")), None, tp)
    block.attention_norm.weight = _param(get(f"{prefix}attention_norm.weight"))
    block.ffn_norm.weight = _param(get(f"{prefix}ffn_norm.weight"))


def meta_config(params: dict[str, Any], vocab_size: int, intermediate_size: int) -> DecoderConfig:
    """A ``DecoderConfig`` from Meta's ``params.json`` (the vocabulary and MLP width read from the weights)."""
    args = SimpleNamespace(vocab_size=vocab_size, dim=int(params["dim"]), n_layers=int(params["n_layers"]),
                           n_heads=int(params["n_heads"]), n_kv_heads=params.get("n_kv_heads"),
                           norm_eps=float(params.get("norm_eps", 1e-5)),
                           rope_theta=float(params.get("rope_theta", 10000.0)),
                           use_scaled_rope=bool(params.get("use_scaled_rope", False)))
    return DecoderConfig.from_meta_args(args, intermediate_size=intermediate_size)
