"""Checkpoint conversion between Hugging Face, Meta and GGUF (read-only) Llama checkpoints.

Every reader turns its format into one canonical form (HF names, HF RoPE
layout, a :class:`~graphfix.convert.spec.ModelSpec`) of lazily loaded tensors,
and every writer consumes that form, streaming one tensor at a time into a
temporary folder that is renamed into place when complete.

    >>> from graphfix.convert import convert
    >>> convert("Llama-3.1-8B", "llama-meta", to="meta")  # doctest: +SKIP
"""

from graphfix.convert.api import convert
from graphfix.convert.detect import detect_format, open_checkpoint
from graphfix.convert.spec import Checkpoint, ModelSpec, TensorEntry

__all__ = ["Checkpoint", "ModelSpec", "TensorEntry", "convert", "detect_format", "open_checkpoint"]
