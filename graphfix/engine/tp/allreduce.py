"""Which all-reduce a decode step's small reductions use: one-shot through symmetric memory, NCCL, or gloo.

A decode step all-reduces two ``(B, 1, dim)`` activations per layer (8-16 KB at batch 1):
160 per 70B token, where latency is everything. NCCL's ring costs about 16-24 us each;
a one-shot all-reduce (every rank reads every peer's buffer over NVLink and sums,
``torch.ops.symm_mem.one_shot_all_reduce``) about 6-11 us inside a CUDA graph. Which wins
depends on the build, the topology and the size, so it is measured at start-up
(``time_all_reduces``: each inside a captured CUDA graph, as decode runs them) and the
choice is reported with its figures.

The layers always call the functional ``all_reduce``; the choice is applied where
Inductor lowers it: with symmetric memory enabled for the group and
``torch._inductor.config._collective.auto_select`` on (a **private** config, present in
torch 2.11 to 2.13; ``apply`` checks for it and reports when it is missing), Inductor
emits the one-shot kernel for reductions up to ``_collective.one_shot_all_reduce_threshold_bytes``
and NCCL above (prefill). On CPU the answer is gloo, without measuring.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from graphfix.engine.tp.group import TPGroup
from graphfix.errors import InputError

FORCE_ENV = "GRAPHFIX_TP_ALL_REDUCE"
"""``nccl`` or ``one_shot``: take that all-reduce whatever the measurement says."""


@dataclasses.dataclass
class AllReduceChoice:
    """The all-reduce picked, why, and the figures it was picked on (microseconds per all-reduce)."""

    kind: str
    reason: str
    nbytes: int = 0
    nccl_us: float | None = None
    one_shot_us: float | None = None

    def describe(self) -> str:
        figures = ""
        if self.nccl_us is not None:
            figures = f" (NCCL {self.nccl_us:.1f} us"
            figures += f", one-shot {self.one_shot_us:.1f} us)" if self.one_shot_us is not None else ")"
        return f"all-reduce: {self.kind}{figures}: {self.reason}"


def one_shot_support() -> tuple[bool, str]:
    """Whether this torch build has what the one-shot path needs, and if not, what is missing."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False, "this torch has no torch.distributed._symmetric_memory"
    for name in ("empty", "rendezvous"):
        if not hasattr(symm_mem, name):
            return False, f"torch.distributed._symmetric_memory has no {name}()"
    try:
        torch.ops.symm_mem.one_shot_all_reduce  # noqa: B018 - raises AttributeError where the op is not built
    except (AttributeError, RuntimeError):
        return False, "this build has no torch.ops.symm_mem.one_shot_all_reduce"
    from torch._inductor import config as inductor_config

    if not hasattr(getattr(inductor_config, "_collective", None), "auto_select"):
        return False, "Inductor has no _collective.auto_select (the switch that lowers all_reduce to one-shot)"
    return True, "symmetric memory and Inductor's one-shot lowering are present"


def decide(device_type: str, support: tuple[bool, str], timings: dict[str, float] | None,
           nbytes: int = 0) -> AllReduceChoice:
    """The choice from the facts: the device, whether one-shot is supported, and the measured times.

    ``timings``: ``{"nccl": us, "one_shot": us}``; a missing ``one_shot`` entry means it failed,
    and ``timings["one_shot_error"]`` (if any) says how.
    """
    if device_type != "cuda":
        return AllReduceChoice("gloo", f"{device_type} tensors: gloo (symmetric memory and NCCL are CUDA only)", nbytes)
    ok, why = support
    nccl = None if timings is None else timings.get("nccl")
    if not ok:
        return AllReduceChoice("nccl", f"one-shot unavailable: {why}", nbytes, nccl)
    one_shot = None if timings is None else timings.get("one_shot")
    if one_shot is None:
        error = (timings or {}).get("one_shot_error", "not measured")
        return AllReduceChoice("nccl", f"one-shot failed at start-up: {error}", nbytes, nccl)
    if nccl is not None and nccl <= one_shot:
        return AllReduceChoice("nccl", f"NCCL measured faster for {nbytes}-byte all-reduces", nbytes, nccl, one_shot)
    return AllReduceChoice("one_shot", f"one-shot measured faster for {nbytes}-byte all-reduces", nbytes, nccl,
                           one_shot)


