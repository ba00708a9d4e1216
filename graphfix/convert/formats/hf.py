"""Hugging Face format: ``config.json`` plus ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.

This is also the canonical form, so reading is a matter of checking the
config is a plain Llama and mapping every tensor to its file; writing lays out
shards of at most ``max_shard_bytes`` (or exactly ``shards`` files) and streams
each tensor into place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from graphfix.convert.checks import cfg_bool, cfg_float, cfg_int, check_heads, require_mapping, token_ids
from graphfix.convert.formats.safetensors_io import SafetensorsWriter, StTensor, read_index, read_tensor
from graphfix.convert.progress import Progress
from graphfix.convert.spec import Checkpoint, ModelSpec, TensorEntry
from graphfix.convert.tokenizer import side_files
from graphfix.errors import InputError, UnsupportedModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({str(exc).splitlines()[0]}); fix or re-download it") from None


def spec_from_hf_config(cfg: Any, where: Path) -> ModelSpec:
    """The canonical spec for an HF Llama ``config.json`` (old ``rope_theta``/``rope_scaling`` or new ``rope_parameters``).

    Every size is type- and range-checked here (one line naming ``where`` and
    the key); whether the sizes fit the weights is checked from their headers.
    """
    cfg = require_mapping(cfg, where)
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported; only Llama checkpoints convert")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise UnsupportedModelError(f"{where}: {key}={cfg[key]!r} is not plain Llama; such models do not convert")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None:
            require_mapping(cfg[key], f"{where}: {key}", "an object")
    rp = dict(cfg.get("rope_parameters") or {})
    theta = cfg_float({"rope_theta": rp.pop("rope_theta", cfg.get("rope_theta"))}, "rope_theta", where,
                      default=10000.0)
    scaling = cfg.get("rope_scaling") or rp or None
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if kind == "default" else {"rope_type": kind, **{k: v for k, v in scaling.items()
                                                                        if k not in ("type", "rope_type")}}
    hidden = cfg_int(cfg, "hidden_size", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    kv_heads = cfg_int(cfg, "num_key_value_heads", where, default=heads)
    head_dim = cfg_int(cfg, "head_dim", where, default=hidden // heads)
    check_heads(where, HF_FIELDS, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    vocab = cfg_int(cfg, "vocab_size", where)
    return ModelSpec(
        hidden_size=hidden,
        num_hidden_layers=cfg_int(cfg, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=cfg_int(cfg, "intermediate_size", where),
        vocab_size=vocab,
        rms_norm_eps=cfg_float(cfg, "rms_norm_eps", where, default=1e-6),
        rope_theta=theta,
        head_dim=head_dim,
        rope_scaling=scaling,
        tie_word_embeddings=cfg_bool(cfg, "tie_word_embeddings", where, default=False),
        max_position_embeddings=cfg_int(cfg, "max_position_embeddings", where, default=2048),
        bos_token_id=token_ids(cfg, "bos_token_id", where, vocab),
        eos_token_id=token_ids(cfg, "eos_token_id", where, vocab, many=True),
        pad_token_id=token_ids(cfg, "pad_token_id", where, vocab),
        hf_config=dict(cfg),
    )


#: HF's field names are the canonical ones
HF_FIELDS = {name: name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "vocab_size")}


def _shard_name(fname: Any, index_path: Path) -> str:
    """A ``weight_map`` file name, refused when it could point outside the checkpoint folder."""
    if not isinstance(fname, str) or not fname:
        raise InputError(f"{index_path}: weight_map holds {fname!r} where a file name belongs; fix or re-download it")
    pure = PurePosixPath(fname.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or PureWindowsPath(fname).drive:
        raise InputError(f"{index_path}: weight_map names {fname!r}, outside the checkpoint folder; shards must be "
                         "files inside it, so this index was refused")
    return fname


def open_hf(folder: Path) -> Checkpoint:
    """Open an HF checkpoint folder; every shard is located and its header checked before returning."""
    spec = spec_from_hf_config(_read_json(folder / "config.json"), folder / "config.json")
    index_path = folder / INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: has no weight_map; fix or re-download it")
        weight_map = {str(k): _shard_name(v, index_path) for k, v in weight_map.items()}
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        weight_map, files = None, [SINGLE]
    else:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {other[0]}; only safetensors weights are read)" if other else ""
        raise InputError(f"{folder}: no {SINGLE} or {INDEX}{hint}; convert the weights to safetensors first")
    located: dict[str, StTensor] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise InputError(f"{path}: shard listed in {INDEX} is missing; re-download the checkpoint")
        tensors, _ = read_index(path)
        for name, t in tensors.items():
            if weight_map is None or weight_map.get(name) == fname:
                located[name] = t
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in located:
                raise InputError(f"{folder / fname}: does not contain {name!r} although {INDEX} says it does; "
                                 "re-download the checkpoint")
    entries: dict[str, TensorEntry] = {}
    for name, t in located.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some old checkpoints saved
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue  # tied: the embedding is the output projection
        entries[name] = TensorEntry(name, t.shape, t.dtype, partial(_load, t), source=str(t.path))
    return Checkpoint("hf", folder, spec, entries, side_files=side_files(folder), config_path=folder / "config.json",
                      fields=HF_FIELDS)


def _load(t: StTensor, dtype: torch.dtype | None) -> torch.Tensor:
    out = read_tensor(t)
    return out if dtype is None or dtype == out.dtype else out.to(dtype)


def hf_config_dict(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents: the source's own when it was HF, else a fresh ``LlamaConfig``."""
    dtype_name = str(dtype).removeprefix("torch.")
    if spec.hf_config is not None:
        cfg = dict(spec.hf_config)
        cfg["torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"] = dtype_name
        cfg["tie_word_embeddings"] = spec.tie_word_embeddings
        return cfg
    from transformers import LlamaConfig

    try:
        with _transformers_quiet():
            cfg = LlamaConfig(
                hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
                num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                head_dim=spec.head_dim, intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
                rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling,
                tie_word_embeddings=spec.tie_word_embeddings, max_position_embeddings=spec.max_position_embeddings,
                bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id, pad_token_id=spec.pad_token_id,
                architectures=["LlamaForCausalLM"],
            ).to_dict()
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types
        raise UnsupportedModelError(f"transformers refuses this model's config ({_last_line(exc)}); "
                                    "it cannot be written as a Hugging Face checkpoint") from None
    cfg["dtype"] = dtype_name
    return cfg


