"""A persistent compile cache, so that a second process reaches its first token sooner.

Five layers, each optional and each checked for at run time:

- the on-disk caches of Inductor (FX graph cache, AOTAutograd cache, autotuning)
  and Triton, pointed at ``<dir>/inductor`` through ``TORCHINDUCTOR_CACHE_DIR`` and
  ``TRITON_CACHE_DIR`` (read by torch whenever it looks a cache up);
- torch's "mega-cache": ``torch.compiler.save_cache_artifacts()`` after warmup writes
  every artifact the process compiled into one file (``<dir>/megacache.bin``), and
  ``torch.compiler.load_cache_artifacts()`` hot-loads it in the next process before it
  compiles. The file can be copied to another machine with the same torch, GPU and
  Python;
- Dynamo's precompile cache (``torch._dynamo.config.caching_precompile``; opt-in with
  ``precompile=True`` and a ``key``, torch 2.13 and newer): the traced bytecode and guards go into the mega-cache too, so the next
  process does not trace at all. Dynamo drops a few guards it cannot serialize
  (closure identities), so a cache directory must serve one model and one set of
  options: the ``key`` (model, dtype, kernel options, torch version, device) is kept in
  ``<dir>/key.json`` and a different key is refused;
- the tiles the GEMV's autotuner chose (``<dir>/gemv_tiles.json``, per Triton version and
  GPU, ``kernels.tile_choices``): the directly launched PDL GEMV autotunes when it first
  runs, in every process, and Triton's own autotuning cache missed across processes;
- Python's bytecode (``sys.pycache_prefix`` = ``<dir>/pycache`` unless one is set):
  where site-packages is read-only (container images), every process compiles the
  modules of transformers, Dynamo and Inductor from source again, seconds per start.
  Modules imported after ``activate`` are cached; ``child_env`` gives a subprocess the
  prefix from its start.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graphfix.convert.atomic import atomic_write
from graphfix.errors import InputError

MEGACACHE = "megacache.bin"
KEY_FILE = "key.json"
TILES_FILE = "gemv_tiles.json"


PRECOMPILE_MIN_TORCH = (2, 13)
"""Dynamo's precompile cache reloads our graphs from torch 2.13 (tested: no tracing in the second process). On
torch 2.11 the second process fails to unpickle the saved guards (``DefaultsSource``), so it stays off below."""


def precompile_supported() -> bool:
    """Whether this torch has Dynamo's precompile cache in a version graphfix has seen reload its graphs."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return version >= PRECOMPILE_MIN_TORCH and hasattr(torch._dynamo.config, "caching_precompile")


def pin_triton_ptxas() -> str | None:
    """Set ``TRITON_PTXAS_PATH`` now to the ptxas Inductor would switch Triton to (torch's own, where the build
    ships one), unless it is set already; returns the path in force.

    Triton keys its kernel and autotuning caches on the ptxas version, and Inductor sets this
    variable the first time it compiles a kernel in-process. So a kernel compiled or tuned
    before that moment in one process (the GEMV autotuned by ``kernel_check``, say) and after
    it in another gets two keys: the likely reason a second process found none of the first's
    autotuning results (docs/benchmarks.md, run D; not confirmed on a GPU). Set before any
    compile, every process uses one ptxas throughout; Inductor keeps a path that is set.
    """
    if "TRITON_PTXAS_PATH" not in os.environ:
        import torch._inductor

        ptxas = Path(torch._inductor.__file__).parent / "bin" / "ptxas"  # Inductor's _set_triton_ptxas_path
        if ptxas.is_file() and os.access(ptxas, os.X_OK):
            os.environ["TRITON_PTXAS_PATH"] = str(ptxas)
    return os.environ.get("TRITON_PTXAS_PATH")


