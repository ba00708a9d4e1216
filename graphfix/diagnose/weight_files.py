"""Reading what weight files hold without loading them: tensor names and shapes from safetensors headers and
memory-mapped ``torch.load``, the weight files of an HF folder, and a safe ``torch.load``.

Apart from ``validate.py`` (which compares those shapes with what a config implies) so that the readers,
which touch untrusted files, sit in one small module: nothing here unpickles beyond plain tensors
(``weights_only=True``), and a header is bounded before it is parsed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from graphfix.errors import InputError

MiB = 2**20
MAX_HEADER_BYTES = 100 * MiB
"""A safetensors header larger than this is a corrupt length field, not metadata."""
MAX_VALUE = 2**40
"""The largest dimension or config value taken at face value."""
Shapes = dict[str, tuple[int, ...]]


def safetensors_shapes(path: Path) -> Shapes:
    """Tensor names and shapes from a safetensors header (bounded; the tensors are not read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise InputError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)",
                                 hint="re-download or re-export the weights")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: unreadable safetensors header ({type(exc).__name__})",
                         hint="re-download or re-export the weights") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (the header is not an object)")
    shapes: Shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d <= MAX_VALUE for d in shape):
            raise InputError(f"{path}: tensor {name!r} has no valid shape in the header",
                             hint="re-download or re-export the weights")
        shapes[name] = tuple(shape)
    return shapes


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from ``folder``, with the index's entries checked."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        from graphfix.diagnose.sources import read_json

        data = read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: weight_map is missing or empty", hint="re-download the index file")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or not re.fullmatch(r"[^/\\]+\.safetensors", name) or name.startswith("."):
                raise InputError(f"{index}: weight_map names {name!r}, not a .safetensors file in {folder}",
                                 hint="an index may only name files beside it; re-download the index file")
            if not (folder / name).is_file():
                raise InputError(f"{index}: weight_map names {name}, which is not in {folder}",
                                 hint="re-download the missing shard")
            files.append(folder / name)
        return files
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("*.bin"))


def torch_file_shapes(path: Path) -> Shapes:
    """Names and shapes of a ``torch.save``'d state dict, memory-mapped (nothing read, no code run)."""
    state = safe_torch_load(path)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of a library's message: torch goes on with advice (``weights_only=False``,
    ``add_safe_globals``, "report a bug") that would be wrong for a checkpoint graphfix refused."""
    line = (text.strip().splitlines() or [""])[0]
    end = line.find(". ")
    return (line[:end + 1] if end >= 0 else line)[:limit]


def safe_torch_load(path: Path) -> dict[str, Any]:
    """``torch.load(mmap=True, weights_only=True)`` with one-line errors; a pickle that holds code is refused."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(GLOBAL|Unsupported global|unsupported)[^\n]*", str(exc))
        detail = f" ({first_sentence(found.group(0))})" if found else ""
        raise InputError(f"{path}: refused, the file holds Python objects other than tensors{detail}",
                         hint="graphfix never runs code from a checkpoint; re-save it as a plain state dict "
                              "or as safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = first_sentence(str(exc)) or type(exc).__name__
        raise InputError(f"{path}: not a readable checkpoint ({first})",
                         hint="the file is truncated or corrupt; re-download it") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def weight_shapes(files: list[Path]) -> Shapes:
    shapes: Shapes = {}
    for f in files:
        shapes.update(safetensors_shapes(f) if f.suffix == ".safetensors" else torch_file_shapes(f))
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
