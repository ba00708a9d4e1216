"""Reading llama.cpp GGUF files (Llama architecture), dequantized to float.

The ``gguf`` package (llama.cpp's own Python reader) memory-maps the file and
dequantizes every block format llama.cpp writes (Q4_0, Q4_1, Q8_0, the
K-quants, ...), so this module only maps names and metadata and undoes one
layout difference: llama.cpp's converter stores Q and K in Meta's interleaved
RoPE layout, reversed here exactly as ``transformers`` does when it loads a
GGUF (``LlamaTensorProcessor``).

Output dtypes with ``--dtype keep``: quantized tensors become float32 (what
they dequantize to); F32, F16 and BF16 tensors keep their type.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphfix.convert.layout import gguf_to_hf_name, meta_to_hf_rope, rope_heads
from graphfix.convert.pages import release_mapped
from graphfix.convert.spec import Checkpoint, ModelSpec, TensorEntry
from graphfix.convert.tokenizer import gguf_tokenizer_exporter
from graphfix.errors import InputError, UnsupportedModelError

_NATURAL = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a readable GGUF file ({why}); it is truncated or corrupt: re-download it")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for Llama 3.1-style scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (orig / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_scaling(reader: Any, path: Path, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF rope_scaling from GGUF metadata or, for Llama 3.1-style files, from the ``rope_freqs`` tensor."""
    kind = _field(reader, "llama.rope.scaling.type")
    factor = _field(reader, "llama.rope.scaling.factor")
    orig = _field(reader, "llama.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        got = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        for f in (8.0, 32.0, 16.0, 4.0, 2.0):
            for o in (8192, 4096, 2048):
                want = _llama3_factors(theta, head_dim, f, 1.0, 4.0, o)
                if got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    return {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": o}
        raise UnsupportedModelError(f"{path}: its rope_freqs tensor matches no known llama3 RoPE scaling; "
                                    "such files do not convert")
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise UnsupportedModelError(f"{path}: RoPE scaling type {kind!r} is not supported")


def open_gguf(path: Path) -> Checkpoint:
    """Open a Llama GGUF file as a canonical (HF-named, HF-layout, dequantized) checkpoint."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, KeyError, IndexError... on bad bytes
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _corrupt(path, msg) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise _corrupt(path, f"tensor {t.name!r} extends past the end of the file")
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; only 'llama' files convert")
    if int(_field(reader, "split.count", 1) or 1) > 1:
        raise InputError(f"{path}: is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise _corrupt(path, "no token_embd.weight tensor")
    emb = tensors["token_embd.weight"]
    try:
        hidden = int(_field(reader, "llama.embedding_length", int(emb.shape[0])))
        heads = int(_field(reader, "llama.attention.head_count"))
        kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads) or heads)
        head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
        rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
        if rot != head_dim:
            raise UnsupportedModelError(f"{path}: RoPE covers {rot} of {head_dim} head dims (partial rotary); "
                                        "such files do not convert")
        theta = float(_field(reader, "llama.rope.freq_base", 10000.0))
        ffn = tensors.get("blk.0.ffn_gate.weight")
        spec = ModelSpec(
            hidden_size=hidden,
            num_hidden_layers=int(_field(reader, "llama.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=int(_field(reader, "llama.feed_forward_length",
                                         int(ffn.shape[1]) if ffn is not None else 0)),
            vocab_size=int(emb.shape[1]),
            rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            head_dim=head_dim,
            rope_scaling=_rope_scaling(reader, path, theta, head_dim),
            tie_word_embeddings="output.weight" not in tensors,
            max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        )
    except TypeError:  # a required key was missing: int(None)
        raise _corrupt(path, "required llama.* metadata is missing") from None

    entries: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into rope_scaling above
        hf = gguf_to_hf_name(t.name) or t.name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        dtype = _NATURAL.get(t.tensor_type.name, torch.float32)
        heads_for = rope_heads(hf, heads, kv_heads)
        entries[hf] = TensorEntry(hf, shape, dtype, partial(_load, t, shape, dtype, heads_for), source=str(path))
    exporter = gguf_tokenizer_exporter(path) if "tokenizer.ggml.model" in reader.fields else None
    return Checkpoint("gguf", path, spec, entries, export_tokenizer=exporter, closers=[reader.tensors.clear])


def _load(t: Any, shape: tuple[int, ...], natural: torch.dtype, heads: int | None,
          dtype: torch.dtype | None) -> torch.Tensor:
    from gguf import GGMLQuantizationType, dequantize

    raw = t.data
    arr = dequantize(raw, t.tensor_type)
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.array(arr, copy=True)  # dequantize returns a view of the memory map here
    out = torch.from_numpy(arr).reshape(shape)
    release_mapped(raw.ctypes.data, raw.nbytes)
    if heads is not None:
        out = meta_to_hf_rope(out, heads)
    return out.to(dtype or natural)
