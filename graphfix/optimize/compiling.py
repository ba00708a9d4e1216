"""Compiling a rewritten model and warming it up: the step of ``optimize`` between the passes and ``verify``.

Apart from ``api.py`` (which orders the whole transaction) because this is the one place that
knows each kind's compiled front door: HF ``generate()`` on the engine (``hf_engine``), Meta's
``forward`` on the engine (``meta_front``), every other codebase through the phase router. A
failure while compiling or warming up is a ``Refusal``, which ``optimize`` turns into an
``UnsupportedModelError`` after putting the model back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.diagnose.grouping import failure_stack
from graphfix.errors import GraphfixError
from graphfix.optimize.state import OptimizedState
from graphfix.optimize.verification import EngineRunner, classify_failure, quiet, runner_for
from graphfix.rewrite.blocks import meta_llama, side_effects

Progress = Callable[[str], None]
WARM_UP_DECODE_CALLS = 2
"""Decode calls of the warm-up: the second lets shapes that change between calls become dynamic."""
WARM_UP_RUNS = 2
"""Warm-up runs of the loop: the second starts from the state the first left (a cache attribute that kept its
length, a position counter), so what changes between runs also becomes dynamic before anything is checked."""
ENGINE_WARM_UP_RUNS = 1
"""On graphfix's engine (HF ``generate``, Meta ``forward``) one run is enough: its graphs take fixed-shape state
tensors and positions that nothing carries between runs, and one run of the verified length already reaches every
graph and replays its CUDA graph (a decode graph is warmed, recorded and replayed within the run). A second run
compiled nothing, so it only cost its time (``benchmarks/bench_optimize_wall.py``)."""


class Refusal(Exception):
    """A construct no pass could rewrite: optimize puts the model back and raises ``UnsupportedModelError``."""


def cannot_compile(model: nn.Module, kind: str) -> str | None:
    """Why the rewritten model cannot be compiled yet (a pass is missing), or ``None``."""
    if kind == "meta" and not meta_llama.has_tensor_core(model):
        return ("Meta's Transformer without the static-kv-cache pass keeps int start_pos, attribute caches and "
                "@torch.inference_mode on forward (which aot_eager/inductor cannot compile)")
    if meta_llama.inference_mode_state(model) == "inside":
        return "inference mode is still entered inside the compiled code: add the inference-mode pass"
    if kind == "hf" and side_effects.required_functions(model):
        return ("the HF forward has reorderable logging calls, which Dynamo drops when the forward is inlined in "
                "graphfix's decode/prefill callables")
    return None


def compile_and_warm_up(state: OptimizedState, runner: Any, prompt: torch.Tensor | None, backend: str,
                         cuda_graphs: bool, compile: bool, notes: list[str], say: Progress,
                         tp: Any = None) -> float | None:
    """Install the compiled callables and run the warm-up; a failure there is a refusal."""
    if not compile:
        return None
    reason = cannot_compile(state.model, state.kind)
    if reason:
        notes.append(f"not compiled: {reason}")
        if state.kind == "hf":
            state.front = None
        return None
    say(f"compiling with {backend} (prefill and decode apart, fullgraph)")
    install_compiled(state, backend, cuda_graphs, notes, tp)
    runner = runner_for(state.kind, state.driver, state.model)  # an HF model now on the engine runs through it
    started = time.perf_counter()
    try:
        # the engine compiles a decode graph per attended cache length: warm it over the whole verified length
        on_engine = isinstance(runner, EngineRunner) or getattr(state.front, "decoder", None) is not None
        steps = state.reference.steps - 1 if on_engine else WARM_UP_DECODE_CALLS
        with side_effects.reorder_logging(state.model), compile_failure_contained(), quiet():
            for _ in range(ENGINE_WARM_UP_RUNS if on_engine else WARM_UP_RUNS):
                runner.run(state.model, prompt, steps)
    except GraphfixError:
        raise
    except Exception as exc:  # a break under fullgraph=True or a compile error: a refusal
        stack = failure_stack(exc)
        where = f" at {stack[-1].short()}" if stack else ""
        raise Refusal(f"cannot compile {type(state.model).__name__} clean: {classify_failure(exc)[1]}{where}") from exc
    state.warm_recompiles = state.all_recompiles()
    if cuda_graphs and state.kind in ("hf", "meta"):
        notes.append("decode runs with CUDA graphs (mode='reduce-overhead')")
    return round(time.perf_counter() - started, 3)


def activate_cache(directory: str | os.PathLike, say: Progress) -> Any:
    """The compile cache kept in ``directory`` between processes (``graphfix.engine.CompileCache``), activated before
    anything compiles: Inductor's and Triton's caches pointed there, last process's mega-cache and GEMV tiles loaded.

    Inductor's disk cache alone spares a second process the code generation, but not the GEMV autotuning that the
    engine's decode kernels run in every process (12.7 s of a 7B warm start, docs/benchmarks.md): the tiles file does.
    """
    from graphfix.engine.compile_cache import CompileCache

    cache = CompileCache(directory)
    info = cache.activate()
    say(f"compile cache {directory}: mega-cache {'loaded' if info['megacache_loaded'] else 'none yet'}, "
        f"{info['gemv_tiles_loaded']} GEMV tile choices")
    return cache


def save_cache(cache: Any, say: Progress) -> None:
    """Keep what this process compiled and tuned for the next one (after the warm-up: every graph is compiled)."""
    started = time.perf_counter()
    size = cache.save()
    say(f"compile cache saved: mega-cache {size / 2**20:.1f} MiB, {time.perf_counter() - started:.1f}s")


def install_compiled(state: OptimizedState, backend: str, cuda_graphs: bool, notes: list[str], tp: Any = None) -> None:
    """The compiled front door for the model's kind: HF generate() on the engine, Meta forward on the engine, or
    the phase router for any other codebase."""
    model = state.model
    if state.kind == "hf":
        state.front.compile(backend, cuda_graphs=cuda_graphs)
        if state.driver is None:  # generate() on the engine; a user's loop calls forward, which the runtime serves
            from graphfix.optimize import hf_engine

            door, why = hf_engine.build(model, max_seq_len=state.max_seq_len, max_batch_size=state.front.max_batch_size,
                                        backend=backend, cuda_graphs=cuda_graphs, tp=tp)
            state.front.engine = door
            if door is None and tp is not None:
                raise Refusal(f"tensor parallelism needs generate() on the engine: {why}")
            if tp is not None:
                notes.append(door.decoder.tp_note)
            if door is None:
                notes.append(f"generate() not on the engine: {why}")
            else:
                notes.append("generate() runs on graphfix's engine (the same as graphfix generate): requests it does "
                             "not serve exactly run transformers' generate, with a warning naming why")
    elif meta_llama.has_tensor_core(model):
        from graphfix.optimize import meta_front

        state.disable = lambda: meta_front.uninstall(model)
        state.front = meta_front.install(model, backend, cuda_graphs, notes=notes, tp=tp)
        if tp is not None:
            notes.append(state.front.decoder.tp_note)
    else:
        from graphfix.rewrite.blocks.phase_router import install_router

        router = install_router(model)  # the phase-split pass may have installed it already
        router.compile(backend)
        state.front, state.disable = router, router.uncompile
