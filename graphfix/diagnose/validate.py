"""Checks on a model's files before anything is built, loaded or compiled.

A bad ``config.json`` or ``params.json`` used to surface deep inside transformers or Meta's
code, as a traceback, or as an allocation sized by the bad value (``max_seq_len: 8000000``
made a 435 KB checkpoint peak at 8 GiB). Here every value that shapes or sizes the model is
checked first, and each failure is one ``InputError`` line naming the file and the field:

* types and ranges: whole numbers >= 1, heads that divide the width, positive epsilons;
* agreement with the weights: the tensor shapes a config implies against the shapes the
  checkpoint holds (read from safetensors headers or a memory-mapped ``torch.load``: nothing
  is read into memory), so a wrong ``dim`` or a missing tensor is named before a model is
  built, and a config cannot size more than its weights;
* memory: what the build allocates (weights at the load dtype, Meta's KV cache and RoPE
  table) against the memory this machine has, and buffers that are not weights against a
  bound derived from the weights (``buffer_budget``), so a bad size fails in a line instead
  of allocating gigabytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graphfix.diagnose.weight_files import (
    MAX_VALUE,
    Shapes,
    hf_weight_files,
    numel,
    safe_torch_load,
    safetensors_shapes,
    weight_shapes,
)
from graphfix.errors import InputError

MiB = 2**20
GiB = 2**30
BUFFER_FLOOR = 256 * MiB
"""Buffers (caches, RoPE tables) may always take this much, whatever the weights."""
BUFFER_PER_WEIGHT_BYTE = 4
"""...and otherwise up to this many bytes per byte of weights."""
MEMORY_SHARE = 0.8
"""The share of available memory a build may plan to use."""


# ----------------------------------------------------------------------------- memory


def available_memory() -> int:
    """Bytes this process can still allocate: ``MemAvailable``, capped by a cgroup limit when there is one."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 64 * GiB  # no way to ask: assume a large machine, the weights' bound still applies
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = int(Path(limit_file).read_text().strip())
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < 2**60:
            avail = min(avail, max(limit - usage, 0))
    return avail


def gib(nbytes: float) -> str:
    """A byte count for people: GiB, MiB or KiB."""
    if nbytes >= GiB:
        return f"{nbytes / GiB:.1f} GiB"
    return f"{nbytes / MiB:.0f} MiB" if nbytes >= MiB else f"{nbytes / 1024:.0f} KiB"


def buffer_budget(weight_bytes: int) -> int:
    """Bytes that buffers which are not weights may take: ``max(256 MiB, 4 x the weights)``."""
    return max(BUFFER_FLOOR, BUFFER_PER_WEIGHT_BYTE * weight_bytes)


def check_memory(nbytes: int, what: str, where: str, hint: str) -> None:
    """Refuse a build that needs more than ``MEMORY_SHARE`` of the memory available now."""
    avail = available_memory()
    if nbytes > MEMORY_SHARE * avail:
        raise InputError(f"{where}: {what} needs {gib(nbytes)}, more than this machine has available ({gib(avail)})",
                         hint=hint)


# ----------------------------------------------------------------------------- field checks


def _whole(data: Mapping[str, Any], key: str, where: str, *, minimum: int = 1, required: bool = False,
           default: int | None = None) -> int | None:
    """``data[key]`` as an int in ``[minimum, MAX_VALUE]`` (an integral float such as ``64.0`` is accepted)."""
    if key not in data or data[key] is None:
        if required:
            raise InputError(f"{where}: {key} is missing", hint=f"add \"{key}\" to the file")
        return default
    value = data[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {key} must be a whole number, got {json.dumps(value)[:40]}",
                         hint="fix or regenerate the file")
    if value < minimum or value > MAX_VALUE:
        raise InputError(f"{where}: {key} must be a whole number from {minimum} to {MAX_VALUE}, got {value}",
                         hint="fix or regenerate the file")
    return value


def _positive(data: Mapping[str, Any], key: str, where: str) -> float | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{where}: {key} must be a positive number, got {json.dumps(value)[:40]}",
                         hint="fix or regenerate the file")
    return float(value)


def _divides(heads: int, heads_key: str, width: int, width_key: str, where: str) -> None:
    if width % heads:
        raise InputError(f"{where}: {heads_key} {heads} does not divide {width_key} {width}",
                         hint=f"{width_key} must be a multiple of {heads_key}; fix the file")


MAX_PARAMETERS = 10**13
"""Ten times the largest published model: a config above it is a typo (a bare config builds on the meta device,
where nothing bounds it by memory, and Dynamo would trace it for minutes)."""


