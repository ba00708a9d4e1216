"""The sidecar beside a Meta checkpoint: the Hugging Face config that ``params.json`` has no fields for.

Meta's ``params.json`` holds the architecture, but not the context length,
the special token ids (BOS/EOS/PAD), RoPE scaling other than Llama 3.1's, or
anything else a ``config.json`` carries. Without them HF -> Meta -> HF
comes back with ``eos_token_id: null`` (generation runs past the end of turn)
and a guessed ``max_position_embeddings``. So the Meta writer stores the full
HF config in ``graphfix_hf_config.json`` beside params.json, and the Meta
reader takes every field from it, after checking that it describes the same
architecture as params.json and the weights. Meta's own code ignores the file.

A sidecar that does not match (params.json edited, the file copied from
another model) or cannot be read is ignored with a warning that says which
field differs: never used silently, never lost silently.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from graphfix.convert.spec import ModelSpec
from graphfix.errors import GraphfixError

SIDECAR = "graphfix_hf_config.json"
_FORMAT = "graphfix.meta-sidecar/1"
#: fields params.json and the weights fix; the sidecar must agree on all of them
_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size", "head_dim", "rms_norm_eps", "rope_theta")


def write_sidecar(spec: ModelSpec, out: Path, *, dtype: torch.dtype) -> Path:
    """Write the HF config of ``spec`` (the source's own config.json when it had one) beside params.json."""
    from graphfix.convert.formats.hf import hf_config_dict

    doc = {"format": _FORMAT,
           "about": "written by graphfix convert: the Hugging Face config params.json cannot hold (context length, "
                    "special tokens, RoPE); read back when converting to Hugging Face; Meta's code ignores it",
           "hf_config": hf_config_dict(spec, dtype)}
    path = out / SIDECAR
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def apply_sidecar(spec: ModelSpec, folder: Path, notes: list[str]) -> ModelSpec:
    """``spec`` (from params.json and the weights) completed from the sidecar in ``folder``, when it matches.

    Why a sidecar was ignored is appended to ``notes`` (the caller warns once the checkpoint is known valid).
    """
    path = folder / SIDECAR
    if not path.is_file():
        return spec

    def _ignored(path: Path, why: str) -> None:
        notes.append(f"{path}: ignored ({why}); the context length and special token ids come from params.json's "
                     "defaults instead")
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("hf_config"), dict):
            raise ValueError(f"not a {_FORMAT} document")
        from graphfix.convert.formats.hf import spec_from_hf_config

        side = spec_from_hf_config(doc["hf_config"], path)
    except (OSError, ValueError, GraphfixError) as exc:
        _ignored(path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return spec
    for name in _ARCHITECTURE:
        if getattr(side, name) != getattr(spec, name):
            _ignored(path, f"it says {name}={getattr(side, name)!r}, params.json and the weights {getattr(spec, name)!r}")
            return spec
    if spec.rope_scaling and side.rope_scaling != spec.rope_scaling:
        _ignored(path, f"its RoPE scaling {side.rope_scaling} differs from params.json's use_scaled_rope")
        return spec
    if not spec.rope_scaling and side.rope_scaling:
        _ignored(path, f"it has RoPE scaling {side.rope_scaling} but params.json has none")
        return spec
    hf_config: dict[str, Any] = dict(side.hf_config or {})
    return replace(side, tie_word_embeddings=spec.tie_word_embeddings, hf_config=hf_config)

