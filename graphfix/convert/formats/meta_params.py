"""Translate between Meta's ``params.json`` and the canonical :class:`ModelSpec`.

Meta's reference code does not store the MLP width; it recomputes it from
``dim``, ``multiple_of`` and ``ffn_dim_multiplier`` (``FeedForward.__init__``
in llama_models/llama3/model.py). A params.json that does not reproduce the
HF ``intermediate_size`` exactly would build a model whose shapes do not fit
the weights, so :func:`solve_ffn` searches for values that do, preferring the
ones Meta's own releases use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphfix.convert.checks import cfg_bool, cfg_float, cfg_int, check_heads, require_mapping
from graphfix.convert.spec import ModelSpec
from graphfix.errors import InputError, UnsupportedModelError

#: The only RoPE scaling Meta's reference code implements (``apply_scaling``:
#: Llama 3.1's constants are hard-coded), enabled by ``use_scaled_rope``.
META_LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_MULTIPLES = (256, 1024, 4096, 512, 2048, 128, 64, 32, 16, 8, 4, 2, 1)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The MLP width Meta's ``FeedForward`` builds (same arithmetic, same float rounding)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def solve_ffn(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` for which Meta's formula gives ``intermediate_size``."""
    for m in _MULTIPLES:
        if ffn_hidden_dim(dim, m, None) == intermediate_size:
            return m, None
    base = int(2 * (4 * dim) / 3)
    if base > 0:
        ratio = intermediate_size / base
        for m in _MULTIPLES:
            if intermediate_size % m:
                continue
            for digits in range(1, 10):
                mult = round(ratio, digits)
                if ffn_hidden_dim(dim, m, mult) == intermediate_size:
                    return m, mult
        for mult in ((intermediate_size + 0.5) / base, (intermediate_size + 0.25) / base):
            if ffn_hidden_dim(dim, 1, mult) == intermediate_size:
                return 1, mult
    raise UnsupportedModelError(
        f"intermediate_size={intermediate_size} cannot be expressed with Meta's multiple_of/ffn_dim_multiplier "
        f"for dim={dim}; convert to Hugging Face format instead"
    )


def spec_to_params(spec: ModelSpec) -> dict[str, Any]:
    """params.json for ``spec``; raises UnsupportedModelError for what Meta's code cannot express."""
    if spec.hidden_size % spec.num_attention_heads or spec.head_dim != spec.hidden_size // spec.num_attention_heads:
        raise UnsupportedModelError(
            f"head_dim={spec.head_dim} differs from hidden_size/num_attention_heads, which Meta's code assumes; "
            "convert to Hugging Face format instead"
        )
    use_scaled = False
    if spec.rope_scaling:
        got = {k: spec.rope_scaling.get(k) for k in META_LLAMA3_SCALING}
        if got != META_LLAMA3_SCALING:
            raise UnsupportedModelError(
                f"RoPE scaling {spec.rope_scaling} cannot be expressed in params.json (Meta's code only has "
                "Llama 3.1's fixed llama3 scaling); convert to Hugging Face format instead"
            )
        use_scaled = True
    multiple_of, mult = solve_ffn(spec.hidden_size, spec.intermediate_size)
    params: dict[str, Any] = {
        "dim": spec.hidden_size,
        "n_layers": spec.num_hidden_layers,
        "n_heads": spec.num_attention_heads,
        "n_kv_heads": spec.num_key_value_heads,
        "vocab_size": spec.vocab_size,
        "multiple_of": multiple_of,
    }
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    params.update(norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, use_scaled_rope=use_scaled)
    return params


#: canonical (HF) field -> params.json key, for error messages
META_FIELDS = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
               "num_key_value_heads": "n_kv_heads", "vocab_size": "vocab_size",
               "intermediate_size": "dim/multiple_of/ffn_dim_multiplier", "rms_norm_eps": "norm_eps"}


def check_params(params: Any, path: Path) -> None:
    """Type- and range-check every params.json value graphfix or Meta's code uses (one line naming the key).

    ``vocab_size`` may be -1 (Llama 1/2: taken from the tokenizer, here from
    the weights). ``max_seq_len``/``max_batch_size`` are runtime settings some
    files carry; their size against memory is checked where a model is built
    (:func:`graphfix.diagnose.meta_loader.validate_meta_checkpoint`).
    """
    params = require_mapping(params, path)
    dim = cfg_int(params, "dim", path)
    heads = cfg_int(params, "n_heads", path)
    cfg_int(params, "n_layers", path)
    kv = cfg_int(params, "n_kv_heads", path, default=heads)
    vocab = cfg_int(params, "vocab_size", path, default=-1, minimum=-1)
    if vocab == 0:
        raise InputError(f"{path}: vocab_size=0 must be positive (or -1: taken from the weights); fix the file")
    cfg_int(params, "multiple_of", path, default=256)
    cfg_float(params, "ffn_dim_multiplier", path, default=None)
    cfg_float(params, "norm_eps", path, default=1e-5)
    cfg_float(params, "rope_theta", path, default=10000.0)
    cfg_bool(params, "use_scaled_rope", path, default=False)
    for key in ("max_seq_len", "max_batch_size"):
        cfg_int(params, key, path, default=None)
    check_heads(path, META_FIELDS, hidden=dim, heads=heads, kv_heads=kv, head_dim=dim // heads)


def params_to_spec(params: dict[str, Any], *, vocab_rows: int, ffn_rows: int, tied: bool,
                   where: Path | str = "params.json") -> ModelSpec:
    """The spec a params.json describes; ``vocab_rows``/``ffn_rows`` come from the weights' shapes.

    A missing ``rope_theta`` means 10000 (Llama 1 and 2 did not store it), as in
    transformers' own Meta conversion script. Meta's format has no field for
    the context length, so it is guessed from the RoPE settings here; the
    sidecar graphfix writes beside params.json (:mod:`.sidecar`) replaces the
    guess with the real value when there is one.
    """
    dim, n_heads = cfg_int(params, "dim", where), cfg_int(params, "n_heads", where)
    vocab = cfg_int(params, "vocab_size", where, default=-1, minimum=-1)
    use_scaled = cfg_bool(params, "use_scaled_rope", where, default=False)
    theta = cfg_float(params, "rope_theta", where, default=10000.0)
    return ModelSpec(
        hidden_size=dim,
        num_hidden_layers=cfg_int(params, "n_layers", where),
        num_attention_heads=n_heads,
        num_key_value_heads=cfg_int(params, "n_kv_heads", where, default=n_heads),
        intermediate_size=ffn_rows,
        vocab_size=vocab if vocab > 0 else vocab_rows,
        rms_norm_eps=cfg_float(params, "norm_eps", where, default=1e-5),
        rope_theta=theta,
        rope_scaling=dict(META_LLAMA3_SCALING) if use_scaled else None,
        tie_word_embeddings=tied,
        max_position_embeddings=131072 if use_scaled else (8192 if theta >= 500000 else 4096),
    )
