"""Typed reads of config values, each failure one line naming the file and the field as the user wrote it.

``config.json``, ``params.json`` and GGUF metadata are user input: a value can
be a string, a list, negative, zero or 10^12. ``int(cfg["hidden_size"])``
turns those into a ``ValueError`` traceback, a ``ZeroDivisionError`` three
calls later, or a loop over a billion layers. Every reader takes its sizes
through these functions instead, so the error says ``params.json: n_heads=0
must be a positive integer`` before anything is built. Whether the sizes fit
the weights is checked afterwards from the tensors' headers
(:func:`graphfix.convert.spec.validate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphfix.errors import InputError

#: the largest size any single dimension may have (a tensor dimension is an int64, but no model is this large)
MAX_DIM = 2**31 - 1
_REQUIRED = object()
_ABSENT = object()


def _bad(where: Path | str, key: str, value: Any, want: str) -> InputError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return InputError(f"{where}: {key}={shown} {want}; fix the file or re-download it")


def require_mapping(value: Any, where: Path | str, what: str = "a JSON object") -> Mapping[str, Any]:
    """``value`` itself must be a dict (a config file holding a list or a number is not a config)."""
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: holds a JSON {type(value).__name__}, not {what}; fix the file or re-download it")
    return value


def _present(cfg: Mapping[str, Any], key: str, where: Path | str, field: str, default: Any) -> Any:
    """``cfg[key]``, or ``_ABSENT`` when it is absent or null and has a default (an error when it has none)."""
    value = cfg.get(key)
    if value is not None:
        return value
    if default is _REQUIRED:
        raise InputError(f"{where}: required key {field!r} is missing; this file does not describe a Llama model")
    return _ABSENT


def cfg_int(cfg: Mapping[str, Any], key: str, where: Path | str, *, default: Any = _REQUIRED, minimum: int = 1,
            maximum: int = MAX_DIM, field: str | None = None) -> Any:
    """``cfg[key]`` as an int in ``[minimum, maximum]``; ``default`` when absent or null (required if none given).

    Booleans and strings are refused even when they look like numbers: the
    file's type is wrong and other readers (transformers, Meta's code) would
    choke on it too. A float with an integral value (``4096.0``) is accepted.
    """
    field = field or key
    value = _present(cfg, key, where, field, default)
    if value is _ABSENT:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, field, value, "must be an integer")
    if value < minimum:
        raise _bad(where, field, value, "must be a positive integer" if minimum == 1 else f"must be at least {minimum}")
    if value > maximum:
        raise _bad(where, field, value, f"is too large (at most {maximum})")
    return value


def cfg_float(cfg: Mapping[str, Any], key: str, where: Path | str, *, default: Any = _REQUIRED,
              positive: bool = True, field: str | None = None) -> Any:
    """``cfg[key]`` as a finite float (positive unless told otherwise); ``default`` when absent or null."""
    field = field or key
    value = _present(cfg, key, where, field, default)
    if value is _ABSENT:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, field, value, "must be a finite number")
    if positive and value <= 0:
        raise _bad(where, field, value, "must be positive")
    return float(value)


def cfg_bool(cfg: Mapping[str, Any], key: str, where: Path | str, *, default: bool, field: str | None = None) -> bool:
    """``cfg[key]`` as a bool (``true``/``false``; ``0``/``1`` accepted as older configs write them)."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise _bad(where, field or key, value, "must be true or false")


def token_ids(cfg: Mapping[str, Any], key: str, where: Path | str, vocab: int, *, many: bool = False,
              field: str | None = None) -> Any:
    """A special token id (or, with ``many``, a list of them) inside the vocabulary, or None."""
    value = cfg.get(key)
    if value is None:
        return None
    items = value if many and isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < vocab:
            raise _bad(where, field or key, value, f"must be a token id in the vocabulary (0..{vocab - 1})")
    return value


def check_heads(where: Path | str, fields: Mapping[str, str], *, hidden: int, heads: int, kv_heads: int,
                head_dim: int) -> None:
    """What every Llama needs of its head counts, named in the file's own field names."""
    if heads % kv_heads:
        raise InputError(f"{where}: {fields['num_attention_heads']}={heads} is not a multiple of "
                         f"{fields['num_key_value_heads']}={kv_heads}; grouped-query attention needs it to be")
    if head_dim % 2:
        raise InputError(f"{where}: the head size is {head_dim}, an odd number; RoPE rotates channel pairs, so a "
                         "Llama head size is even")
    if hidden % heads:
        raise InputError(f"{where}: {fields['hidden_size']}={hidden} is not a multiple of "
                         f"{fields['num_attention_heads']}={heads}; transformers and Meta's code both refuse such a "
                         "model")