def check_hf_config(cfg: dict[str, Any], where: Path) -> None:
    """Refuse, before writing, a config.json that transformers would refuse to load (its own validators judge)."""
    from transformers import LlamaConfig

    try:
        with _transformers_quiet():
            LlamaConfig.from_dict(dict(cfg))
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types
        raise UnsupportedModelError(f"{where}: transformers would refuse the converted config ({_last_line(exc)}); "
                                    "fix the source config") from None


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """Silence transformers' logger while graphfix builds configs only to check them (errors still raise)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _last_line(exc: BaseException) -> str:
    """The informative line of a (possibly multi-line) exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def plan_shards(sizes: Sequence[int], *, shards: int | None, max_shard_bytes: int) -> list[int]:
    """Shard number for each tensor: greedy up to ``max_shard_bytes``, or about ``shards`` equal-byte groups.

    With ``shards`` a tensor goes to the group its midpoint falls in, so there
    are at most ``shards`` files (fewer only if there are fewer tensors).
    """
    out: list[int] = []
    if shards is not None:
        total, acc = sum(sizes) or 1, 0
        for n in sizes:
            out.append(min(int((acc + n / 2) * shards / total), shards - 1))
            acc += n
        renumber = {s: i for i, s in enumerate(sorted(set(out)))}
        return [renumber[s] for s in out]
    shard, acc = 0, 0
    for n in sizes:
        if acc and acc + n > max_shard_bytes:
            shard, acc = shard + 1, 0
        out.append(shard)
        acc += n
    return out


def write_hf(ckpt: Checkpoint, out: Path, *, dtype: torch.dtype | None, shards: int | None = None,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: Progress | None = None) -> list[Path]:
    """Write ``config.json`` and safetensors (one file, or shards plus an index) into ``out``."""
    if shards is not None and shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    entries = list(ckpt.tensors.values())
    dtypes = [dtype or e.dtype for e in entries]
    sizes = [e.nbytes // e.dtype.itemsize * d.itemsize for e, d in zip(entries, dtypes)]
    assign = plan_shards(sizes, shards=shards, max_shard_bytes=max_shard_bytes)
    count = max(assign) + 1
    names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    paths = [out / n for n in names]
    for i, path in enumerate(paths):
        members = [k for k, s in enumerate(assign) if s == i]
        writer = SafetensorsWriter(path, [(entries[k].name, entries[k].shape, dtypes[k]) for k in members])
        try:
            for k in members:
                t = entries[k].load(dtype)
                writer.write(entries[k].name, t)
                if progress:
                    progress.update(entries[k].name, sizes[k])
                del t
        except BaseException:
            writer.abandon()  # no half-open file flushed later by the garbage collector
            raise
        writer.close()
    if count > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {e.name: names[s] for e, s in zip(entries, assign)}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    by_dtype: dict[torch.dtype, int] = {}
    for d, n in zip(dtypes, sizes):
        by_dtype[d] = by_dtype.get(d, 0) + n
    main_dtype = max(by_dtype, key=lambda d: by_dtype[d])
    (out / "config.json").write_text(json.dumps(hf_config_dict(ckpt.spec, main_dtype), indent=2) + "\n")
    return paths
