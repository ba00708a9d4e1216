"""The canonical model description every reader produces and every writer consumes.

Converting between N formats pairwise needs N*N code paths; going through one
canonical form needs 2*N. The canonical form is the Hugging Face one: HF tensor
names (``model.layers.0.self_attn.q_proj.weight``), HF's RoPE layout for the Q
and K projections ("rotate-half", not Meta's interleaved pairs) and the fields
of a ``LlamaConfig``. Readers translate into it, writers translate out of it.

Tensors are described by ``TensorEntry``: a name, a shape, a dtype and a
``load`` callable. Nothing is read until a writer calls ``load``, which is what
keeps peak memory at about one tensor regardless of model size.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphfix.errors import InputError, UnsupportedModelError

#: dtypes a checkpoint tensor may have; anything else (int8, fp8, ...) is refused.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: ``--dtype`` choices mapped to torch dtypes (``keep`` maps to None).
DTYPE_CHOICES: dict[str, torch.dtype | None] = {
    "keep": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """Turn a ``--dtype`` value into a torch dtype (None means keep the source's)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in FLOAT_DTYPES:
            raise InputError(f"dtype {value} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return value
    key = str(value).lower().removeprefix("torch.")
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    key = aliases.get(key, key)
    if key not in DTYPE_CHOICES:
        raise InputError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[key]


@dataclass
class ModelSpec:
    """Architecture of a Llama-style decoder, in Hugging Face terms.

    ``rope_scaling`` is None or a dict in HF's ``rope_parameters`` spelling
    without ``rope_theta`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``).
    ``hf_config`` keeps the original ``config.json`` when the source was HF, so
    an HF-to-HF conversion does not lose fields graphfix does not model.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    head_dim: int | None = None
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"model config has {name}={value!r}; it must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; such a model is not Llama-style"
            )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every canonical (HF) tensor name with the shape the config implies, in file order."""
        h, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (self.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (self.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, self.intermediate_size)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes


@dataclass
class TensorEntry:
    """One tensor of a checkpoint, not yet read.

    ``load(dtype)`` returns a tensor the caller owns (never a view into a
    memory map), already converted to ``dtype`` when one is given, so writers
    can free it as soon as it is written.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[torch.dtype | None], torch.Tensor]
    source: str = ""

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


@dataclass
class Checkpoint:
    """An opened source: its spec, its tensors in canonical form, and side files.

    ``side_files`` are files copied verbatim to the output (tokenizer,
    generation config). ``export_tokenizer`` writes tokenizer files that must
    be generated rather than copied (GGUF's embedded tokenizer).
    """

    format: str
    path: Path
    spec: ModelSpec
    tensors: dict[str, TensorEntry]
    side_files: list[Path] = field(default_factory=list)
    export_tokenizer: Callable[[Path], list[str]] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: number of model-parallel files the source had (Meta only), for information
    source_shards: int = 1
    #: the file the spec was read from (config.json, params.json, the .gguf), for error messages
    config_path: Path | None = None
    #: canonical field name -> the name the source's config uses (``hidden_size`` -> ``dim``), for error messages
    fields: dict[str, str] = field(default_factory=dict)
    #: warnings found while opening, given by :func:`validate` once the checkpoint is known to be sound
    #: (a warning followed by an error would be two lines for one problem)
    notes: list[str] = field(default_factory=list)

    def field_name(self, canonical: str) -> str:
        """The source config's own name for ``canonical`` (``num_attention_heads`` is ``n_heads`` in params.json)."""
        return self.fields.get(canonical, canonical)

    def close(self) -> None:
        """Release file handles and memory maps the reader holds."""
        while self.closers:
            self.closers.pop()()

    def __enter__(self) -> Checkpoint:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.tensors.values())


def validate(ckpt: Checkpoint) -> None:
    """Check every tensor's name, shape and dtype against the spec before anything is written.

    Doing this up front, from metadata alone, means a checkpoint that does not
    match its own config fails in a second, not after writing 100 GB.
    """
    where = ckpt.path
    _check_layer_count(ckpt)
    expected = ckpt.spec.expected_shapes()
    unexpected = [n for n in ckpt.tensors if n not in expected]
    if unexpected:
        first = ckpt.tensors[unexpected[0]]
        raise UnsupportedModelError(
            f"{first.source or where}: tensor {unexpected[0]!r} is not part of a Llama model "
            f"({len(unexpected)} such tensors); only plain Llama checkpoints (no biases, adapters or MoE) convert"
        )
    missing = [n for n in expected if n not in ckpt.tensors]
    if missing:
        raise InputError(
            f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
            "the checkpoint is incomplete or a shard is missing: re-download it"
        )
    for name, shape in expected.items():
        entry = ckpt.tensors[name]
        if tuple(entry.shape) != shape:
            config = ckpt.config_path.name if ckpt.config_path else "the config"
            raise InputError(
                f"{entry.source or where}: tensor {name!r} has shape {list(entry.shape)} but {config} "
                f"implies {list(shape)}; the config and the weights do not belong together"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"{entry.source or where}: tensor {name!r} has dtype {entry.dtype}; "
                "only float32, float16 and bfloat16 weights convert (dequantize it first)"
            )
    # keep canonical order: writers emit tensors in the order expected_shapes gives
    ckpt.tensors = {name: ckpt.tensors[name] for name in expected}
    while ckpt.notes:
        warnings.warn(ckpt.notes.pop(0), stacklevel=2)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _check_layer_count(ckpt: Checkpoint) -> None:
    """The config's layer count must be the weights' (checked first: it sizes everything built after)."""
    present = {int(m.group(1)) for m in map(_LAYER.match, ckpt.tensors) if m}
    want = ckpt.spec.num_hidden_layers
    have = max(present) + 1 if present else 0
    if want != have:
        config = ckpt.config_path or ckpt.path
        layers = f"model.layers.0-{have - 1} in canonical names" if have else "no layer tensors"
        raise InputError(f"{config}: {ckpt.field_name('num_hidden_layers')}={want} but the weights have {have} "
                         f"layers ({layers}); the config does not belong to these weights or tensors are missing")
