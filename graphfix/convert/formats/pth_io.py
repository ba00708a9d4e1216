"""Write a PyTorch ``.pth`` state dict one tensor at a time.

``torch.save`` needs the whole state dict in memory; a Meta 70B rank file is
17 GB. The ``.pth`` format is a zip archive holding a pickle that refers to
each tensor's storage by key (``data.pkl``) and one uncompressed record per
storage (``data/<key>``). Because the pickle only needs names, shapes and
dtypes, it can be written first from the plan, and each storage record
appended as its tensor is produced, through the same ``PyTorchFileWriter`` that
``torch.save`` itself uses. The result is byte-for-byte the layout torch.save
writes (same records, same 64-byte alignment, so ``torch.load(mmap=True)``
works) and loads with ``weights_only=True``.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch._utils import _rebuild_tensor_v2

_STORAGE_TYPES: dict[torch.dtype, str] = {
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
}


class _StorageRef:
    """Stands in for a storage while pickling; becomes ``('storage', type, key, 'cpu', numel)``."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly like a contiguous CPU tensor, without having its data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (_rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class PthWriter:
    """Stream a flat ``{name: tensor}`` ``.pth`` file whose entries are planned up front."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self.path = path
        self._plan: list[tuple[str, tuple[int, ...], torch.dtype]] = [(n, tuple(s), d) for n, s, d in plan]
        obj = {}
        for key, (name, shape, dtype) in enumerate(self._plan):
            if dtype not in _STORAGE_TYPES:
                raise ValueError(f"cannot write dtype {dtype} to {path}")
            numel = 1
            for d in shape:
                numel *= d
            obj[name] = _TensorRef(_StorageRef(str(key), dtype, numel), shape)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip = torch._C.PyTorchFileWriter(str(path), True, 64)
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", "64", 2)
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor's data."""
        want, shape, dtype = self._plan[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {want} {shape} {dtype}")
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if t.storage_offset() != 0 or t.untyped_storage().nbytes() != nbytes:
            t = t.clone()  # a slice of a larger storage: the record must hold exactly this tensor
        self._zip.write_record(f"data/{self._next}", t.untyped_storage(), nbytes)
        self._next += 1

    def close(self) -> None:
        """Write the zip directory; every planned tensor must have been written."""
        if self._next != len(self._plan):
            raise RuntimeError(f"{self.path}: {len(self._plan) - self._next} planned tensors were never written")
        self._zip.write_end_of_file()
