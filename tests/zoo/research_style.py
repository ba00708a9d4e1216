"""A single-file research-style Llama that carries, on purpose, every construct graphfix's passes must rewrite.

Written the way research code is: the position is an integer attribute of the model
(``forward(tokens)`` only), the KV cache grows by ``torch.cat`` in attention attributes,
RoPE is complex (Meta's interleaved layout), attention is hand-written with ``einsum``,
the collectives are fairscale-style, and the step prints, logs and warns. Each
construct sits on a line marked ``# construct: NAME`` (on the line itself or the
comment line just above it); ``construct_lines()`` lists them for the tests.

The loop: ``model.reset()`` (empty caches, position 0), ``model(prompt)``, then
``model(next_token)`` per step, greedy argmax.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tests.zoo._common import PROMPT, randomize_


@dataclass
class Args:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 256
    hidden_dim: int = 160
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def ensure_process_group() -> None:
    """A world-size-1 gloo group (in-memory store, no port) for the collectives below."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # construct: complex-rope


def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    # construct: complex-rope
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs).flatten(3)  # construct: complex-rope
    xk_out = torch.view_as_real(xk_ * freqs).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``(B, n_kv_heads, S, D)`` -> ``(B, n_kv_heads * n_rep, S, D)``, each KV head repeated for its query heads."""
    if n_rep == 1:
        return x
    bsz, n_kv_heads, seqlen, head_dim = x.shape
    return x[:, :, None].expand(bsz, n_kv_heads, n_rep, seqlen, head_dim).reshape(bsz, -1, seqlen, head_dim)


class ReduceFromParallelRegion(torch.autograd.Function):
    """fairscale-style: sum a row-parallel output over the model-parallel group, in place."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        dist.all_reduce(x)  # construct: autograd-collective
        ctx.mark_dirty(x)  # construct: autograd-collective
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, args: Args) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = None  # construct: growing-cache
        self.cache_v = None

    def reset_cache(self) -> None:
        self.cache_k = None  # construct: growing-cache
        self.cache_v = None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        self.cache_k = k if self.cache_k is None else torch.cat([self.cache_k, k], dim=2)  # construct: growing-cache
        self.cache_v = v if self.cache_v is None else torch.cat([self.cache_v, v], dim=2)  # construct: growing-cache
        keys = repeat_kv(self.cache_k, self.n_heads // self.n_kv_heads)  # construct: manual-attention
        values = repeat_kv(self.cache_v, self.n_heads // self.n_kv_heads)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, keys) / math.sqrt(self.head_dim)  # construct: manual-attention
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # construct: manual-attention
        probs = F.softmax(scores.float(), dim=-1).type_as(q)  # construct: manual-attention
        out = torch.einsum("bhqk,bhkd->bhqd", probs, values)  # construct: manual-attention
        out = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        return ReduceFromParallelRegion.apply(out)  # construct: autograd-collective


class FeedForward(nn.Module):
    def __init__(self, args: Args) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)

    @torch.inference_mode()  # construct: inference-mode
    def forward(self, x: Tensor) -> Tensor:
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        work = dist.all_reduce(out, async_op=True)  # construct: async-collective
        work.wait()  # construct: async-collective
        return out


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Args) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None) -> Tensor:
        logging.info("block %d: %d positions", self.layer_id, x.shape[1])  # construct: logging  # noqa: LOG015
        # construct: sdp-kernel
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class ResearchLlama(nn.Module):
    def __init__(self, args: Args) -> None:
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        freqs_cis = precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cis", freqs_cis, persistent=False)  # construct: complex-rope
        self.pos = 0  # construct: int-attribute

    def reset(self) -> None:
        """Start a new sequence: empty KV caches, position 0."""
        self.pos = 0
        for layer in self.layers:
            layer.attention.reset_cache()

    def forward(self, tokens: Tensor) -> Tensor:
        seqlen = tokens.shape[1]
        if tokens.max().item() >= self.vocab_size:  # construct: item-check
            raise ValueError(f"token id {tokens.max().item()} outside the vocabulary of {self.vocab_size}")
        print(f"step: {seqlen} tokens at position {self.pos}")  # construct: logging
        mask = None
        if self.pos == 0:  # construct: int-attribute
            warnings.warn("new sequence: the KV cache grows with every token")  # construct: logging
            mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
        elif seqlen > 1:
            mask = torch.ones(seqlen, self.pos + seqlen, dtype=torch.bool).tril(diagonal=self.pos)
        freqs_cis = self.freqs_cis[self.pos : self.pos + seqlen]  # construct: int-attribute
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        logits = self.output(self.norm(h)).float()
        self.pos += seqlen  # construct: int-attribute
        return logits


def build(seed: int = 0) -> torch.nn.Module:
    """The tiny research model (width 64, 2 layers, 4 heads over 2 KV heads, vocab 256), weights from ``seed``."""
    ensure_process_group()
    torch.manual_seed(seed)
    return randomize_(ResearchLlama(Args()), seed).eval()


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """``reset()``, the prompt, then one token per call: ``(1, steps + 1)`` greedy ids."""
    model.reset()
    generated = []
    with torch.no_grad():
        next_token = model(PROMPT)[:, -1:].argmax(dim=-1)
        generated.append(next_token)
        for _ in range(steps):
            next_token = model(next_token)[:, -1:].argmax(dim=-1)
            generated.append(next_token)
    return torch.cat(generated, dim=1)


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``reset()`` then one call over the whole sequence (the cache starts empty, so nothing earlier is reused)."""
    model.reset()
    with torch.no_grad():
        return model(ids)


_MARK = re.compile(r"#\s*construct:\s*([a-z][a-z-]*)")


def construct_lines() -> dict[str, list[int]]:
    """``{construct: [line, ...]}`` in this file: a marked line, or the line after a comment-only mark."""
    lines = Path(__file__).read_text().splitlines()
    found: dict[str, list[int]] = {}
    for number, line in enumerate(lines, start=1):
        mark = _MARK.search(line)
        if mark:
            target = number + 1 if line.lstrip().startswith("#") else number
            found.setdefault(mark.group(1), []).append(target)
    return found


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form: ``(build(), loop)``."""
    return build(), loop
