"""Tokenizer and generation files that travel with the weights.

A converted checkpoint is only usable with the tokenizer it was trained with,
so known tokenizer files are copied verbatim into the output, whichever way the
conversion goes (Meta's code reads ``tokenizer.model``; HF's reads the rest and
ignores what it does not know). GGUF embeds its tokenizer in metadata; there
it is rebuilt with ``transformers`` (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``) and saved in HF's files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

from graphfix.convert.spec import ModelSpec
from graphfix.errors import InputError

SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def side_files(folder: Path) -> list[Path]:
    """The tokenizer/generation files present in ``folder``."""
    return [folder / n for n in SIDE_FILES if (folder / n).is_file()]


def copy_side_files(files: list[Path], out: Path) -> list[str]:
    """Copy ``files`` into ``out``; returns the names copied."""
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise InputError(f"{f}: cannot read ({exc.strerror}); check its permissions or remove it") from None
        (out / f.name).write_bytes(data)  # a failure here is the destination's: the caller reports it
    return [f.name for f in files]


def write_generation_config(spec: ModelSpec, out: Path) -> Path | None:
    """``generation_config.json`` with the special token ids, unless ``out`` has one already.

    A GGUF keeps BOS/EOS/PAD in its metadata; transformers' ``generate()``
    and graphfix's read them from ``generation_config.json`` (or derive it from
    config.json), and without an EOS generation runs past the end of a turn.
    """
    path = out / "generation_config.json"
    ids = {k: getattr(spec, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if path.exists() or all(v is None for v in ids.values()):
        return None
    path.write_text(json.dumps({k: v for k, v in ids.items() if v is not None}, indent=2) + "\n")
    return path


def gguf_tokenizer_exporter(path: Path) -> Callable[[Path], list[str]]:
    """A callable that writes the GGUF's embedded tokenizer as HF tokenizer files into a folder."""

    def export(out: Path) -> list[str]:
        before = {p.name for p in out.iterdir()}
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tok.save_pretrained(str(out))
        except Exception as exc:  # noqa: BLE001 - the weights are still valid without a tokenizer
            warnings.warn(f"{path}: could not export the embedded tokenizer ({str(exc).splitlines()[0]}); "
                          "the converted weights have no tokenizer files", stacklevel=2)
            return []
        return sorted({p.name for p in out.iterdir()} - before)

    return export
