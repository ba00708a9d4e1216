"""Architectures by name, built with random weights directly on the device (no checkpoint files).

``random_hf_model("llama-2-7b", "cuda", torch.bfloat16)`` builds the Hugging Face
model on the meta device, converts the (meta) parameters to the dtype, allocates
them on the device with ``to_empty`` and fills them in place: normal(0, 0.02) for
matrices, 1 for norm weights. Nothing is read from disk, and the host never holds
the weights. The rotary embedding's ``inv_freq`` buffers (not parameters) are
rebuilt on the device.
"""

from __future__ import annotations

from typing import Any

import torch

from graphfix.errors import InputError

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    "llama-2-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    # small shapes for smoke runs of the benchmark itself
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0},
}


def preset_config(name: str, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise InputError(f"unknown architecture {name!r}", hint=f"one of {', '.join(PRESETS)} or a checkpoint folder")
    cfg = LlamaConfig(**{**PRESETS[name], **overrides})
    cfg.tie_word_embeddings = False
    return cfg


def param_count(name: str, **overrides: Any) -> int:
    """Parameters of a preset, computed from its shapes (nothing is built)."""
    c = {**PRESETS[name], **overrides}
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    return n * per_layer + 2 * v * d + d


@torch.no_grad()
def random_hf_model(name: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                    **overrides: Any) -> torch.nn.Module:
    """An HF ``LlamaForCausalLM`` of the preset's shapes with random weights made on ``device``."""
    from transformers import LlamaForCausalLM

    cfg = preset_config(name, **overrides)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for pname, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    rotary = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary(config=model.config)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


TINY_HF = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256}
"""The config every tiny model starts from: hidden 64, 2 layers, 4 heads (2 KV heads), vocab 128."""


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``kind`` causal LM (``llama``, ``mistral`` or ``qwen2``) of ``TINY_HF`` size with ``overrides`` in its
    config, its weights drawn by Hugging Face after ``torch.manual_seed(seed)``, on the CPU, in eval mode."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if kind not in classes:
        raise InputError(f"unknown tiny model {kind!r}", hint=f"one of {', '.join(classes)}")
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY_HF, **overrides})).eval()


@torch.no_grad()
def tiny_hf_model(kind: str, device: str | torch.device, dtype: torch.dtype = torch.float32, seed: int = 0,
                  **overrides: Any) -> torch.nn.Module:
    """``tiny_hf`` with large random weights, on ``device`` in ``dtype``.

    Weights are normal(0, 0.5) and norm weights and biases uniform(0.5, 1.5): the logits are far apart, so greedy
    tokens do not flip on rounding differences between two implementations of the same arithmetic (the
    GPU self-checks and the kernel checks compare the decode kernels with the standard path this way).
    """
    model = tiny_hf(kind, seed, **overrides)
    for p in model.parameters():
        p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.to(device=device, dtype=dtype)
