"""``DecoderConfig``: the shape of a Llama-family decoder, read from a Hugging Face config or Meta's ``ModelArgs``.

Apart from ``llama`` (the decoder built from it) because the readers of configs and checkpoints
(``loading``, the tensor-parallel builder, the benchmarks' presets) need the shape without the modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from graphfix.errors import UnsupportedModelError
from graphfix.rewrite.blocks.rope import Layout, RopeScaling, hf_rope_theta

CACHE_ALIGN = 64
"""Cache lengths are rounded up to a multiple of this (aligned attention-bias rows for the fused SDPA kernels)."""

HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The shape of a Llama-family decoder; built from an HF config or Meta ``ModelArgs``."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    rope_layout: Layout = "half"
    sliding_windows: tuple[int | None, ...] | None = None
    """One window per layer (``None``: full attention); ``None`` for all-full models."""

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    @classmethod
    def from_hf(cls, config: Any) -> DecoderConfig:
        model_type = getattr(config, "model_type", None)
        if model_type not in HF_MODEL_TYPES:
            raise UnsupportedModelError(f"architecture {model_type!r} is not supported by the graphfix decoder",
                                        hint=f"supported: {', '.join(HF_MODEL_TYPES)}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{model_type}: activation {act!r} (the decoder implements SwiGLU with silu)")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError(f"{model_type}: MLP biases are not supported by the graphfix decoder")
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            rope_theta=hf_rope_theta(config),
            rope_scaling=RopeScaling.from_hf_config(config),
            rope_layout="half",
            sliding_windows=_hf_windows(config),
        )

    @classmethod
    def from_meta_args(cls, args: Any, intermediate_size: int) -> DecoderConfig:
        n_heads = args.n_heads
        return cls(
            vocab_size=args.vocab_size,
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=n_heads,
            n_kv_heads=args.n_kv_heads or n_heads,
            head_dim=args.dim // n_heads,
            intermediate_size=intermediate_size,
            norm_eps=args.norm_eps,
            rope_theta=float(args.rope_theta),
            rope_scaling=RopeScaling.from_meta_args(args),
            rope_layout="interleaved",
        )


def _hf_windows(config: Any) -> tuple[int | None, ...] | None:
    """Per-layer sliding windows as the HF modeling code applies them (Mistral: every layer; Qwen2: by layer type)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    model_type = config.model_type
    if model_type == "mistral":
        return (int(window),) * config.num_hidden_layers
    if model_type == "qwen2":
        if not getattr(config, "use_sliding_window", False):
            return None
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return None


def round_cache_len(n: int) -> int:
    return -(-n // CACHE_ALIGN) * CACHE_ALIGN
