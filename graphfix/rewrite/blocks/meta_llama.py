"""Compile-clean pieces for Meta's reference Llama 3 (``llama_models.llama3.model.Transformer``).

``MetaAttention`` replaces Meta's ``Attention`` with the same projections (the
module objects are moved, so are their parameters) and three parts that passes
choose independently:

- RoPE: ``"complex"`` (Meta's own ``apply_rotary_emb`` on ``torch.polar`` tables) or
  ``"interleaved"`` (real cos/sin tables, pass ``real-rope``);
- attention arithmetic: ``"manual"`` (Meta's matmul/softmax/matmul) or ``"sdpa"``
  (pass ``sdpa-attention``);
- KV cache: Meta's attribute cache written at a Python-int ``start_pos``, or a
  ``StaticKVCache`` written at tensor positions (pass ``static-kv-cache``).

With a static cache, the ``Transformer`` instance gets the split the rest of
graphfix relies on (``install_tensor_core``):

- ``model.graphfix_step(tokens, input_pos)``: the tensor-only core that compiles with
  ``fullgraph=True``; ``input_pos`` is an int64 tensor of absolute positions;
- ``model.forward(tokens, start_pos)``: Meta's calling convention, an eager frame
  (its code is skipped by Dynamo: ``torch._dynamo.decorators.skip``) that builds ``input_pos``, enters
  inference mode when it was moved outside, and calls ``model.graphfix_core_fn``
  (a compiled core set by optimize) or ``model.graphfix_step``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

from graphfix.rewrite.blocks.attention import manual_attention, sdpa
from graphfix.rewrite.blocks.inference_mode import inference_mode_of
from graphfix.rewrite.blocks.kv_cache import StaticKVCache, causal_mask
from graphfix.rewrite.blocks.rope import RopeScaling, apply_rotary_interleaved, rope_tables
from graphfix.rewrite.codeobj import own_code


def meta_model_module() -> types.ModuleType | None:
    """``llama_models.llama3.model`` if it is installed (with fairscale), else ``None``."""
    try:
        from llama_models.llama3 import model as meta_model
    except ImportError:
        return None
    return meta_model


def is_meta_transformer(model: Any) -> bool:
    """Whether ``model`` is Meta's text ``Transformer`` (class and structure), rewritten or not."""
    mm = meta_model_module()
    if mm is None or not isinstance(model, mm.Transformer):
        return False
    return all(hasattr(model, a) for a in ("params", "layers", "tok_embeddings", "norm", "output", "freqs_cis"))


def is_meta_attention(module: Any) -> bool:
    """Meta's own ``Attention`` (exact class: a subclass may have its own forward)."""
    mm = meta_model_module()
    return mm is not None and type(module) is mm.Attention


def has_tensor_core(model: nn.Module) -> bool:
    """Whether ``model.graphfix_step(tokens, input_pos)`` is installed (static KV cache in place)."""
    return "graphfix_step" in model.__dict__


def set_compiled_core(model: nn.Module, fn: Callable | None) -> None:
    """Make ``forward`` call ``fn`` (e.g. ``torch.compile(model.graphfix_step, ...)``); ``None`` undoes it."""
    model.graphfix_core_fn = fn


