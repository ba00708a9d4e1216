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

from graphfix.convert.checks import cfg_float, cfg_int, check_heads, token_ids
from graphfix.convert.layout import gguf_to_hf_name, meta_to_hf_rope, rope_heads
from graphfix.convert.pages import release_mapped
from graphfix.convert.spec import Checkpoint, ModelSpec, TensorEntry
from graphfix.convert.tokenizer import gguf_tokenizer_exporter
from graphfix.errors import InputError, UnsupportedModelError

_NATURAL = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a readable GGUF file ({why}); it is truncated or corrupt: re-download it")


#: the metadata keys the spec is built from (read typed: a string where a count belongs is an error)
_KEYS = ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
         "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
         "llama.rope.dimension_count", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
         "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
         "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")
#: canonical field -> GGUF key, for error messages
GGUF_FIELDS = {"hidden_size": "llama.embedding_length", "num_hidden_layers": "llama.block_count",
               "num_attention_heads": "llama.attention.head_count",
               "num_key_value_heads": "llama.attention.head_count_kv", "intermediate_size": "llama.feed_forward_length",
               "vocab_size": "token_embd.weight rows"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return _value(f)


def _value(field: Any) -> Any:
    """A metadata value as Python would type it: numbers stay numbers, strings strings, arrays lists."""
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a malformed field: report it as a wrong type, not a traceback
        return f"<unreadable {field.types[0].name if field.types else 'value'}>"


def _check_tensor_types(reader: Any, path: Path) -> None:
    """Refuse tensor types graphfix cannot dequantize (Q8_1, Q8_K, ...) or that are not weights, before writing.

    Each type present is dequantized once on its first row: whatever the gguf
    package cannot handle fails here, in a second, not half way through.
    """
    from gguf import GGMLQuantizationType, dequantize

    seen: set[int] = set()
    for t in reader.tensors:
        kind = t.tensor_type
        if kind in seen:
            continue
        seen.add(kind)
        if kind.name in ("I8", "I16", "I32", "I64"):
            raise UnsupportedModelError(f"{path}: tensor {t.name!r} is stored as {kind.name} (integers), not as "
                                        "weights; this is not a Llama checkpoint graphfix can convert")
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            continue
        try:
            dequantize(np.asarray(t.data[:1]), kind)
        except NotImplementedError:
            raise UnsupportedModelError(f"{path}: tensor {t.name!r} is quantized as {kind.name}, which the gguf "
                                        "package cannot dequantize; re-quantize it (e.g. Q8_0) or use an F16 file") from None
        except Exception as exc:  # noqa: BLE001 - a type the file's bytes do not fit
            raise _corrupt(path, f"tensor {t.name!r} ({kind.name}) cannot be read: {exc}") from None


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


def _rope_scaling(reader: Any, md: dict[str, Any], path: Path, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF rope_scaling from GGUF metadata or, for Llama 3.1-style files, from the ``rope_freqs`` tensor."""
    kind = md.get("llama.rope.scaling.type")
    if kind is not None and not isinstance(kind, str):
        raise InputError(f"{path}: llama.rope.scaling.type={kind!r} must be a string; fix or re-download the file")
    factor = cfg_float(md, "llama.rope.scaling.factor", path, default=None)
    orig = cfg_int(md, "llama.rope.scaling.original_context_length", path, default=None)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        got = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        if got.size != head_dim // 2:
            raise InputError(f"{path}: rope_freqs.weight has {got.size} values but the head size {head_dim} "
                             f"needs {head_dim // 2}; the file is inconsistent: re-download it")
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
    if cfg_int({"split.count": _field(reader, "split.count")}, "split.count", path, default=1, minimum=0) > 1:
        raise InputError(f"{path}: is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise _corrupt(path, "no token_embd.weight tensor")
    _check_tensor_types(reader, path)
    emb = tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise _corrupt(path, f"token_embd.weight has {len(emb.shape)} dimensions, not 2")
    md = {key: _value(reader.fields[key]) for key in _KEYS if key in reader.fields}
    hidden = cfg_int(md, "llama.embedding_length", path, default=int(emb.shape[0]))
    heads = cfg_int(md, "llama.attention.head_count", path)
    kv_heads = cfg_int(md, "llama.attention.head_count_kv", path, default=heads)
    head_dim = cfg_int(md, "llama.attention.key_length", path, default=hidden // heads)
    q = tensors.get("blk.0.attn_q.weight")
    if q is not None and len(q.shape) == 2 and int(q.shape[1]) != heads * head_dim:
        raise InputError(f"{path}: llama.attention.head_count={heads} with head size {head_dim} implies "
                         f"{heads * head_dim} query rows but blk.0.attn_q.weight has {int(q.shape[1])}; "
                         "the metadata does not belong to these weights")
    rot = cfg_int(md, "llama.rope.dimension_count", path, default=head_dim)
    if rot != head_dim:
        raise UnsupportedModelError(f"{path}: RoPE covers {rot} of {head_dim} head dims (partial rotary); "
                                    "such files do not convert")
    check_heads(path, GGUF_FIELDS, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    theta = cfg_float(md, "llama.rope.freq_base", path, default=10000.0)
    ffn = tensors.get("blk.0.ffn_gate.weight")
    vocab = int(emb.shape[1])
    spec = ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=cfg_int(md, "llama.block_count", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=cfg_int(md, "llama.feed_forward_length", path,
                                  default=int(ffn.shape[1]) if ffn is not None else None),
        vocab_size=vocab,
        rms_norm_eps=cfg_float(md, "llama.attention.layer_norm_rms_epsilon", path, default=1e-5),
        rope_theta=theta,
        head_dim=head_dim,
        rope_scaling=_rope_scaling(reader, md, path, theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=cfg_int(md, "llama.context_length", path, default=4096),
        bos_token_id=token_ids(md, "tokenizer.ggml.bos_token_id", path, vocab),
        eos_token_id=token_ids(md, "tokenizer.ggml.eos_token_id", path, vocab),
        pad_token_id=token_ids(md, "tokenizer.ggml.padding_token_id", path, vocab),
    )

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
    return Checkpoint("gguf", path, spec, entries, export_tokenizer=exporter, closers=[reader.tensors.clear],
                      config_path=path, fields=GGUF_FIELDS)


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