def _graph_us(fn: Callable[[], Any], iters: int) -> float:
    """Microseconds per call of ``fn`` replayed ``iters`` times inside one captured CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / (5 * iters)


def _us(fn: Callable[[], Any], iters: int) -> float:
    """``_graph_us``, or plain launches timed with events where capturing the collective fails."""
    try:
        return _graph_us(fn, iters)
    except Exception:  # noqa: BLE001 - a collective that cannot be captured is still timed, uncaptured
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000.0 / iters


def enable_symmetric_memory(tp: TPGroup) -> None:
    """Register the group with symmetric memory (deprecated in torch 2.13, still what Inductor's check reads)."""
    import torch.distributed._symmetric_memory as symm_mem

    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            enable(tp.group_name)


def time_all_reduces(tp: TPGroup, nbytes: int, dtype: torch.dtype = torch.bfloat16, iters: int = 64) -> dict:
    """NCCL and one-shot all-reduces of ``nbytes``, each timed in a CUDA graph; the slowest rank's figures."""
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    timings: dict[str, Any] = {}
    plain = torch.ones(numel, dtype=dtype, device=tp.device)
    timings["nccl"] = _us(lambda: dist.all_reduce(plain, group=tp.group), iters)
    try:
        import torch.distributed._symmetric_memory as symm_mem

        enable_symmetric_memory(tp)
        buf = symm_mem.empty(numel, dtype=dtype, device=tp.device)
        symm_mem.rendezvous(buf, tp.group_name)
        buf.fill_(1)
        timings["one_shot"] = _us(lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", tp.group_name),
                                        iters)
    except Exception as exc:  # noqa: BLE001 - any failure means "use NCCL", and the reason is reported
        timings["one_shot_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # every rank must choose the same: agree on the slowest rank's figures (a failure anywhere counts everywhere)
    figures = torch.tensor([timings["nccl"], timings.get("one_shot", float("inf"))], device=tp.device)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX, group=tp.group)
    timings["nccl"] = figures[0].item()
    if figures[1].item() == float("inf"):
        timings.pop("one_shot", None)
        timings.setdefault("one_shot_error", "failed on another rank")
    else:
        timings["one_shot"] = figures[1].item()
    return timings


def step_all_reduce_bytes(model: Any) -> int:
    """Bytes of one decode all-reduce of ``model``: ``max_batch_size x dim`` activations."""
    weight = model.norm.weight
    return max(1, getattr(model, "max_batch_size", 1)) * model.config.dim * weight.element_size()


def apply(choice: AllReduceChoice, tp: TPGroup) -> AllReduceChoice:
    """Make Inductor lower small all-reduces as ``choice`` says (one-shot or not); record it on ``tp``."""
    if choice.kind == "one_shot":
        from torch._inductor import config as inductor_config

        enable_symmetric_memory(tp)
        inductor_config._collective.auto_select = True
        inductor_config._collective.one_shot_all_reduce_threshold_bytes = max(
            inductor_config._collective.one_shot_all_reduce_threshold_bytes, choice.nbytes)
    elif choice.kind == "nccl":
        from torch._inductor import config as inductor_config

        collective = getattr(inductor_config, "_collective", None)
        if collective is not None and hasattr(collective, "auto_select"):
            collective.auto_select = False
    tp.all_reduce_kind, tp.all_reduce_reason = choice.kind, choice.reason
    return choice


def choose_all_reduce(tp: TPGroup, model: Any = None, *, nbytes: int | None = None, force: str | None = None,
                      iters: int = 64) -> AllReduceChoice:
    """Measure (on CUDA), pick, apply and return the all-reduce for ``model``'s decode steps; call before compiling.

    ``force``: "nccl" or "one_shot" overrides the comparison (the figures are still measured and reported);
    default: the environment variable ``GRAPHFIX_TP_ALL_REDUCE`` if set, so ``graphfix generate --tp`` can be told.
    """
    force = force or os.environ.get(FORCE_ENV) or None
    if force not in (None, "nccl", "one_shot"):
        raise InputError(f"{FORCE_ENV}={force!r}", hint="nccl or one_shot")
    size = nbytes if nbytes is not None else (step_all_reduce_bytes(model) if model is not None else 16384)
    if tp.device.type != "cuda":
        return apply(decide(tp.device.type, (False, "not CUDA"), None, size), tp)
    support = one_shot_support()
    dtype = model.norm.weight.dtype if model is not None else torch.bfloat16
    timings = time_all_reduces(tp, size, dtype, iters) if support[0] else None
    if force == "nccl":
        return apply(AllReduceChoice("nccl", "forced", size, (timings or {}).get("nccl"),
                                     (timings or {}).get("one_shot")), tp)
    choice = decide("cuda", support, timings, size)
    if force == "one_shot" and choice.kind != "one_shot" and choice.one_shot_us is not None:
        choice = AllReduceChoice("one_shot", "forced", size, choice.nccl_us, choice.one_shot_us)
    return apply(choice, tp)