class MetaAttention(nn.Module):
    """Meta's ``Attention`` with its RoPE, attention arithmetic and KV cache chosen by passes."""

    def __init__(self, wq: nn.Module, wk: nn.Module, wv: nn.Module, wo: nn.Module, n_local_heads: int,
                 n_local_kv_heads: int, head_dim: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.n_local_heads = n_local_heads
        self.n_local_kv_heads = n_local_kv_heads
        self.n_rep = n_local_heads // n_local_kv_heads
        self.head_dim = head_dim
        self.rope = "complex"
        self.attention = "manual"
        self.kv_cache: StaticKVCache | None = None
        # Meta's attribute cache (plain tensors, not buffers, as in Meta's code) until a static one replaces it.
        self.cache_k = cache_k
        self.cache_v = cache_v

    @classmethod
    def from_meta(cls, attn: nn.Module) -> MetaAttention:
        """Move the projections and the cache of Meta's ``attn`` (no copies)."""
        return cls(attn.wq, attn.wk, attn.wv, attn.wo, attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim,
                   attn.cache_k, attn.cache_v)

    def use_static_cache(self, dtype: torch.dtype, device: torch.device) -> None:
        """Replace Meta's cache by a ``StaticKVCache`` of the same size (the old tensors are dropped)."""
        max_batch, max_seq_len = self.cache_k.shape[:2]
        self.kv_cache = StaticKVCache(max_batch, max_seq_len, self.n_local_kv_heads, self.head_dim, dtype, device)
        del self.cache_k, self.cache_v

    def extra_repr(self) -> str:
        cache = "static" if self.kv_cache is not None else "meta"
        return f"heads={self.n_local_heads}, kv_heads={self.n_local_kv_heads}, rope={self.rope}, " \
               f"attention={self.attention}, cache={cache}"

    def forward(self, x: torch.Tensor, pos: int | torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None):
        """``pos``: Meta's int ``start_pos`` (Meta cache) or the ``input_pos`` tensor (static cache).

        ``freqs``: the table rows of these positions, complex ``(S, D/2)`` or real ``(S, D/2, 2)``.
        ``mask``: Meta's additive ``(S, start_pos + S)`` mask or ``None`` (Meta cache), or the
        boolean ``(S, max_seq_len)`` mask of ``causal_mask`` (static cache).
        """
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

        if self.rope == "complex":
            xq, xk = meta_model_module().apply_rotary_emb(xq, xk, freqs_cis=freqs)
        else:
            cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
            xq, xk = apply_rotary_interleaved(xq, cos, sin), apply_rotary_interleaved(xk, cos, sin)

        if self.kv_cache is not None:
            keys, values = self.kv_cache.update(pos, xk.transpose(1, 2), xv.transpose(1, 2))
        else:
            self.cache_k = self.cache_k.to(xq)
            self.cache_v = self.cache_v.to(xq)
            self.cache_k[:bsz, pos : pos + seqlen] = xk
            self.cache_v[:bsz, pos : pos + seqlen] = xv
            keys = self.cache_k[:bsz, : pos + seqlen].transpose(1, 2)
            values = self.cache_v[:bsz, : pos + seqlen].transpose(1, 2)

        attend = sdpa if self.attention == "sdpa" else manual_attention
        output = attend(xq.transpose(1, 2), keys, values, mask)
        return self.wo(output.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


# ---------------------------------------------------------------------------
# Transformer level
# ---------------------------------------------------------------------------


def real_freqs_table(params: Any, end: int | None = None) -> torch.Tensor:
    """Meta's ``freqs_cis`` as a real ``(2 * max_seq_len, head_dim // 2, 2)`` table of (cos, sin)."""
    head_dim = params.dim // params.n_heads
    cos, sin = rope_tables(head_dim, end or params.max_seq_len * 2, params.rope_theta,
                           RopeScaling.from_meta_args(params), layout="interleaved")
    return torch.stack((cos, sin), dim=-1)


def _step(self: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    h = self.tok_embeddings(tokens)
    freqs = self.freqs_cis[input_pos]
    mask = causal_mask(input_pos, self.graphfix_cache_len, self.graphfix_sliding_window)
    for layer in self.layers:
        h = layer(h, input_pos, freqs, mask)
    h = self.norm(h)
    return self.output(h).float()


def graphfix_step(self: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The tensor-only core: logits of ``tokens`` (``(bsz, seqlen)``) at positions ``input_pos`` (``(seqlen,)``)."""
    if self.graphfix_inference_mode == "inside":  # the original decorator, until the inference-mode pass runs
        with torch.inference_mode():
            return _step(self, tokens, input_pos)
    return _step(self, tokens, input_pos)


@skip_frame
def meta_forward(self: nn.Module, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Meta's ``forward(tokens, start_pos)``, run eagerly around the tensor-only core."""
    ctx = torch.inference_mode() if self.graphfix_inference_mode == "outside" else contextlib.nullcontext()
    with ctx:
        if self.freqs_cis.device != tokens.device:
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        input_pos = torch.arange(start_pos, start_pos + tokens.shape[1], device=tokens.device)
        core = getattr(self, "graphfix_core_fn", None)
        if core is None:
            return self.graphfix_step(tokens, input_pos)
        if getattr(core, "takes_start_pos", False):  # the engine's core picks a decode graph by the int position
            return core(tokens, input_pos, start_pos=start_pos)
        return core(tokens, input_pos)


def inference_mode_state(model: nn.Module) -> str:
    """Where ``model``'s forward enters inference mode: ``inside`` the core, ``outside`` it, or ``none``."""
    state = model.__dict__.get("graphfix_inference_mode")
    if state is not None:
        return state
    return "inside" if inference_mode_of(type(model).forward) is not None else "none"


def install_tensor_core(model: nn.Module, sliding_window: int | None = None) -> None:
    """Give a Meta ``Transformer`` whose attention modules all use static caches the core/forward split."""
    caches = [layer.attention.kv_cache for layer in model.layers]
    model.graphfix_inference_mode = inference_mode_state(model)
    model.graphfix_cache_len = caches[0].max_seq_len
    model.graphfix_sliding_window = sliding_window
    model.graphfix_step = types.MethodType(own_code(graphfix_step), model)  # a compile cache per model
    model.forward = types.MethodType(meta_forward, model)
    model.__dict__.pop("graphfix_forward_core", None)  # a generic inference-mode split is superseded