def _plausible_size(data: Mapping[str, Any], where: str) -> None:
    """Refuse sizes no model has: the parameter count the config implies, above ``MAX_PARAMETERS``."""
    hidden, layers = data.get("hidden_size"), data.get("num_hidden_layers")
    if not isinstance(hidden, int) or not isinstance(layers, int):
        return
    inter = data.get("intermediate_size") if isinstance(data.get("intermediate_size"), int) else 4 * hidden
    vocab = data.get("vocab_size") if isinstance(data.get("vocab_size"), int) else 0
    params = 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)
    if params > MAX_PARAMETERS:
        raise InputError(f"{where}: hidden_size {hidden} x num_hidden_layers {layers} describes a model of about "
                         f"{params:.1e} parameters, more than any model has",
                         hint="fix hidden_size / intermediate_size / num_hidden_layers in the file")


def check_hf_config(data: Any, where: str) -> None:
    """Types and ranges of the fields of an HF ``config.json`` that shape a Llama-style model."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got a JSON {_json_kind(data)}",
                         hint="config.json holds one object of model settings")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
        _whole(data, key, where)
    kv = _whole(data, "num_key_value_heads", where)
    head_dim = _whole(data, "head_dim", where)
    for key in ("rms_norm_eps", "rope_theta"):
        _positive(data, key, where)
    hidden, heads = data.get("hidden_size"), data.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and head_dim is None:
        _divides(heads, "num_attention_heads", hidden, "hidden_size", where)
    if kv is not None and isinstance(heads, int):
        _divides(kv, "num_key_value_heads", heads, "num_attention_heads", where)
    _plausible_size(data, where)
    for key in ("bos_token_id", "pad_token_id"):
        _whole(data, key, where, minimum=0)
    eos = data.get("eos_token_id")
    for item in eos if isinstance(eos, list) else [eos]:
        _whole({"eos_token_id": item}, "eos_token_id", where, minimum=0)


def check_meta_params(params: Any, where: str) -> dict[str, Any]:
    """Types and ranges of a Meta ``params.json``; returns the values with their defaults filled in."""
    if not isinstance(params, dict):
        raise InputError(f"{where}: expected a JSON object, got a JSON {_json_kind(params)}",
                         hint="params.json holds one object of model settings")
    out: dict[str, Any] = {
        "dim": _whole(params, "dim", where, required=True),
        "n_layers": _whole(params, "n_layers", where, required=True),
        "n_heads": _whole(params, "n_heads", where, required=True),
        "multiple_of": _whole(params, "multiple_of", where, default=256),
        "max_seq_len": _whole(params, "max_seq_len", where, default=None),
        "max_batch_size": _whole(params, "max_batch_size", where, default=None),
    }
    out["n_kv_heads"] = _whole(params, "n_kv_heads", where) or out["n_heads"]
    vocab = params.get("vocab_size", -1)
    out["vocab_size"] = None if vocab == -1 else _whole(params, "vocab_size", where)
    mult = params.get("ffn_dim_multiplier")
    out["ffn_dim_multiplier"] = None if mult is None else _positive(params, "ffn_dim_multiplier", where)
    for key in ("norm_eps", "rope_theta"):
        _positive(params, key, where)
    _divides(out["n_heads"], "n_heads", out["dim"], "dim", where)
    _divides(out["n_kv_heads"], "n_kv_heads", out["n_heads"], "n_heads", where)
    return out


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


# ----------------------------------------------------------------------------- configs against weights


def compare_shapes(expected: Shapes, found: Shapes, config: str, weights: str, *,
                   optional: set[str] = frozenset(), fields: Mapping[str, str] | None = None) -> None:
    """Every tensor the config implies must be in the weights with the same shape (extra tensors are allowed).

    ``fields`` maps a substring of a tensor name to the config fields that size it, for the message.
    """
    fields = fields or {}
    for name, shape in expected.items():
        got = found.get(name)
        if got is None:
            if name in optional:
                continue
            missing = [n for n in expected if n not in found and n not in optional]
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(f"{weights} lacks tensor {name}{more}, which {config} needs",
                             hint="the checkpoint is incomplete: re-download or re-convert it")
        if tuple(got) != tuple(shape):
            which = next((v for k, v in fields.items() if k in name), "its sizes")
            raise InputError(f"{config} does not match the weights: {name} is {list(got)} in {weights}, "
                             f"{config} implies {list(shape)} (check {which})",
                             hint="use the config.json or params.json that came with these weights")


HF_FIELDS = {
    "embed_tokens": "hidden_size, vocab_size", "lm_head": "hidden_size, vocab_size",
    "q_proj": "hidden_size, num_attention_heads, head_dim", "o_proj": "hidden_size, num_attention_heads, head_dim",
    "k_proj": "num_key_value_heads, head_dim", "v_proj": "num_key_value_heads, head_dim",
    "mlp": "hidden_size, intermediate_size", "norm": "hidden_size",
}
META_FIELDS = {
    "tok_embeddings": "dim, vocab_size", "output.": "dim, vocab_size", "wq": "dim, n_heads", "wo": "dim, n_heads",
    "wk": "n_kv_heads", "wv": "n_kv_heads", "feed_forward": "dim, multiple_of, ffn_dim_multiplier", "norm": "dim",
}


def check_hf_dir(folder: Path, config: Any, dtype: torch.dtype) -> None:
    """An HF folder's weights hold what ``config`` (a transformers config) implies, and fit in memory."""
    files = hf_weight_files(folder)
    if not files:
        return
    found = weight_shapes(files)
    weights = files[0].name if len(files) == 1 else f"the {len(files)} weight files of {folder}"
    expected = hf_expected_shapes(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    compare_shapes(expected, found, str(folder / "config.json"), weights,
                   optional={"lm_head.weight"} if tied else set(), fields=HF_FIELDS)
    nbytes = sum(numel(s) for n, s in found.items() if n in expected) * dtype.itemsize
    check_memory(nbytes, f"loading the weights as {str(dtype).removeprefix('torch.')}", str(folder),
                 "diagnose from config.json alone (--meta-device), or load in a smaller dtype")


def hf_expected_shapes(config: Any) -> Shapes:
    """Parameter names and shapes of the model ``config`` describes, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def meta_expected_shapes(p: Mapping[str, Any], vocab_rows: int, n_layers: int | None = None) -> Shapes:
    """What Meta's ``Transformer`` holds for checked params ``p`` (``check_meta_params``)."""
    from graphfix.convert.formats.meta_params import ffn_hidden_dim

    dim, heads, kv = p["dim"], p["n_heads"], p["n_kv_heads"]
    hd = dim // heads
    vocab = p["vocab_size"] or vocab_rows
    ffn = ffn_hidden_dim(dim, p["multiple_of"], p["ffn_dim_multiplier"])
    shapes: Shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(p["n_layers"] if n_layers is None else n_layers):
        pre = f"layers.{i}."
        shapes.update({pre + "attention.wq.weight": (heads * hd, dim), pre + "attention.wk.weight": (kv * hd, dim),
                       pre + "attention.wv.weight": (kv * hd, dim), pre + "attention.wo.weight": (dim, heads * hd),
                       pre + "feed_forward.w1.weight": (ffn, dim), pre + "feed_forward.w2.weight": (dim, ffn),
                       pre + "feed_forward.w3.weight": (ffn, dim), pre + "attention_norm.weight": (dim,),
                       pre + "ffn_norm.weight": (dim,)})
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return shapes


def check_meta_checkpoint(folder: Path, params: Any, found: Shapes, *, dtype: torch.dtype,
                          max_seq_len: int, max_batch_size: int) -> dict[str, Any]:
    """``params.json`` against the checkpoint's shapes, and the build's memory; returns the checked params."""
    where = str(folder / "params.json")
    p = check_meta_params(params, where)
    layers_found = {int(m.group(1)) for n in found if (m := re.match(r"layers\.(\d+)\.", n))}
    if layers_found and max(layers_found) + 1 != p["n_layers"]:
        raise InputError(f"{where}: n_layers {p['n_layers']} does not match the checkpoint, which holds "
                         f"{max(layers_found) + 1} layers", hint="use the params.json that came with these weights")
    vocab_rows = found.get("tok_embeddings.weight", (p["vocab_size"] or 0,))[0]
    compare_shapes(meta_expected_shapes(p, vocab_rows), found, where, f"the consolidated.*.pth files of {folder}",
                   fields=META_FIELDS)
    weight_bytes = sum(numel(s) for s in found.values()) * dtype.itemsize
    seq = p["max_seq_len"] or max_seq_len
    batch = p["max_batch_size"] or max_batch_size
    hd = p["dim"] // p["n_heads"]
    # Meta's Attention allocates cache_k and cache_v of (batch, seq, kv heads, head_dim) per layer, and the model
    # a complex64 RoPE table of (2 * seq, head_dim / 2).
    buffers = 2 * p["n_layers"] * batch * seq * p["n_kv_heads"] * hd * dtype.itemsize + 2 * seq * hd * 4
    if buffers > buffer_budget(weight_bytes):
        field = "max_seq_len" if p["max_seq_len"] else "max_batch_size"
        raise InputError(f"{where}: max_seq_len {seq} x max_batch_size {batch} sizes a KV cache and RoPE table of "
                         f"{gib(buffers)} for {gib(weight_bytes)} of weights (the bound is "
                         f"{gib(buffer_budget(weight_bytes))}; check {field})",
                         hint="remove max_seq_len from params.json or set it to the context you need")
    check_memory(weight_bytes + buffers, "building the model", str(folder),
                 "load it in a smaller dtype, or diagnose an HF config.json on the meta device")
    return p


def kv_cache_bytes(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype) -> int | None:
    """Bytes of a static KV cache of ``seq`` positions for ``batch`` rows of ``model`` (HF or Meta), if known."""
    config, params = getattr(model, "config", None), getattr(model, "params", None)
    try:
        if config is not None and getattr(config, "num_hidden_layers", None):
            layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
            kv = int(getattr(config, "num_key_value_heads", None) or heads)
            hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        elif params is not None and getattr(params, "n_layers", None):
            layers, heads = int(params.n_layers), int(params.n_heads)
            kv, hd = int(params.n_kv_heads or heads), int(params.dim) // heads
        else:
            return None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError):
        return None
    return 2 * layers * batch * seq * kv * hd * dtype.itemsize


