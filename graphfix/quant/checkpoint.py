"""Quantized checkpoints: ``graphfix convert SRC DST --quantize int8|int4[:G]`` and loading them back.

The destination is a Hugging Face folder (``config.json``, tokenizer files) whose
``model.safetensors`` holds, for every quantized projection ``P``, ``P.qweight``,
``P.scales`` (and ``P.zeros`` for int4) in place of ``P.weight`` (the layouts of
``graphfix.quant.scheme``), the other tensors as floats, and ``graphfix_quant.json``
describing the scheme and listing the quantized modules. ``load_quantized`` builds the
model on the meta device, swaps those modules for empty ``QuantLinear`` shells and assigns
the tensors: no original weights and no re-quantization.

Written one tensor at a time, like every conversion (peak memory about one tensor), into a
temp folder renamed into place (``convert.atomic``).

GGUF sources whose blocks already are one of the engine's schemes are **re-packed**, never
dequantized: Q8_0 (32 int8 codes and one float16 scale) is ``int8:32``; Q4_1 (``d * q + m``)
and Q4_0 (``d * (q - 8)``) are ``int4:32`` with ``zero = m`` or ``-8 d``. Only the nibble order
changes (GGUF puts codes ``j`` and ``j + 16`` of a block in byte ``j``; the engine codes ``2j`` and
``2j + 1``), plus the Q/K row order GGUF uses for RoPE (a permutation of whole rows, applied to
codes and scales alike).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphfix.convert.formats.hf import hf_config_dict
from graphfix.convert.formats.safetensors_io import SafetensorsWriter
from graphfix.convert.layout import gguf_to_hf_name, meta_to_hf_rope, rope_heads
from graphfix.convert.spec import Checkpoint
from graphfix.errors import InputError
from graphfix.quant.scheme import Packed, QuantScheme, pack_int4, quantize_weight

QUANT_JSON = "graphfix_quant.json"
FORMAT = "graphfix.quant"
VERSION = 1
SINGLE = "model.safetensors"
PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
GGUF_BLOCKS = {"Q8_0": (34, QuantScheme(8, 32)), "Q4_0": (18, QuantScheme(4, 32)), "Q4_1": (20, QuantScheme(4, 32))}
"""GGUF block types the engine's schemes hold exactly: bytes per block of 32 weights, and the scheme."""


def quantizable(name: str, lm_head: bool) -> bool:
    return bool(PROJECTION.match(name)) or (lm_head and name == "lm_head.weight")


