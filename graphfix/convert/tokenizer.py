"""Tokenizer and generation files that travel with the weights.

A converted checkpoint is only usable with the tokenizer it was trained with,
so known tokenizer files are copied verbatim into the output, whichever way the
conversion goes (Meta's code reads ``tokenizer.model``; HF's reads the rest and
ignores what it does not know). GGUF embeds its tokenizer in metadata; there
it is rebuilt with ``transformers`` (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``) and saved in HF's files.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

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
        shutil.copyfile(f, out / f.name)
    return [f.name for f in files]


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