def check_kv_cache(model: torch.nn.Module, batch: int, seq: int, dtype: torch.dtype, where: str) -> None:
    """A cache the weights could plausibly use, and that fits in memory, before it is allocated."""
    need = kv_cache_bytes(model, batch, seq, dtype)
    if need is None:
        return
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    if need > buffer_budget(weights):
        raise InputError(f"{where}: a KV cache of {seq} positions x {batch} row(s) needs {gib(need)} for "
                         f"{gib(weights)} of weights (the bound is {gib(buffer_budget(weights))})",
                         hint="generate fewer tokens or give a smaller --max-seq-len")
    check_memory(need, f"a KV cache of {seq} positions x {batch} row(s)", where,
                 "generate fewer tokens or give a smaller --max-seq-len")


def check_gguf(path: Path, arch: str, reader: Any, dtype: torch.dtype) -> None:
    """The GGUF metadata that sizes the model (whole numbers >= 1, heads that divide the width) and the memory
    its tensors take once dequantized to ``dtype``."""
    where = str(path)
    values: dict[str, Any] = {}
    for key in ("block_count", "embedding_length", "feed_forward_length", "context_length",
                "attention.head_count", "attention.head_count_kv", "vocab_size"):
        name = f"{arch}.{key}"
        field = reader.fields.get(name)
        if field is None:
            continue
        try:
            value = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf cannot decode is reported as malformed below
            value = "(undecodable)"
        for item in value if isinstance(value, list) and value else [value]:  # per-layer arrays: each entry
            _whole({name: item}, name, where)
        values[name] = value
    heads, width = values.get(f"{arch}.attention.head_count"), values.get(f"{arch}.embedding_length")
    if isinstance(heads, int) and isinstance(width, int):
        _divides(heads, f"{arch}.attention.head_count", width, f"{arch}.embedding_length", where)
    kv = values.get(f"{arch}.attention.head_count_kv")
    if isinstance(kv, int) and isinstance(heads, int):
        _divides(kv, f"{arch}.attention.head_count_kv", heads, f"{arch}.attention.head_count", where)
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    count = values.get(f"{arch}.block_count")
    if isinstance(count, int) and count != (max(blocks) + 1 if blocks else 0):
        raise InputError(f"{where}: {arch}.block_count is {count}, but the file holds "
                         f"{max(blocks) + 1 if blocks else 0} blocks of tensors", hint="re-download or re-export it")
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if isinstance(width, int) and embed is not None and int(embed.shape[0]) != width:
        raise InputError(f"{where}: {arch}.embedding_length is {width}, but token_embd.weight has rows of "
                         f"{int(embed.shape[0])}", hint="re-download or re-export it")
    elements = sum(int(t.n_elements) for t in reader.tensors)
    check_memory(elements * dtype.itemsize, f"dequantizing the weights to {str(dtype).removeprefix('torch.')}",
                 where, "load it in a smaller dtype, or diagnose an HF config.json on the meta device")


__all__ = [
    "available_memory",
    "buffer_budget",
    "check_gguf",
    "check_hf_config",
    "check_hf_dir",
    "check_kv_cache",
    "check_memory",
    "check_meta_checkpoint",
    "check_meta_params",
    "compare_shapes",
    "hf_weight_files",
    "safe_torch_load",
    "safetensors_shapes",
    "weight_shapes",
]
