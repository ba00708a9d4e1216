"""Building a ``LlamaDecoder`` by moving a model's parameters into it: ``from_hf`` and ``from_meta``.

Parameters are moved, never copied (except to fuse q/k/v and gate/up, one layer at a
time): the source model is left holding meta-device placeholders, or, with ``share``,
keeps working on the same storage. Split from ``llama.py`` (the decoder itself) so that
each module has one job.
"""

from __future__ import annotations

import torch
from torch import nn

from graphfix.engine.llama import Block, DecoderConfig, LlamaDecoder
from graphfix.errors import UnsupportedModelError
from graphfix.quant import moving as quant_moving


def _take(module: nn.Module, name: str, share: bool) -> nn.Parameter | None:
    """``module.<name>`` as a Parameter; unless ``share``, leave a meta placeholder behind (the memory moves)."""
    p = getattr(module, name, None)
    if p is None:
        return None
    if not isinstance(p, nn.Parameter):
        p = nn.Parameter(p, requires_grad=False)
    p.requires_grad_(False)
    if not share:
        setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
    return p


def _put(target: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
    target.weight = weight
    if bias is not None:
        target.bias = bias


def _fuse_into(target: nn.Linear, sources: list[nn.Module], share: bool) -> None:
    """``target`` gets ``cat(source weights)`` (a copy). The sources then hold views of it (``share``) or nothing."""
    weights = [_take(s, "weight", True) for s in sources]
    biases = [_take(s, "bias", True) for s in sources]
    sizes = [w.shape[0] for w in weights]
    fused_w = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    fused_b = None
    if biases[0] is not None:
        fused_b = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    del weights, biases
    _put(target, fused_w, fused_b)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    for src, off, n in zip(sources, offsets, sizes):
        if share:  # the source keeps working, on a view of the fused storage (no extra memory)
            src.weight = nn.Parameter(fused_w.detach()[off:off + n], requires_grad=False)
            if fused_b is not None:
                src.bias = nn.Parameter(fused_b.detach()[off:off + n], requires_grad=False)
        else:
            src.weight = nn.Parameter(torch.empty(n, fused_w.shape[1], device="meta"), requires_grad=False)
            if fused_b is not None:
                src.bias = nn.Parameter(torch.empty(n, device="meta"), requires_grad=False)


def _move_linear(target: nn.Linear, source: nn.Module, share: bool) -> None:
    _put(target, _take(source, "weight", share), _take(source, "bias", share))


def _fuse(owner: nn.Module, name: str, sources: list[nn.Module], share: bool) -> None:
    """``owner.<name>`` gets the sources' rows: float weights concatenated, or quantized modules' packed rows."""
    if all(quant_moving.is_quant(s) for s in sources):
        setattr(owner, name, quant_moving.fuse(sources, share))
    else:
        _fuse_into(getattr(owner, name), sources, share)


def _move(owner: nn.Module, name: str, source: nn.Module, share: bool) -> None:
    if quant_moving.is_quant(source):  # graphfix.quantize ran on the source model: the module moves as it is
        setattr(owner, name, quant_moving.take(source, share))
    else:
        _move_linear(getattr(owner, name), source, share)


def _move_block(block: Block, q, k, v, o, gate, up, down, attn_norm, ffn_norm, share: bool) -> None:
    """Move one layer's projections (fused or not, as ``block`` was built) and norm weights into ``block``."""
    attn, ffn = block.attention, block.feed_forward
    if attn.fused:
        _fuse(attn, "wqkv", [q, k, v], share)
        _fuse(ffn, "w13", [gate, up], share)
    else:
        for owner, mine, theirs in ((attn, "wq", q), (attn, "wk", k), (attn, "wv", v), (ffn, "w1", gate),
                                    (ffn, "w3", up)):
            _move(owner, mine, theirs, share)
    _move(attn, "wo", o, share)
    _move(ffn, "w2", down, share)
    block.attention_norm.weight = _take(attn_norm, "weight", share)
    block.ffn_norm.weight = _take(ffn_norm, "weight", share)


def from_hf(model: nn.Module, max_batch_size: int = 1, max_seq_len: int | None = None, *, fuse: bool = True,
            share: bool = False) -> LlamaDecoder:
    """A ``LlamaDecoder`` holding ``model``'s parameters (HF ``LlamaForCausalLM``, Mistral, Qwen2).

    The parameters are moved: without ``share`` the HF model is left holding meta-device
    placeholders (unusable, no memory); with ``share`` it keeps working on the same
    storage (fused weights become views of the fused tensors), which is how the
    benchmark runs HF and graphfix on the same weights. ``max_seq_len`` defaults to
    the config's ``max_position_embeddings``; it is rounded up to ``CACHE_ALIGN``.
    """
    cfg = DecoderConfig.from_hf(model.config)
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__}: expected model.model.layers and model.lm_head")
    attn0 = inner.layers[0].self_attn
    dec = LlamaDecoder(cfg, fuse=fuse, qkv_bias=attn0.q_proj.bias is not None, o_bias=attn0.o_proj.bias is not None)
    tied = getattr(model.lm_head, "weight", None) is inner.embed_tokens.weight
    dec.tok_embeddings.weight = _take(inner.embed_tokens, "weight", share or tied)
    for block, hf in zip(dec.layers, inner.layers):
        a, m = hf.self_attn, hf.mlp
        _move_block(block, a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj,
                    hf.input_layernorm, hf.post_attention_layernorm, share)
    dec.norm.weight = _take(inner.norm, "weight", share)
    if tied:
        dec.output.weight = dec.tok_embeddings.weight
        if not share:
            placeholder = nn.Parameter(torch.empty_like(dec.output.weight, device="meta"), requires_grad=False)
            inner.embed_tokens.weight = placeholder
            model.lm_head.weight = placeholder
    else:
        _move(dec, "output", model.lm_head, share)
    seq = max_seq_len or getattr(model.config, "max_position_embeddings", 2048)
    return dec.eval().allocate(max_batch_size, seq)


def from_meta(model: nn.Module, max_batch_size: int | None = None, max_seq_len: int | None = None, *,
              fuse: bool = True, share: bool = False) -> LlamaDecoder:
    """A ``LlamaDecoder`` holding the parameters of Meta's ``Transformer`` (model parallel of size 1).

    Works on the original or on the model rewritten by the passes (the projections are
    the same modules either way). RoPE stays in Meta's interleaved layout.
    """
    params = model.params
    layers = list(model.layers)
    ffn0 = layers[0].feed_forward
    cfg = DecoderConfig.from_meta_args(params, intermediate_size=ffn0.w1.weight.shape[0])
    wq = layers[0].attention.wq.weight
    if tuple(wq.shape) != (cfg.n_heads * cfg.head_dim, cfg.dim) or \
            tuple(model.tok_embeddings.weight.shape) != (cfg.vocab_size, cfg.dim):
        raise UnsupportedModelError("the Meta model holds model-parallel shards; from_meta needs world size 1",
                                    hint="merge the shards with graphfix convert, or load at world size 1")
    dec = LlamaDecoder(cfg, fuse=fuse)
    dec.tok_embeddings.weight = _take(model.tok_embeddings, "weight", share)
    for block, meta in zip(dec.layers, layers):
        a, f = meta.attention, meta.feed_forward
        _move_block(block, a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2, meta.attention_norm, meta.ffn_norm, share)
    dec.norm.weight = _take(model.norm, "weight", share)
    _move(dec, "output", model.output, share)
    return dec.eval().allocate(max_batch_size or params.max_batch_size, max_seq_len or params.max_seq_len)