class CompileCache:
    def __init__(self, directory: str | os.PathLike, key: Mapping[str, Any] | None = None,
                 precompile: bool = False) -> None:
        """``key``: what the cached graphs depend on (kept in ``key.json``; another key is refused).
        ``precompile``: also Dynamo's precompile cache (needs ``key``; opt-in, since it drops guards)."""
        if precompile and key is None:
            raise ValueError("precompile needs a key: one cache folder must serve one model and one set of options")
        self.directory = Path(directory)
        self.key = None if key is None else {"torch": torch.__version__, **{k: str(v) for k, v in key.items()}}
        self.precompile = precompile

    @property
    def megacache_path(self) -> Path:
        return self.directory / MEGACACHE

    @property
    def inductor_dir(self) -> Path:
        return self.directory / "inductor"

    @property
    def pycache_dir(self) -> Path:
        return self.directory / "pycache"

    def _check_key(self) -> None:
        path = self.directory / KEY_FILE
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"compile cache {self.directory}: unreadable {KEY_FILE} ({exc})",
                                 hint="delete the folder or use another --cache-dir") from exc
            if saved != self.key:
                diff = sorted(k for k in {*saved, *self.key} if saved.get(k) != self.key.get(k))
                raise InputError(f"compile cache {self.directory} was made for another setup (differs in "
                                 f"{', '.join(diff)})", hint="use one --cache-dir per model and options")
            return
        atomic_write(path, json.dumps(self.key, sort_keys=True))

    def activate(self) -> dict[str, Any]:
        """Point the caches at the directory and hot-load the mega-cache if there is one.

        Call before the first compile. Returns what was done (for logs and benchmarks).
        """
        inductor = self.inductor_dir
        inductor.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {"dir": str(self.directory), "megacache_loaded": False, "precompile": False}
        if self.key is not None:
            self._check_key()
            if self.precompile and precompile_supported():
                torch._dynamo.config.caching_precompile = True
                info["precompile"] = True
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
        os.environ["TRITON_CACHE_DIR"] = str(inductor / "triton")
        info["ptxas"] = pin_triton_ptxas()
        if sys.pycache_prefix is None and not sys.flags.dont_write_bytecode:
            sys.pycache_prefix = str(self.pycache_dir)
        info["pycache_prefix"] = sys.pycache_prefix
        info["gemv_tiles_loaded"] = self._load_tiles()
        loader = getattr(torch.compiler, "load_cache_artifacts", None)
        if loader is not None and self.megacache_path.exists():
            result = loader(self.megacache_path.read_bytes())
            info["megacache_loaded"] = result is not None
            info["megacache_bytes"] = self.megacache_path.stat().st_size
        return info

    def child_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """``env`` (default ``os.environ``) for a subprocess that will use this cache, from its first import:
        the Inductor and Triton cache folders and the bytecode prefix (the caller's own settings win)."""
        out = dict(os.environ if env is None else env)
        out.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.inductor_dir))
        out.setdefault("TRITON_CACHE_DIR", str(self.inductor_dir / "triton"))
        out.setdefault("PYTHONPYCACHEPREFIX", str(self.pycache_dir))
        return out

    def _load_tiles(self) -> int:
        path = self.directory / TILES_FILE
        if not path.exists():
            return 0
        from graphfix.engine.kernels import use_tile_choices

        try:
            return use_tile_choices(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # a damaged file costs the autotuning it would have saved
            return 0

    def _save_tiles(self) -> None:
        from graphfix.engine.kernels import tile_choices

        choices = tile_choices()
        if choices and choices["tiles"]:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.directory / TILES_FILE, json.dumps(choices))

    def save(self) -> int:
        """Write the mega-cache of everything compiled so far (and the GEMV tiles chosen); returns the
        mega-cache's size in bytes (0: nothing/unsupported)."""
        self._save_tiles()
        saver = getattr(torch.compiler, "save_cache_artifacts", None)
        if saver is None:
            return 0
        result = saver()
        if not result:
            return 0
        data = result[0]
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.megacache_path, data)
        return len(data)
