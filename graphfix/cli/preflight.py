"""Checks on the command line before any work: arguments, output paths, the baseline.

A report on SmolLM2 takes a minute; a typo in ``--baseline`` or an ``--output`` into a
folder that does not exist used to fail only after it, and a read-only destination with a
traceback. Every check here runs before a model is loaded, raises one ``InputError`` line
naming the flag and the value, and writes nothing (a writability probe creates and removes
a temporary file in the destination folder; parent folders of ``--write-baseline`` are
created only when the baseline is written).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from graphfix.errors import InputError

MAX_PREFILL = 65536
"""A diagnosis or verification needs a few tokens; a larger prompt is a typo that would allocate for it."""
MAX_DECODE_STEPS = 65536


def whole(value: int | None, flag: str, *, minimum: int = 0, maximum: int | None = None) -> None:
    """``value`` (when given) is a whole number in ``[minimum, maximum]``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise InputError(f"{flag} must be a whole number >= {minimum}{upper}, got {value!r}")


def number(value: float | None, flag: str, *, minimum: float = 0.0, strict: bool = False) -> None:
    """``value`` (when given) is a finite number ``>= minimum`` (``> minimum`` when ``strict``)."""
    if value is None:
        return
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise InputError(f"{flag} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe(folder: Path, flag: str, shown: str) -> None:
    """Create and remove a temporary file in ``folder``: read-only file systems and permissions, found now."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".graphfix-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{flag} {shown}: cannot write in {folder} ({exc.strerror or type(exc).__name__})",
                         hint="choose a writable location") from None
    os.close(fd)
    os.unlink(tmp)


def check_output(path: str | os.PathLike[str] | None, flag: str, *, create_parents: bool = False) -> Path | None:
    """An output file ``flag`` may write: not a folder, its folder exists (or, with ``create_parents``, can be
    created) and is writable. Nothing is left behind."""
    if path is None or str(path) == "":
        if path is not None:
            raise InputError(f"{flag} needs a file name")
        return None
    target = Path(path)
    shown = str(path)
    if flag.endswith("="):  # --also FORMAT=: the value follows without a space
        flag, shown = flag.split()[0], flag.split()[-1] + shown
    if target.is_dir():
        raise InputError(f"{flag} {shown} is a folder", hint="give a file name")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        if not create_parents:
            raise InputError(f"{flag} {shown}: folder {folder} does not exist", hint="create it first")
        existing = _nearest_existing(folder)
        if not existing.is_dir():
            raise InputError(f"{flag} {shown}: {existing} is a file, not a folder")
        _probe(existing, flag, shown)
        return target
    if not folder.is_dir():
        raise InputError(f"{flag} {shown}: {folder} is a file, not a folder")
    _probe(folder, flag, shown)
    return target


def distinct_outputs(paths: Iterable[tuple[str, str | None]]) -> None:
    """Two outputs into one file would overwrite each other."""
    seen: dict[str, str] = {}
    for flag, path in paths:
        if not path:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{flag} {path} is also the file of {seen[key]}", hint="give each output its own file")
        seen[key] = flag


def check_device(spec: str | None, flag: str = "--device") -> torch.device | None:
    """A device torch knows and this machine has."""
    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {spec!r} is not a device", hint="e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {spec}: CUDA is not available on this machine", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "meta", "mps", "xpu"):
        raise InputError(f"{flag} {spec}: graphfix runs on cpu or cuda")
    return device


def weights_required(spec: str, command: str) -> None:
    """``generate`` and ``optimize`` need weights: a config.json alone (the meta device) is for ``report``."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        raise InputError(f"{command} needs weights, and {spec} is a config file",
                         hint=f"give the folder with the weights ({path.parent}); "
                              "'graphfix report' diagnoses from config.json alone")
    if path.is_dir() and (path / "config.json").exists() and not (path / "params.json").exists() and \
            not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) and not any(path.glob("*.gguf")):
        raise InputError(f"{command} needs weights, and {spec} has a config.json but no *.safetensors or *.bin",
                         hint="download or convert the weights into the folder")


def check_cache_dir(path: str | None) -> None:
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"--cache-dir {path} is a file, not a folder")
    _probe(_nearest_existing(target) if not target.exists() else target, "--cache-dir", path)




DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
"""``--dtype`` spellings, the same for every command: torch's names and their short forms."""
DTYPE_HELP = "float32 (fp32), bfloat16 (bf16) or float16 (fp16)"


__all__ = ["DTYPES", "DTYPE_HELP", "MAX_DECODE_STEPS", "MAX_PREFILL", "check_cache_dir", "check_device",
           "check_output", "distinct_outputs", "number", "weights_required", "whole"]
