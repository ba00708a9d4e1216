"""A persistent compile cache, so that a second process reaches its first token sooner.

Two layers, both optional and both checked for at run time:

- the on-disk caches of Inductor (FX graph cache, AOTAutograd cache, autotuning)
  and Triton, pointed at ``<dir>/inductor`` through ``TORCHINDUCTOR_CACHE_DIR`` and
  ``TRITON_CACHE_DIR`` (read by torch whenever it looks a cache up);
- torch's "mega-cache": ``torch.compiler.save_cache_artifacts()`` after warmup writes
  every artifact the process compiled into one file (``<dir>/megacache.bin``), and
  ``torch.compiler.load_cache_artifacts()`` hot-loads it in the next process before it
  compiles. The file can be copied to another machine with the same torch, GPU and
  Python.

Dynamo still traces in the warm process (that is not cached); what is saved is the
Inductor/Triton code generation and compilation, usually most of the time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MEGACACHE = "megacache.bin"


class CompileCache:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @property
    def megacache_path(self) -> Path:
        return self.directory / MEGACACHE

    def activate(self) -> dict[str, Any]:
        """Point the caches at the directory and hot-load the mega-cache if there is one.

        Call before the first compile. Returns what was done (for logs and benchmarks).
        """
        inductor = self.directory / "inductor"
        inductor.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        os.environ["TRITON_CACHE_DIR"] = str(inductor / "triton")
        info: dict[str, Any] = {"dir": str(self.directory), "megacache_loaded": False}
        loader = getattr(torch.compiler, "load_cache_artifacts", None)
        if loader is not None and self.megacache_path.exists():
            result = loader(self.megacache_path.read_bytes())
            info["megacache_loaded"] = result is not None
            info["megacache_bytes"] = self.megacache_path.stat().st_size
        return info

    def save(self) -> int:
        """Write the mega-cache of everything compiled so far; returns its size in bytes (0: nothing/unsupported)."""
        saver = getattr(torch.compiler, "save_cache_artifacts", None)
        if saver is None:
            return 0
        result = saver()
        if not result:
            return 0
        data = result[0]
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.megacache_path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.megacache_path)
        return len(data)
