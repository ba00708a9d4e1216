"""Decide which reader a source path needs, from what is on disk rather than from flags.

Users point at whatever they downloaded; the layout says what it is: a folder
with ``config.json`` is Hugging Face, one with ``params.json`` is Meta, a file
starting with the ``GGUF`` magic is GGUF.
"""

from __future__ import annotations

from pathlib import Path

from graphfix.convert.spec import Checkpoint
from graphfix.errors import InputError

_WHAT = "pass a Hugging Face folder (config.json), a Meta folder (params.json) or a .gguf file"


def detect_format(src: Path) -> tuple[str, Path]:
    """``("hf" | "meta" | "gguf", path to open)`` for ``src``, or an InputError saying what was expected."""
    if not src.exists():
        raise InputError(f"{src}: no such file or folder; {_WHAT}")
    if src.is_file():
        try:
            with open(src, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise InputError(f"{src}: cannot read ({exc.strerror}); check its permissions") from None
        if magic == b"GGUF":
            return "gguf", src
        if src.suffix == ".gguf":
            raise InputError(f"{src}: not a GGUF file (bad magic {magic!r}); it is corrupt: re-download it")
        raise InputError(f"{src}: not a checkpoint file; {_WHAT}")
    if (src / "config.json").is_file():
        return "hf", src
    if (src / "params.json").is_file():
        return "meta", src
    ggufs = sorted(src.glob("*.gguf"))
    if len(ggufs) == 1:
        return detect_format(ggufs[0])
    if ggufs:
        raise InputError(f"{src}: holds {len(ggufs)} .gguf files; pass the one to convert")
    raise InputError(f"{src}: has no config.json, params.json or .gguf file; {_WHAT}")


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Open any supported checkpoint as a canonical :class:`Checkpoint` (nothing is read but headers)."""
    fmt, path = detect_format(Path(src))
    if fmt == "hf":
        from graphfix.convert.formats.hf import open_hf

        return open_hf(path)
    if fmt == "meta":
        from graphfix.convert.formats.meta import open_meta

        return open_meta(path)
    from graphfix.convert.formats.gguf import open_gguf

    return open_gguf(path)
