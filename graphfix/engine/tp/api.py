"""``shard`` (a model in memory) and ``load_sharded`` (a checkpoint folder): a rank's tensor-parallel decoder.

Run one process per GPU under ``torchrun --nproc-per-node N``; every process calls the
same function and gets its own shard. ``shard`` copies the rank's slices out of a
single-device model (HF Llama/Mistral/Qwen2, Meta's reference ``Transformer`` at
model-parallel size 1, or a ``LlamaDecoder``): simple, but every process holds the whole
model first. ``load_sharded`` reads only the rank's slices from the files, which is what
a 70B model needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graphfix.engine.llama import DecoderConfig, LlamaDecoder
from graphfix.engine.tp.build import build_shard, meta_config
from graphfix.engine.tp.group import TPGroup, init_tp
from graphfix.engine.tp.readers import DecoderSource, MappingSource, MetaSource, SafetensorsSource, hf_name
from graphfix.errors import InputError, UnsupportedModelError


def _group(tp: TPGroup | int | None) -> TPGroup:
    return tp if isinstance(tp, TPGroup) else init_tp(tp)


def shard(model: nn.Module, tp: TPGroup | int | None = None, *, max_batch_size: int = 1,
          max_seq_len: int | None = None, fuse: bool = True, dtype: torch.dtype | None = None,
          vocab_parallel_embedding: bool = False) -> LlamaDecoder:
    """This rank's ``LlamaDecoder`` of ``model``, sharded over the ``tp`` group (``init_tp`` when not a ``TPGroup``).

    The slices are copies on ``tp.device``; ``model`` is left as it was (drop it to free its memory).
    """
    group = _group(tp)
    if isinstance(model, LlamaDecoder):
        if getattr(model, "tp", None) is not None:
            raise InputError("the decoder is sharded already")
        cfg, source = model.config, DecoderSource(model)
        attn = model.layers[0].attention
        qkv_bias = (attn.wqkv if model.fused else attn.wq).bias is not None
        o_bias = attn.wo.bias is not None
        seq, ref = max_seq_len or model.max_seq_len, model.tok_embeddings.weight
    elif hasattr(model, "params") and hasattr(model, "tok_embeddings"):  # Meta's reference Transformer
        layers = list(model.layers)
        cfg = DecoderConfig.from_meta_args(model.params, intermediate_size=layers[0].feed_forward.w1.weight.shape[0])
        if tuple(layers[0].attention.wq.weight.shape) != (cfg.n_heads * cfg.head_dim, cfg.dim):
            raise UnsupportedModelError("the Meta model holds model-parallel shards already",
                                        hint="load its checkpoint folder with load_sharded, which re-shards it")
        source, qkv_bias, o_bias = MappingSource(model.state_dict()), False, False
        seq, ref = max_seq_len or model.params.max_seq_len, model.tok_embeddings.weight
    else:
        cfg = DecoderConfig.from_hf(model.config)
        inner = model.model
        attn = inner.layers[0].self_attn
        tied = model.lm_head.weight is inner.embed_tokens.weight
        source = MappingSource(model.state_dict(), hf_name, tied=tied)
        qkv_bias, o_bias = attn.q_proj.bias is not None, attn.o_proj.bias is not None
        seq = max_seq_len or getattr(model.config, "max_position_embeddings", 2048)
        ref = inner.embed_tokens.weight
    return build_shard(source, cfg, group, fuse=fuse, qkv_bias=qkv_bias, o_bias=o_bias, dtype=dtype or ref.dtype,
                       max_batch_size=max_batch_size, max_seq_len=seq,
                       vocab_parallel_embedding=vocab_parallel_embedding)


def load_sharded(path: str | Path, tp: TPGroup | int | None = None, *, max_batch_size: int = 1,
                 max_seq_len: int = 2048, fuse: bool = True, dtype: torch.dtype | None = None,
                 vocab_parallel_embedding: bool = False, progress: bool = True) -> LlamaDecoder:
    """This rank's decoder read straight from an HF safetensors folder or a Meta checkpoint folder.

    Each rank reads only its slices (``readers``); a Meta checkpoint cut for N ranks loads at
    any tp. ``dtype`` defaults to the files' own. Rank 0 prints progress to stderr.
    """
    group = _group(tp)
    folder = Path(path)
    if (folder / "params.json").exists():
        source = MetaSource(folder)
        cfg = meta_config(source.shards.params, source.shape("tok_embeddings.weight")[0],
                          source.shape("layers.0.feed_forward.w1.weight")[0])
    elif (folder / "config.json").exists():
        from transformers import AutoConfig

        cfg = DecoderConfig.from_hf(AutoConfig.from_pretrained(folder))
        source = SafetensorsSource(folder)
    else:
        raise InputError(f"{folder}: neither an HF folder (config.json) nor a Meta one (params.json)")
    return build_shard(source, cfg, group, fuse=fuse, qkv_bias=source.has("layers.0.attention.wq.bias"),
                       o_bias=source.has("layers.0.attention.wo.bias"), dtype=dtype, max_batch_size=max_batch_size,
                       max_seq_len=max_seq_len, vocab_parallel_embedding=vocab_parallel_embedding, progress=progress)
