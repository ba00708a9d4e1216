"""The high-precision run of the original that ``verify`` measures errors against (``graphfix.optimize.parity``).

``optimize`` records it before any rewrite, right after the run in the model's own dtype and
through the same runner (HF ``generate``, Meta ``start_pos``, or the driver's loop), on a copy
of the model whose floating-point parameters, buffers and tensor attributes are widened; the
copy is dropped as soon as its logits are kept.

Which precision (``choose``), decided by size:

- a float64 model is its own reference (``e_orig`` is 0 and the floor decides);
- a float32 model: a float64 copy;
- bfloat16/float16: a float64 copy on the CPU when it is at most ``CPU_FLOAT64_BYTES`` (float64
  is exact enough to make ``e_orig`` the model's own rounding alone, and small models run it in
  seconds), else a float32 copy (on a GPU: Llama-2-7B in bfloat16 needs 27 GB more; float32's
  rounding is 1/65536 of bfloat16's, far below what is measured). TF32 is off for the run.

The copy must fit next to the model: in the device's free memory (CUDA: ``mem_get_info`` plus the
allocator's cached blocks; CPU: ``MemAvailable``) with ``HEADROOM`` to spare. When the preferred
precision does not fit, float32 is tried for a half-precision model; when nothing fits, or the
copy cannot be made or run (a loop that hard-codes a dtype, an object deepcopy refuses), there is
no reference: parity falls back to the fixed tolerance and says why (``HighPrecision.note``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

CPU_FLOAT64_BYTES = 4 * 2**30
"""Largest float64 copy made on the CPU for a half-precision model (about 500M parameters)."""
HEADROOM = 1.15
"""The copy's bytes times this must be free: activations, the run's cache, the allocator's slack."""
CHOICES = ("auto", "float64", "float32", "none")


@dataclasses.dataclass
class HighPrecision:
    """The high-precision run (``trace``, ``None`` when there is none) and what was decided, and why."""

    trace: Any
    dtype: torch.dtype | None
    note: str
    seconds: float = 0.0

    @property
    def dtype_name(self) -> str | None:
        return str(self.dtype).replace("torch.", "") if self.dtype is not None else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter, buffer and tensor attribute of every module (each object once)."""
    seen: set[int] = set()
    for module in model.modules():
        values = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        for value in values:
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                yield value


def _wider(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype ``tensor`` takes in a ``dtype`` copy, ``None`` when it stays (integers, already as wide)."""
    if tensor.is_complex():
        target = torch.complex128 if dtype == torch.float64 else torch.complex64
    elif tensor.is_floating_point():
        target = dtype
    else:
        return None
    return target if target.itemsize > tensor.dtype.itemsize else None


def copy_bytes(model: nn.Module, dtype: torch.dtype) -> dict[torch.device, int]:
    """Bytes a ``dtype`` copy of ``model`` takes, per device."""
    need: dict[torch.device, int] = {}
    for t in _tensors(model):
        target = _wider(t, dtype)
        size = t.numel() * (target.itemsize if target is not None else t.element_size())
        need[t.device] = need.get(t.device, 0) + size
    return need


def free_bytes(device: torch.device) -> int | None:
    """Memory a copy may take on ``device`` (``None``: unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        from graphfix.diagnose.validate import available_memory

        return available_memory()
    return None


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _fits(need: dict[torch.device, int]) -> tuple[bool, str]:
    for device, nbytes in need.items():
        free = free_bytes(device)
        if free is not None and nbytes * HEADROOM > free:
            return False, f"{_size(nbytes)} on {device}, {_size(free)} free"
    return True, _size(sum(need.values()))


def choose(model: nn.Module, dtype: torch.dtype, requested: str = "auto") -> tuple[torch.dtype | None, str]:
    """``(precision of the reference copy, why)``; ``None``: no copy (see the module docstring)."""
    if requested not in CHOICES:
        raise ValueError(f"parity_reference must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested == "none":
        return None, "no high-precision reference was asked for (parity_reference='none')"
    if dtype == torch.float64:
        return torch.float64, "a float64 model: its own run is the reference"
    if requested != "auto":
        wanted = [getattr(torch, requested)]
    else:
        on_cpu = all(d.type == "cpu" for d in copy_bytes(model, torch.float64))
        small = sum(copy_bytes(model, torch.float64).values()) <= CPU_FLOAT64_BYTES
        wanted = [torch.float64] if dtype == torch.float32 or (on_cpu and small) else []
        if dtype.itemsize < 4:
            wanted.append(torch.float32)
    refused = []
    for candidate in wanted:
        if candidate.itemsize <= dtype.itemsize:
            refused.append(f"{_dtype_name(candidate)} is not wider than the model's {_dtype_name(dtype)}")
            continue
        ok, size = _fits(copy_bytes(model, candidate))
        if ok:
            return candidate, f"a {_dtype_name(candidate)} copy of the original ({size})"
        refused.append(f"no room for a {_dtype_name(candidate)} copy ({size})")
    return None, "; ".join(refused) or f"no precision wider than {_dtype_name(dtype)} to run"


def widened_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``model`` with its floating-point tensors in ``dtype`` (complex ones to match).

    The widened tensors go into ``deepcopy``'s memo first, so the copy never holds the weights twice:
    its peak is the widened weights alone. Parameters stay ``Parameter`` objects (tied ones stay tied).
    """
    memo: dict[int, Any] = {}
    for t in _tensors(model):
        target = _wider(t, dtype)
        if target is None:
            continue
        wide = t.detach().to(target)
        memo[id(t)] = nn.Parameter(wide, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else wide
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32) for the duration: the reference must not round like bfloat16."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def record(model: nn.Module, runner: Any, prompt: torch.Tensor | None, steps: int | None, own: Any,
           dtype: torch.dtype, requested: str = "auto") -> HighPrecision:
    """The high-precision run of ``model`` through ``runner`` (``own``: its run in ``dtype``, already recorded)."""
    from graphfix.optimize.verification import quiet

    wide, why = choose(model, dtype, requested)
    if wide is None:
        return HighPrecision(None, None, why)
    if wide == dtype:
        return HighPrecision(own, wide, why)
    started = time.perf_counter()
    clone = None
    try:
        clone = widened_copy(model, wide)
        with quiet(), exact_matmuls(), torch.no_grad():
            trace = runner.run(clone, prompt, steps)
    except Exception as exc:  # noqa: BLE001 - any failure of the copy means no reference, said in the note
        return HighPrecision(None, None, f"the {_dtype_name(wide)} run of the original failed "
                             f"({type(exc).__name__}: {_first_line(exc)})")
    finally:
        del clone
        _release()
    return HighPrecision(trace, wide, why, round(time.perf_counter() - started, 3))


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:200]


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
