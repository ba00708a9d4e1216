"""Write a PyTorch ``.pth`` state dict one tensor at a time, and read one without running its pickle.

``torch.save`` needs the whole state dict in memory; a Meta 70B rank file is
17 GB. The ``.pth`` format is a zip archive holding a pickle that refers to
each tensor's storage by key (``data.pkl``) and one uncompressed record per
storage (``data/<key>``). Because the pickle only needs names, shapes and
dtypes, it can be written first from the plan, and each storage record
appended as its tensor is produced, through the same ``PyTorchFileWriter`` that
``torch.save`` itself uses. The result is byte-for-byte the layout torch.save
writes (same records, same 64-byte alignment, so ``torch.load(mmap=True)``
works) and loads with ``weights_only=True``.

The zip writer writes through a Python file object rather than a path, so a
full disk or a read-only folder raises the operating system's ``OSError``
(with its errno) instead of torch's errno-less ``basic_ios`` error, and a
failed writer is finalised explicitly: left to its C++ destructor it would try
to finish the archive on the full disk, throw inside a destructor and abort
the whole process (exit 134).

Reading goes through ``torch.load(weights_only=True)`` only: a pickle that
names a function (``os.system``) is refused by torch's restricted unpickler
before anything runs. The error says so in graphfix's words; torch's own
advice to retry with ``weights_only=False`` is never passed on, since for such
a file that would run its code.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from torch._utils import _rebuild_tensor_v2

from graphfix.errors import InputError

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
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close() or abandon()
        self._zip = torch._C.PyTorchFileWriter(self._file, True, 64)
        with self._abandon_on_error():
            self._zip.write_record("data.pkl", data, len(data))
            self._zip.write_record(".format_version", "1", 1)
            self._zip.write_record(".storage_alignment", "64", 2)
            self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0

    @contextmanager
    def _abandon_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Give up on the file after a failure: finalise the writer so its destructor cannot abort, close it."""
        if self._file.closed:
            return
        with contextlib.suppress(Exception):
            self._zip.write_end_of_file()  # marks the writer finalised even when it fails
        with contextlib.suppress(OSError):
            self._file.close()

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
        with self._abandon_on_error():
            self._zip.write_record(f"data/{self._next}", t.untyped_storage(), nbytes)
        self._next += 1

    def close(self) -> None:
        """Write the zip directory; every planned tensor must have been written."""
        if self._next != len(self._plan):
            self.abandon()
            raise RuntimeError(f"{self.path}: {len(self._plan) - self._next} planned tensors were never written")
        with self._abandon_on_error():
            self._zip.write_end_of_file()
            self._file.close()


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` .pth, memory-mapped where the format allows; every failure one line naming ``path``.

    Files in torch's zip format (everything ``torch.save`` wrote since 1.6)
    are memory-mapped; older single-pickle files are read whole.
    """
    try:
        mmap = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error line says enough
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc}); check the path and its permissions") from None
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: not a plain tensor checkpoint ({_refused(str(exc))}), so it was not loaded; "
                         "graphfix reads only files of plain tensors: get the checkpoint from its original source") from None
    except Exception as exc:  # noqa: BLE001 - zip and format errors all mean a damaged file
        from graphfix.diagnose.weight_files import first_sentence

        msg = first_sentence(str(exc)) or type(exc).__name__
        if "weights_only" in msg:
            msg = type(exc).__name__
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({msg}); it is truncated or corrupt: "
                         "re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{path}: holds a {type(sd).__name__}, not a state dict of named tensors; this is not a "
                         "checkpoint shard")
    return sd


def _refused(message: str) -> str:
    """What torch's restricted unpickler refused, without its advice to turn the restriction off."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"its pickle calls {m.group(1)}, which could run code"
    m = re.search(r"(Unsupported operand \d+)", message)
    if m:
        return f"its pickle uses instructions a tensor file does not have: {m.group(1).lower()}"
    return "its pickle holds objects other than tensors"
