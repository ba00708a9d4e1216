"""Reading and writing safetensors files one tensor at a time.

The ``safetensors`` package loads or saves whole files; a streaming converter
needs to read one tensor and to write a file whose tensors arrive one by one.
The format is small (8-byte little-endian header length, a JSON header with
each tensor's dtype, shape and byte range, then the raw bytes), so this module
handles it directly:

* reading uses positioned reads straight into a fresh tensor, so nothing stays
  mapped or resident after the tensor is released;
* writing lays out the header from the planned shapes first, then appends each
  tensor's bytes as it comes, so peak memory is one tensor, not one shard.

Files are still validated with ``safetensors.safe_open`` on open, so anything
the reference parser rejects is rejected here too.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from graphfix.errors import InputError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 256 * 1024 * 1024


@dataclass(frozen=True)
class StTensor:
    """Where one tensor lives in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: corrupt safetensors file ({why}); re-download or re-create it")


def read_index(path: Path) -> tuple[dict[str, StTensor], dict[str, str]]:
    """Parse and check a safetensors header; return its tensors and its ``__metadata__``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, too short for a header")
            hlen = int.from_bytes(head, "little")
            if hlen > min(_MAX_HEADER, size - 8):
                raise _corrupt(path, f"header length {hlen} exceeds the file")
            raw = f.read(hlen)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    _check_with_reference(path)
    data_start = 8 + hlen
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, StTensor] = {}
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for tensor {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0 or data_start + end > size:
            raise _corrupt(path, f"tensor {name!r} byte range {begin}..{end} does not fit the file")
        tensors[name] = StTensor(path, name, dtype, shape, data_start + begin, end - begin)
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _check_with_reference(path: Path) -> None:
    """Let the safetensors library judge the file too (it checks things this parser does not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable under a stable name
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _corrupt(path, msg) from None


def read_tensor(t: StTensor, rows: slice | None = None) -> torch.Tensor:
    """Read ``t`` (or a range of its first dimension) into a new tensor with positioned reads."""
    start, nbytes, shape = t.start, t.nbytes, list(t.shape)
    if rows is not None and shape:
        r0, r1, _ = rows.indices(shape[0])
        row_bytes = nbytes // shape[0] if shape[0] else 0
        start, nbytes, shape[0] = start + r0 * row_bytes, (r1 - r0) * row_bytes, r1 - r0
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fd = os.open(t.path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:done + _CHUNK]], start + done)
            if n <= 0:
                raise _corrupt(t.path, f"file ends inside tensor {t.name!r}")
            done += n
    finally:
        os.close(fd)
    return buf.view(t.dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without copying when it is contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write one safetensors file whose tensors are planned up front and supplied one at a time."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dtype in plan:
            numel = 1
            for d in shape:
                numel *= d
            n = numel * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, tuple(shape), dtype, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close() or abandon()
        try:
            self._f.write(len(raw).to_bytes(8, "little"))
            self._f.write(raw)
        except BaseException:
            self.abandon()
            raise
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``; it must be the next planned one, with the planned shape and dtype."""
        want_name, shape, dtype, _ = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {want_name} {shape} {dtype}")
        try:
            self._f.write(tensor_bytes(tensor))
        except BaseException:
            self.abandon()
            raise
        self._next += 1

    def abandon(self) -> None:
        """Close the file after a failure without raising (a full disk fails the final flush too)."""
        with contextlib.suppress(OSError):
            self._f.close()

    def close(self) -> None:
        """Finish the file; every planned tensor must have been written."""
        try:
            self._f.close()
        except BaseException:
            self.abandon()
            raise
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} planned tensors were never written")
