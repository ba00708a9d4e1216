"""``convert()``: open a source, check it, write the target format atomically.

The steps are ordered so that everything that can be checked cheaply is
checked before the first byte is written: the source's headers and config,
every tensor's name/shape/dtype, the destination, and whether the target
format can express the model at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from graphfix.convert.atomic import atomic_dir, check_destination
from graphfix.convert.detect import open_checkpoint
from graphfix.convert.formats.hf import DEFAULT_MAX_SHARD_BYTES, check_hf_config, hf_config_dict, write_hf
from graphfix.convert.formats.meta import check_shards, write_meta
from graphfix.convert.formats.meta_params import spec_to_params
from graphfix.convert.progress import Progress
from graphfix.convert.spec import Checkpoint, parse_dtype, validate
from graphfix.convert.tokenizer import copy_side_files, write_generation_config
from graphfix.errors import GraphfixError, InputError

TARGETS = ("hf", "meta")


def parse_size(value: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units, like HF's ``max_shard_size``)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise InputError(f"cannot read size {value!r}; write it like 5GB or 500MB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def convert(src: str | Path, dst: str | Path, to: str = "hf", *, shards: int | None = None,
            dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = True,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES, quantize: str | None = None,
            quantize_lm_head: bool = False) -> Path:
    """Convert the checkpoint at ``src`` (HF, Meta or GGUF) into format ``to`` at ``dst``; returns ``dst``.

    ``shards``: for ``meta``, the model-parallel rank count (default 1); for
    ``hf``, the number of safetensors files (default: as many as needed for
    ``max_shard_size`` each). ``dtype``: keep/float32/bfloat16/float16.
    ``progress``: show a progress line on stderr when it is a terminal, and
    say when stale temp folders of interrupted runs are removed.
    The source is only read; ``dst`` appears complete or not at all, and an
    existing ``dst`` is left exactly as it was when anything fails.
    ``quantize``: ``int8`` / ``int4`` / ``int4:64`` writes an ``hf`` folder of packed weights
    (``graphfix.quant.checkpoint``; ``quantize_lm_head`` includes the LM head).
    """
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise InputError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    out_dtype = parse_dtype(dtype)
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise InputError(f"shards must be a positive integer, got {shards!r}")
    max_bytes = parse_size(max_shard_size)
    scheme = None
    if quantize:
        from graphfix.quant.scheme import parse_scheme

        scheme = parse_scheme(quantize)
        if to != "hf":
            raise InputError("--quantize writes a Hugging Face folder of packed weights; use --to hf")
    with open_checkpoint(src) as ckpt:
        validate(ckpt)
        check_target(ckpt, to, shards=shards or 1)
        check_destination(src, dst, overwrite=overwrite)
        entries = list(ckpt.tensors.values())
        if to == "meta" and ckpt.spec.tie_word_embeddings:  # Meta gets a separate copy of the embedding
            entries.append(ckpt.tensors["model.embed_tokens.weight"])
        total = sum(e.nbytes // e.dtype.itemsize * (out_dtype or e.dtype).itemsize for e in entries)
        needed = total + sum(f.stat().st_size for f in ckpt.side_files) + 2**20
        bar = Progress(len(entries), total, enabled=progress, label=f"{ckpt.format}->{to} ")
        try:
            with atomic_dir(dst, overwrite=overwrite, needed_bytes=needed, verbose=progress) as tmp:
                if scheme is not None:
                    from graphfix.quant.checkpoint import write_quantized_hf

                    write_quantized_hf(ckpt, tmp, scheme, dtype=out_dtype, lm_head=quantize_lm_head, progress=bar)
                elif to == "hf":
                    write_hf(ckpt, tmp, dtype=out_dtype, shards=shards, max_shard_bytes=max_bytes, progress=bar)
                else:
                    write_meta(ckpt, tmp, dtype=out_dtype, shards=shards or 1, progress=bar)
                copy_side_files([f for f in ckpt.side_files if not (tmp / f.name).exists()], tmp)
                if ckpt.export_tokenizer is not None:
                    ckpt.export_tokenizer(tmp)
                if ckpt.format == "gguf":
                    write_generation_config(ckpt.spec, tmp)
        finally:
            bar.close()
    return dst


def check_target(ckpt: Checkpoint, to: str, *, shards: int = 1) -> None:
    """Refuse, before anything is written, a model the target format (or transformers) cannot express.

    Both targets write a Hugging Face config (``config.json``, or the Meta
    sidecar that carries it), so it is built here and judged by transformers'
    own validators: a checkpoint transformers refuses to load is never written.
    """
    where = ckpt.config_path or ckpt.path
    spec = ckpt.spec
    if to == "meta":  # fail on what Meta cannot express before creating anything
        try:
            params = spec_to_params(spec)
        except GraphfixError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        check_shards(params, spec.intermediate_size, shards)
    try:
        cfg = hf_config_dict(spec, torch.float32)
    except GraphfixError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    check_hf_config(cfg, where)
