"""``shard`` (a model in memory) and ``load_sharded`` (a checkpoint folder): a rank's tensor-parallel decoder.

Run one process per GPU under ``torchrun --nproc-per-node N``; every process calls the
same function and gets its own shard. ``shard`` copies the rank's slices out of a
single-device model (HF Llama/Mistral/Qwen2, Meta's reference ``Transformer`` at
model-parallel size 1, or a ``LlamaDecoder``): simple, but every process holds the whole
model first. A Meta ``Transformer`` cut by fairscale for the same N ranks holds exactly its
rank's shard already (the same layout), so its slices are copied as they are (the embedding
then vocabulary-parallel, as fairscale's is). ``load_sharded`` reads only the rank's slices from the files, which is what
a 70B model needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graphfix.engine.llama import DecoderConfig, LlamaDecoder
from graphfix.engine.tp.build import build_shard, meta_config
from graphfix.engine.tp.group import TPGroup, init_tp
from graphfix.engine.tp.readers import (
    DecoderSource,
    MappingSource,
    MetaSource,
    RankSliceSource,
    SafetensorsSource,
    hf_name,
)
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
        slices = meta_slices(model)
        cfg = DecoderConfig.from_meta_args(model.params,
                                           intermediate_size=model.layers[0].feed_forward.w1.weight.shape[0] * slices)
        if slices == 1:
            source = MappingSource(model.state_dict())
        else:  # fairscale model parallel at this tp: each rank's slices are its shard already
            check_model_parallel(slices, group)
            source, vocab_parallel_embedding = RankSliceSource(model.state_dict(), group.rank), True
        qkv_bias = o_bias = False
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


def meta_slices(model: nn.Module) -> int:
    """How many model-parallel slices Meta's ``model`` was cut into (1: it holds whole weights).

    Read from the shapes (query rows and embedding rows against ``params``), so a slicing this module cannot
    serve (uneven, or an embedding split along features as Llama 2's ``ParallelEmbedding`` did) is refused.
    """
    params = model.params
    q_rows = model.layers[0].attention.wq.weight.shape[0]
    slices = max(1, params.dim // max(1, q_rows))  # wq: (n_heads * head_dim, dim) = (dim, dim) split by rows
    embedding = tuple(model.tok_embeddings.weight.shape)
    if q_rows * slices != params.dim or embedding != (params.vocab_size // slices, params.dim):
        raise UnsupportedModelError(f"the Meta model holds slices graphfix does not read in memory (wq rows {q_rows} "
                                    f"of {params.dim}, embedding {embedding} of {(params.vocab_size, params.dim)})",
                                    hint="load its checkpoint folder with load_sharded, which re-shards it")
    return slices


def check_model_parallel(slices: int, group: TPGroup) -> None:
    """A model-parallel Meta model is served in place only on the ranks it was cut for, in fairscale's order."""
    import fairscale.nn.model_parallel.initialize as fs_init

    mp_rank = fs_init.get_model_parallel_rank() if fs_init.model_parallel_is_initialized() else None
    if slices != group.world_size or mp_rank != group.rank:
        raise UnsupportedModelError(f"the Meta model holds model-parallel slices for {slices} ranks (this one: "
                                    f"fairscale rank {mp_rank}), not this rank {group.rank} of tp={group.world_size}",
                                    hint=f"run it at tp={slices}, or load its checkpoint folder with load_sharded, "
                                         "which re-shards it at any tp")


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