def _planned(shape: tuple[int, ...], scheme: QuantScheme, prefix: str) -> list[tuple[str, tuple, torch.dtype]]:
    n, k = shape
    g = scheme.groups(k)
    plan = [(f"{prefix}.qweight", (n, k if scheme.bits == 8 else k // 2), torch.int8 if scheme.bits == 8 else torch.uint8),
            (f"{prefix}.scales", (n, g), scheme.scale_dtype)]
    if scheme.has_zeros:
        plan.append((f"{prefix}.zeros", (n, g), scheme.scale_dtype))
    return plan


def _gguf_raw(ckpt: Checkpoint) -> dict[str, Any]:
    """HF name -> the GGUF reader's tensor, for the re-packable block types."""
    if ckpt.format != "gguf":
        return {}
    from gguf import GGUFReader

    reader = GGUFReader(ckpt.path)
    return {gguf_to_hf_name(t.name) or t.name: t for t in reader.tensors if t.tensor_type.name in GGUF_BLOCKS}


def repack_gguf(t: Any, shape: tuple[int, int], heads: int | None) -> Packed:
    """One GGUF Q8_0 / Q4_0 / Q4_1 tensor as the engine's packed rows, without dequantizing (module docstring)."""
    kind = t.tensor_type.name
    size, scheme = GGUF_BLOCKS[kind]
    n, k = shape
    blocks = np.asarray(t.data).reshape(n, k // 32, size)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    if kind == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        zeros = None
    else:
        qs = torch.from_numpy(blocks[..., size - 16:].copy())  # (n, groups, 16): codes j (low) and j + 16 (high)
        codes = pack_int4(torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(n, k))
        zeros = (torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "Q4_1"
                 else (d.float() * -8).to(torch.float16))
    tensors = [codes, d, zeros]
    if heads is not None:  # GGUF keeps Meta's interleaved RoPE rows for q/k: the same row permutation as floats
        tensors = [None if x is None else meta_to_hf_rope(x, heads).contiguous() for x in tensors]
    return Packed(scheme, tensors[0], tensors[1], tensors[2], k)


def write_quantized_hf(ckpt: Checkpoint, out: Path, scheme: QuantScheme, *, dtype: torch.dtype | None,
                       lm_head: bool = False, progress: Any = None) -> dict[str, Any]:
    """Write the quantized HF folder's weights, ``config.json`` and ``graphfix_quant.json`` into ``out``."""
    entries = list(ckpt.tensors.values())
    raw = _gguf_raw(ckpt)
    spec = ckpt.spec
    plan: list[tuple[str, tuple, torch.dtype]] = []
    chosen: set[str] = set()
    for e in entries:
        if quantizable(e.name, lm_head) and not scheme.check(e.shape[1]):
            chosen.add(e.name)
            plan += _planned(e.shape, scheme, e.name[: -len(".weight")])
        else:
            plan.append((e.name, e.shape, dtype or e.dtype))
    writer = SafetensorsWriter(out / SINGLE, plan, metadata={"format": "pt", "graphfix.quant": scheme.name})
    repacked = 0
    for e in entries:
        prefix = e.name[: -len(".weight")]
        if e.name in chosen:
            src = raw.get(e.name)
            if src is not None and GGUF_BLOCKS[src.tensor_type.name][1] == scheme:
                packed = repack_gguf(src, e.shape, rope_heads(e.name, spec.num_attention_heads,
                                                              spec.num_key_value_heads))
                repacked += 1
            else:
                packed = quantize_weight(e.load(torch.float32), scheme)
            for name, t in (("qweight", packed.codes), ("scales", packed.scales), ("zeros", packed.zeros)):
                if t is not None:
                    writer.write(f"{prefix}.{name}", t.contiguous())
            del packed
        else:
            writer.write(e.name, e.load(dtype))
        if progress:
            progress.update(e.name, e.nbytes)
    writer.close()
    float_dtype = dtype or next((e.dtype for e in entries if e.name not in chosen), torch.float32)
    (out / "config.json").write_text(json.dumps(hf_config_dict(spec, float_dtype), indent=2) + "\n")
    info = {"format": FORMAT, "version": VERSION, "scheme": scheme.to_json(), "scheme_name": scheme.name,
            "modules": sorted(n[: -len(".weight")] for n in chosen), "lm_head": lm_head,
            "repacked_from_gguf": repacked, "source_format": ckpt.format}
    (out / QUANT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return info


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QUANT_JSON).is_file()


def load_quantized(path: str | Path, *, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """The HF model of a ``--quantize`` checkpoint, its projections ``QuantLinear`` over the saved packed tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from graphfix.quant.linear import QuantLinear

    path = Path(path)
    info = json.loads((path / QUANT_JSON).read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise InputError(f"{path / QUANT_JSON}: not a graphfix quantized checkpoint of version {VERSION}")
    scheme = QuantScheme.from_json(info["scheme"])
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    state = load_file(str(path / SINGLE), device=str(device))
    float_dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point() and t.dim() == 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=float_dtype)
    for prefix in info["modules"]:
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        packed = Packed(scheme, state.pop(f"{prefix}.qweight"), state.pop(f"{prefix}.scales"),
                        state.pop(f"{prefix}.zeros", None), old.in_features)
        bias = state.pop(f"{prefix}.bias", None)
        setattr(parent, child, QuantLinear(packed, None if bias is None else bias.to(float_dtype), float_dtype))
    state = {k: (v.to(float_dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and "lm_head" not in info["modules"]:
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    assigned = tuple(f"{prefix}." for prefix in info["modules"])  # their tensors went into the QuantLinear shells
    missing = [m for m in missing if not m.startswith(assigned)]
    if missing or unexpected:
        raise InputError(f"{path}: the quantized checkpoint does not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    _rebuild_buffers(model, device)
    return model.eval()


def _rebuild_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Modules with non-persistent buffers (the rotary embedding's ``inv_freq``) are not in the file: build them
    again from their config on ``device`` (their constructor computes the buffers)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent_name), child, type(module)(module.config))
    left = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise InputError(f"loading the quantized checkpoint left {left[:3]} unset")
