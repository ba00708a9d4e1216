"""graphfix's own Llama decoder: a ``StepModel`` built by moving a model's parameters.

``LlamaDecoder`` is the Llama family's forward pass (Llama 2/3, Mistral, Qwen2)
written for static decoding:

- embedding, RMSNorm (float32 statistics, cast back, then the weight: the Hugging
  Face and Meta order), SwiGLU MLP, tied or separate LM head;
- attention with real RoPE (``half`` layout for HF checkpoints, ``interleaved`` for
  Meta ones; default, ``linear`` and ``llama3`` scaling from ``graphfix.rewrite.blocks.rope``),
  SDPA over a per-row static KV cache (``RowKVCache``) with grouped-query heads
  folded into the query rows (no K/V head expansion), and a mask built from the
  positions (``k_pos <= q_pos``, and a sliding window where the config has one);
- optional fusion (``fuse=True``): q/k/v into one ``wqkv`` linear and gate/up into one
  ``w13`` linear. Fusing concatenates (a copy); ``from_hf`` fuses one layer at a time
  and releases the originals as it goes, so the peak is one layer above the model.

``graphfix.engine.loading.from_hf`` moves (never copies, except to fuse) the parameters
of a Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``;
``from_meta`` those of Meta's reference ``Transformer`` (world size 1, rewritten by the
passes or not). The linears stay ``nn.Linear`` modules, so weight-only quantization can
swap them later by ``(module, name)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.engine.attention_kernel import decode_attention
from graphfix.engine.decoder_config import CACHE_ALIGN, DecoderConfig, round_cache_len  # noqa: F401 - re-exported
from graphfix.engine.kernels import MAX_ROWS, fused_linear, pdl_supported
from graphfix.engine.rope_kernel import rope_cache
from graphfix.errors import InputError
from graphfix.rewrite.blocks.kv_cache import StaticKVCache
from graphfix.rewrite.blocks.rope import apply_rotary_half, apply_rotary_interleaved, rope_tables


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))``: statistics in float32, cast back to ``x.dtype`` before the weight."""

    def __init__(self, dim: int, eps: float, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class RowKVCache(StaticKVCache):
    """A ``StaticKVCache`` written at per-row positions: ``input_pos`` is ``(B, T)``.

    ``update_rows`` indexes the whole buffer (rows ``arange(B)``, slots ``input_pos``):
    one ``index_put_`` on a fixed-address buffer, which Inductor keeps in place.
    """

    def update_rows(self, input_pos: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``, ``v``: ``(B, T, n_kv_heads, head_dim)``; returns the first ``B`` rows' caches ``(B, KV, S, D)``."""
        bsz = k.shape[0]
        rows = torch.arange(bsz, device=input_pos.device).unsqueeze(1)
        self.k_cache[rows, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[rows, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:bsz], self.v_cache[:bsz]


def _meta_linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device="meta")


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, fuse: bool, window: int | None, bias: bool = False,
                 out_bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_layout = cfg.rope_layout
        self.window = window
        self.fused = fuse
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = (q_out, kv_out, kv_out)
        if fuse:
            self.wqkv = _meta_linear(cfg.dim, q_out + 2 * kv_out, bias)
        else:
            self.wq = _meta_linear(cfg.dim, q_out, bias)
            self.wk = _meta_linear(cfg.dim, kv_out, bias)
            self.wv = _meta_linear(cfg.dim, kv_out, bias)
        self.wo = _meta_linear(q_out, cfg.dim, out_bias)
        self.kv_cache: RowKVCache | None = None

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_layout == "half":
            return apply_rotary_half(x, cos, sin)
        return apply_rotary_interleaved(x, cos, sin)

    def rotate_and_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor,
                         kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q and k, write k and v into the cache: ``q`` ``(B, T, H, D)`` and the cache ``(B, KV, S, D)``."""
        bsz, seqlen, _ = q.shape
        q = self._rope(q.view(bsz, seqlen, self.n_heads, self.head_dim), cos, sin)
        k = self._rope(k.view(bsz, seqlen, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        keys, values = self.kv_cache.update_rows(input_pos, k, v)
        if kv_len is not None:  # a static prefix of the cache: the caller keeps every position below kv_len
            keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        return q, keys, values

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        if self.fused:
            q, k, v = self.wqkv(x).split(self.split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, keys, values = self.rotate_and_cache(q, k, v, input_pos, cos, sin, kv_len)
        # Grouped-query heads folded into query rows: query head h = j * n_rep + r uses KV head j,
        # so (B, T, KV, n_rep, D) -> (B, KV, n_rep * T, D) attends to (B, KV, S, D) without expanding K/V.
        n_rep = self.n_heads // self.n_kv_heads
        q = q.view(bsz, seqlen, self.n_kv_heads, n_rep, self.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(bsz, self.n_kv_heads, n_rep * seqlen, self.head_dim)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.view(bsz, self.n_kv_heads, n_rep, seqlen, self.head_dim).permute(0, 3, 1, 2, 4)
        return self.wo(y.reshape(bsz, seqlen, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig, fuse: bool) -> None:
        super().__init__()
        self.fused = fuse
        if fuse:
            self.w13 = _meta_linear(cfg.dim, 2 * cfg.intermediate_size, False)
        else:
            self.w1 = _meta_linear(cfg.dim, cfg.intermediate_size, False)
            self.w3 = _meta_linear(cfg.dim, cfg.intermediate_size, False)
        self.w2 = _meta_linear(cfg.intermediate_size, cfg.dim, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, fuse: bool, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg, fuse, cfg.window(layer), qkv_bias, o_bias)
        self.feed_forward = FeedForward(cfg, fuse)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, device="meta")
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device="meta")

    def forward(self, x, input_pos, cos, sin, mask, kv_len=None):
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode_fused(self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     kv_len: int | None = None, fuse_linears: bool = True, pdl: bool = False,
                     tables: tuple[torch.Tensor, torch.Tensor] | None = None, shared_row: bool = False) -> torch.Tensor:
        """One token per row with the decode kernels: the same arithmetic as ``forward``, in seven kernels.

        RMSNorm into the q/k/v and gate/up GEMVs, the residual adds into the o and down GEMVs,
        SiLU·mul into the down GEMV, RoPE and the cache write in one kernel, and split-KV
        attention with the mask taken from the positions (``graphfix.engine.kernels``,
        ``rope_kernel``, ``attention_kernel``; their eager references elsewhere than CUDA).
        Needs the fused ``wqkv``/``w13`` layout.
        ``fuse_linears=False``: only the attention kernel; norms, SiLU and adds stay separate.
        ``pdl``: the GEMVs, the RoPE kernel and attention use programmatic dependent launch.
        ``tables``: the whole RoPE tables, for the RoPE kernel (``cos``/``sin`` unused, ``None``);
        ``None`` leaves RoPE and the cache write to Inductor (``cos``/``sin``, gathered per step).
        ``shared_row`` (with ``tables``): the rows are consecutive tokens of one sequence, cache row 0
        (``LlamaDecoder.step`` at batch 1): each is written there at its position and attends to that row up
        to its position, so a row sees the rows before it, as the causal mask of ``forward`` lets it.
        """
        attn, ffn = self.attention, self.feed_forward
        bsz = x.shape[0]
        if not fuse_linears:  # the split-KV attention alone; the linears stay modules (GemvLinear, cuBLAS)
            q, k, v = attn.wqkv(self.attention_norm(x)).split(attn.split, dim=-1)
            q, keys, values = attn.rotate_and_cache(q, k, v, input_pos, cos, sin, kv_len)
            y = decode_attention(q.view(bsz, attn.n_heads, attn.head_dim), keys, values, input_pos[:, 0], attn.window)
            h = x + attn.wo(y.view(bsz, 1, -1))
            gate, up = ffn.w13(self.ffn_norm(h)).chunk(2, dim=-1)
            return h + ffn.w2(F.silu(gate) * up)
        qkv = _fused(attn.wqkv, x, norm_weight=self.attention_norm.weight, eps=self.attention_norm.eps, pdl=pdl)
        if tables is None:
            q, k, v = qkv.split(attn.split, dim=-1)
            q, keys, values = attn.rotate_and_cache(q, k, v, input_pos, cos, sin, kv_len)
        else:
            cache = attn.kv_cache
            q = rope_cache(qkv, input_pos[:, 0], *tables, cache.k_cache, cache.v_cache, attn.n_heads, attn.n_kv_heads,
                           attn.rope_layout == "interleaved", pdl, shared_row)
            if shared_row:  # every row reads cache row 0 (a stride-0 view, nothing copied)
                keys, values = (c[:1].expand(bsz, *c.shape[1:]) for c in (cache.k_cache, cache.v_cache))
            else:
                keys, values = cache.k_cache[:bsz], cache.v_cache[:bsz]
            if kv_len is not None:
                keys, values = keys[:, :, :kv_len], values[:, :, :kv_len]
        y = decode_attention(q.view(bsz, attn.n_heads, attn.head_dim), keys, values, input_pos[:, 0], attn.window,
                             pdl=pdl)
        h = _fused(attn.wo, y.view(bsz, 1, -1), residual=x, pdl=pdl)
        gate_up = _fused(ffn.w13, h, norm_weight=self.ffn_norm.weight, eps=self.ffn_norm.eps, pdl=pdl)
        return _fused(ffn.w2, gate_up, silu=True, residual=h, pdl=pdl)


def _fused(module: nn.Module, x: torch.Tensor, *, pdl: bool, **prologue: Any) -> torch.Tensor:
    """``fused_linear`` of a linear module: its own ``fused`` kernel where it has one (``graphfix.quant.QuantLinear``:
    the dequantizing GEMV), else the bf16 GEMV over its weight and bias.

    A tensor-parallel layer (``graphfix.engine.tp.layers``) runs its ``fused_forward``: this same call on its
    shard, then the collective (the all-reduce of ``wo``/``w2``, the gather of the LM head).
    """
    own = getattr(module, "fused_forward", None)
    if own is not None:
        return own(x, pdl=pdl, **prologue)
    if hasattr(module, "qweight"):
        return module.fused(x, pdl=pdl, **prologue)
    return fused_linear(x, module.weight, bias=module.bias, pdl=pdl, **prologue)


DEFAULT_KERNEL_ROWS = 16
"""Rows a step may have to take the decode kernels by default (``use_decode_kernels(max_rows=...)``): batched decode
steps, and at batch 1 verify steps of up to this many tokens."""


class LlamaDecoder(nn.Module):
    """A Llama-family decoder implementing ``StepModel`` (see ``graphfix.engine.protocol``).

    Build it with ``from_hf`` or ``from_meta``; the constructor makes the module tree on the
    meta device, and ``allocate`` creates the caches and RoPE tables once the weights are in.
    """

    per_row_positions = True
    supports_logits_index = True
    supports_kv_len = True
    supports_shared_rows = True

    def __init__(self, cfg: DecoderConfig, *, fuse: bool = True, qkv_bias: bool = False, o_bias: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.fused = fuse
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, device="meta")
        self.layers = nn.ModuleList(Block(cfg, i, fuse, qkv_bias, o_bias) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device="meta")
        self.output = _meta_linear(cfg.dim, cfg.vocab_size, False)
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.decode_kernels = False
        self.decode_pdl = False
        self.decode_rope = False
        self.decode_kernel_rows = 0

    def allocate(self, max_batch_size: int, max_seq_len: int) -> LlamaDecoder:
        """Allocate the KV caches (``max_seq_len`` rounded up to ``CACHE_ALIGN``) and the RoPE tables."""
        ref = self.norm.weight  # the model's dtype and device, whether or not the linears are quantized
        if ref.is_meta:
            raise InputError("allocate() needs the weights in place first (from_hf / from_meta)")
        device, dtype = ref.device, ref.dtype
        cfg = self.config
        seq = round_cache_len(max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, seq
        for layer in self.layers:
            layer.attention.kv_cache = RowKVCache(max_batch_size, seq, cfg.n_kv_heads, cfg.head_dim, dtype, device)
        cos, sin = rope_tables(cfg.head_dim, seq, cfg.rope_theta, cfg.rope_scaling, cfg.rope_layout, device)
        if cfg.rope_layout == "half":  # HF casts the tables to the activations' dtype before rotating
            cos, sin = cos.to(dtype), sin.to(dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("slot_index", torch.arange(seq, device=device), persistent=False)
        return self

    def reset(self) -> None:
        """Nothing to rewind: positions come with every call and stale slots are masked (no reallocation)."""

    def _mask(self, input_pos: torch.Tensor, window: int | None, dtype: torch.dtype,
              kv_len: int | None = None) -> torch.Tensor:
        """Additive ``(B, 1, n_rep * T, S)`` mask: 0 where ``k_pos <= q_pos`` (and inside the window), else -inf."""
        q_pos = input_pos.unsqueeze(-1)
        slots = self.slot_index if kv_len is None else self.slot_index[:kv_len]
        allowed = slots <= q_pos
        if window is not None:
            allowed = allowed & (slots > q_pos - window)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=input_pos.device).masked_fill(~allowed, float("-inf"))
        bsz, seqlen, slots = bias.shape
        n_rep = self.config.n_rep
        return bias[:, None, None].expand(bsz, 1, n_rep, seqlen, slots).reshape(bsz, 1, n_rep * seqlen, slots)

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor, logits_index: torch.Tensor | None = None,
             kv_len: int | None = None, shared_rows: bool = False) -> torch.Tensor:
        """Logits ``(B, T, V)`` (model dtype) of ``tokens`` at ``input_pos`` (both ``(B, T)``).

        ``logits_index`` (``(B,)``): return only that column per row, ``(B, 1, V)``.
        ``kv_len`` (a static int, one graph per value): attend to the first ``kv_len`` slots only;
        every position must be below it. Decode compiled per length bucket reads a short
        prefix of a long cache instead of all of it.
        ``shared_rows``: at batch 1, the tokens may run the decode kernels as rows of cache row 0
        (``kernels_serve``; a verify step of a few tokens costs about what a batched decode step does).
        """
        h = self.tok_embeddings(tokens)
        kernels = self.kernels_serve(tokens.shape[0], tokens.shape[1], shared_rows)
        fuse_linears = self.decode_kernels == "all"
        seq_len = tokens.shape[1]
        shared_row = kernels and seq_len > 1  # one sequence's tokens as rows of cache row 0 (kernels_serve)
        # PDL for one-row steps only: a batch-8 step of the rows kernels took 4.79 ms with it, 4.43 without (H200)
        pdl = self.decode_pdl and tokens.numel() == 1
        if shared_row:
            h, input_pos = h.view(seq_len, 1, -1), input_pos.view(seq_len, 1)
        masks: dict[int | None, torch.Tensor] = {}
        tables = cos = sin = None
        if kernels and self.decode_rope:  # the RoPE kernel indexes the whole tables itself
            tables = (self.rope_cos, self.rope_sin)
        else:
            cos, sin = self.rope_cos[input_pos].unsqueeze(2), self.rope_sin[input_pos].unsqueeze(2)
        for layer in self.layers:
            if kernels:
                h = layer.decode_fused(h, input_pos, cos, sin, kv_len, fuse_linears, pdl, tables, shared_row=shared_row)
                continue
            window = layer.attention.window
            if window not in masks:
                masks[window] = self._mask(input_pos, window, h.dtype, kv_len)
            h = layer(h, input_pos, cos, sin, masks[window], kv_len)
        if shared_row:
            h = h.view(1, seq_len, -1)
        if logits_index is not None:
            h = h.gather(1, logits_index.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))
        if kernels and fuse_linears:
            return _fused(self.output, h, norm_weight=self.norm.weight, eps=self.norm.eps, pdl=pdl)
        return self.output(self.norm(h))

    def kernels_serve(self, rows: int, tokens_per_row: int, shared_rows: bool = False) -> bool:
        """Whether a step of this shape runs the decode kernels: one token per row, up to ``decode_kernel_rows``
        rows; or, asked with ``shared_rows`` (a speculative verify step) at batch 1 with the fused kernels and the
        RoPE kernel, up to ``decode_kernel_rows`` tokens of the one sequence, as rows that share cache row 0.

        Longer prefills and larger batches are GEMMs, where cuBLAS and Inductor win.
        """
        if not self.decode_kernels:
            return False
        if tokens_per_row == 1:
            return rows <= self.decode_kernel_rows
        if not shared_rows:  # before any test of the length: a compiled prefill's is dynamic, and must get no guard
            return False
        return (rows == 1 and tokens_per_row <= self.decode_kernel_rows and self.decode_kernels == "all"
                and self.decode_rope)

    @property
    def compile_key(self) -> tuple:
        """What a traced ``step`` depends on besides its tensors' shapes: the decode-kernel setting.

        ``Generator`` keeps one set of compiled callables (each with a code object of its own) per
        value, so switching ``use_decode_kernels`` back and forth selects graphs compiled for that
        setting instead of recompiling (or failing a guard under ``fail_on_recompile``).
        """
        return (self.decode_kernels, self.decode_pdl, self.decode_rope, self.decode_kernel_rows)

    def use_decode_kernels(self, enabled: bool = True, fuse_linears: bool = True,
                           pdl: bool = True, rope_kernel: bool = True,
                           max_rows: int = DEFAULT_KERNEL_ROWS) -> LlamaDecoder:
        """Run decode steps of 1 to ``max_rows`` rows through ``Block.decode_fused`` (seven kernels a layer).

        Needs ``fuse=True``. ``max_rows`` (1 to ``kernels.MAX_ROWS``, default ``DEFAULT_KERNEL_ROWS``):
        steps of up to this many rows (a batch of one token each, or at batch 1 a speculative verify step's
        tokens, ``step(shared_rows=True)``) run the kernels. On an H200 (Llama-2-7B, one CUDA graph a step,
        docs/benchmarks.md, 2026-12-03) a batch-8 step took 4.43 ms (0.80 of the batch-1 rate per sequence;
        Inductor's compiled GEMMs gave about 0.78 in an earlier session) and a 5-token verify step 4.23 ms,
        1.18x a one-token step (1.92x on the standard path).

        ``fuse_linears=False``: the split-KV attention kernel only. Longer prefills and larger
        batches (GEMMs, where cuBLAS wins) keep the standard path (``kernels_serve``). A ``Generator``
        keys its compiled callables by ``compile_key``: a switch selects the other setting's graphs.
        ``pdl``: launch every kernel of the layer (GEMVs, RoPE, attention) with programmatic
        dependent launch where the device has it (sm_90+, ``kernels.pdl_supported``); elsewhere
        it has no effect. Same arithmetic; a step 3.734 -> 3.560 ms on an H200
        (``benchmarks/bench_step.py``, docs/benchmarks.md), so it is on by default, for one-row steps (``step``).
        ``rope_kernel``: RoPE and the cache write as one kernel (``rope_kernel.rope_cache``)
        instead of Inductor's three; with ``fuse_linears`` only.
        """
        if enabled and not self.fused:
            raise InputError("the decode kernels need the fused q/k/v and gate/up layout",
                             hint="build the decoder with fuse=True")
        self.decode_kernels: str | bool = ("all" if fuse_linears else "attention") if enabled else False
        self.decode_pdl = bool(enabled and fuse_linears and pdl and pdl_supported(self.norm.weight.device))
        self.decode_rope = bool(enabled and fuse_linears and rope_kernel)
        if not 1 <= max_rows <= MAX_ROWS:
            raise InputError(f"max_rows={max_rows}: the decode kernels serve 1 to {MAX_ROWS} rows")
        self.decode_kernel_rows = max_rows if enabled else 0  # off: one compile key whatever max_rows said
        return self

    forward = step

    def weight_bytes(self, read_per_token: bool = True) -> int:
        """Bytes of the parameters; ``read_per_token``: without the embedding table (a step reads B rows of it)."""
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        if read_per_token:  # packed (quantized) linears count their codes and scales, as parameters
            shared = {id(p) for p in self.output.parameters()}
            total -= sum(p.numel() * p.element_size() for p in self.tok_embeddings.parameters() if id(p) not in shared)
        return total

    def kv_bytes(self, batch: int, kv_len: int | None = None) -> int:
        """Bytes of K and V a step over ``batch`` rows reads: ``kv_len`` slots (default the whole cache)."""
        cfg = self.config
        slots = kv_len or self.max_seq_len
        itemsize = self.layers[0].attention.kv_cache.k_cache.element_size()
        return 2 * batch * cfg.n_kv_heads * slots * cfg.head_dim * itemsize * cfg.n_layers
