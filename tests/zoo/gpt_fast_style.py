"""A Llama written in the style of pytorch-labs gpt-fast (written here, not copied), with its ``generate`` loop.

What makes it gpt-fast: ``Transformer.setup_caches(max_batch_size, max_seq_length)``
creates one ``KVCache`` module per layer (static buffers written with
``k_cache[:, :, input_pos] = k``), a real RoPE table (cos and sin stacked in the last
dimension, interleaved pairs) and a boolean causal mask, both indexed by
``input_pos``; attention is SDPA with the KV heads repeated for GQA;
``forward(idx, input_pos)`` always goes through the cache. The loop prefills with
``input_pos = torch.arange(0, T)`` (int64), then decodes with
``input_pos = torch.tensor([T], dtype=torch.int)`` (int32) bumped in place with
``input_pos += 1``, greedy argmax.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.zoo._common import PROMPT, randomize_


@dataclass
class ModelArgs:
    block_size: int = 128
    vocab_size: int = 192
    n_layer: int = 2
    n_head: int = 4
    n_local_heads: int = 2
    dim: int = 48
    intermediate_size: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


def rope_table(seq_len: int, head_dim: int, base: float) -> Tensor:
    """``(seq_len, head_dim // 2, 2)``: cos and sin of every position's angle for each rotated pair."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate the interleaved pairs of ``x`` ``(B, T, H, D)`` by ``table`` ``(T, D // 2, 2)``."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos_sin = table.view(1, pairs.size(1), 1, pairs.size(3), 2)
    real = pairs[..., 0] * cos_sin[..., 0] - pairs[..., 1] * cos_sin[..., 1]
    imag = pairs[..., 1] * cos_sin[..., 0] + pairs[..., 0] * cos_sin[..., 1]
    return torch.stack([real, imag], dim=-1).flatten(3).type_as(x)


class KVCache(nn.Module):
    """Static key and value buffers ``(max_batch_size, n_heads, max_seq_length, head_dim)``, written in place."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: Tensor, k_val: Tensor, v_val: Tensor) -> tuple[Tensor, Tensor]:
        k_out, v_out = self.k_cache, self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_dim, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(bsz, seqlen, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), rope)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        repeats = self.n_head // self.n_local_heads
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, input_pos: Tensor, rope: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.rope: Tensor | None = None
        self.causal_mask: Tensor | None = None
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Per-layer static caches, the RoPE table and the causal mask; kept when they are already large enough."""
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        max_seq_length = (max_seq_length + 7) // 8 * 8  # buffers in multiples of 8 positions
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        dtype = self.output.weight.dtype
        for block in self.layers:
            block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_local_heads,
                                               self.config.head_dim, dtype)
        self.rope = rope_table(self.config.block_size, self.config.head_dim, self.config.rope_base)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        assert self.rope is not None, "call setup_caches first"
        mask = self.causal_mask[None, None, input_pos]
        rope = self.rope[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, input_pos, rope, mask)
        return self.output(self.norm(x))


def build(seed: int = 0) -> torch.nn.Module:
    """The tiny ``Transformer`` (width 48, 2 layers, 4 heads over 2 KV heads, vocab 192), weights from ``seed``."""
    torch.manual_seed(seed)
    return randomize_(Transformer(ModelArgs()), seed).eval()


def greedy(logits: Tensor) -> Tensor:
    """The next token of every sequence, ``(B, 1)``: the argmax of the last position's logits."""
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def prefill(model: nn.Module, x: Tensor, input_pos: Tensor) -> Tensor:
    return greedy(model(x, input_pos))


def decode_one_token(model: nn.Module, x: Tensor, input_pos: Tensor) -> Tensor:
    assert input_pos.shape[-1] == 1
    return greedy(model(x, input_pos))


def decode_n_tokens(model: nn.Module, cur_token: Tensor, input_pos: Tensor, num_new_tokens: int) -> list[Tensor]:
    new_tokens = []
    for _ in range(num_new_tokens):
        next_token = decode_one_token(model, cur_token, input_pos)
        input_pos += 1
        new_tokens.append(next_token.clone())
        cur_token = next_token.clone()
    return new_tokens


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int) -> Tensor:
    """The prompt followed by ``max_new_tokens`` greedy tokens, ``(B, T + max_new_tokens)``."""
    batch_size, prompt_len = prompt.shape
    model.setup_caches(max_batch_size=batch_size, max_seq_length=prompt_len + max_new_tokens)
    seq = torch.empty(batch_size, prompt_len + max_new_tokens, dtype=prompt.dtype)
    seq[:, :prompt_len] = prompt
    input_pos = torch.arange(0, prompt_len)
    next_token = prefill(model, prompt, input_pos).clone()
    seq[:, prompt_len] = next_token.squeeze(-1)
    input_pos = torch.tensor([prompt_len], dtype=torch.int)
    generated = decode_n_tokens(model, next_token, input_pos, max_new_tokens - 1)
    if generated:
        seq[:, prompt_len + 1:] = torch.cat(generated, dim=-1)
    return seq


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """``generate`` on ``PROMPT``: the prefill's token and ``steps`` decode tokens, ``(1, steps + 1)``."""
    return generate(model, PROMPT, steps + 1)[:, PROMPT.shape[1]:]


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One causal pass over the whole sequence at positions ``0..L-1`` (gpt-fast always goes through its cache)."""
    with torch.no_grad():
        model.setup_caches(max_batch_size=ids.shape[0], max_seq_length=ids.shape[1])
        return model(ids, torch.arange(ids.shape[1]))


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form: ``(build(), loop)``."""
    return build(), loop
