"""Measuring on a device: wall and CUDA-event timing, copy bandwidth, CUDA-graph replays, the time budget and the
results document the decode benchmark and the self-checks share."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _now() -> float:
    return time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = _now(), seconds

    def left(self) -> float:
        return self.seconds - (_now() - self.start)

    def fits(self, estimate: float) -> bool:
        return self.left() > estimate


def _atomic_write(path: str, text: str) -> None:
    """The JSON/Markdown results, whole or not at all, in a folder made if needed."""
    from graphfix.convert.atomic import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text if text.endswith("\n") else text + "\n")


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 20) -> dict[str, float]:
    """Median GB/s of a device-to-device copy of ``nbytes``, counting bytes read plus bytes written.

    Default size: 2 GiB on a GPU (many times its L2), 64 MiB elsewhere.
    """
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = _now()
            dst.copy_(src)
            times.append(_now() - t)
    sec = statistics.median(times)
    del src, dst
    return {"bytes": 2 * nbytes, "seconds": sec, "gb_per_s": 2 * nbytes / sec / 1e9}


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = _now()
    fn()
    _sync(device)
    return _now() - t


def _summary(times_n: list[float], times_1: list[float], new_tokens: int) -> dict[str, float]:
    t_n, t_1 = statistics.median(times_n), statistics.median(times_1)
    ms = 1000 * (t_n - t_1) / max(1, new_tokens - 1)
    return {"tok_per_s": new_tokens / t_n, "ms_per_token": ms, "seconds_median": t_n, "ttft_s": t_1,
            "seconds_all": times_n}


def cuda_graph_ms(fn: Any, reps: int = 20, repeats: int = 1) -> tuple[float, Any]:
    """Milliseconds per replay of ``fn()`` captured as one CUDA graph (median of ``repeats`` timings), and its output.

    ``fn`` runs twice on a side stream first, so autotuning and first launches stay out of the capture.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(3):
        graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times), out


def cycled_us(call: Any, items: list[Any], rounds: int = 4, repeats: int = 5) -> float:
    """Microseconds per ``call(item)``, every item ``rounds`` times in one CUDA graph (median of ``repeats``).

    For a kernel's figure at memory speed: ``items`` are copies of its weights larger than L2 together, so no call
    finds the weights the call before it read.
    """
    ms, _ = cuda_graph_ms(lambda: [call(item) for _ in range(rounds) for item in items], 1, repeats)
    return ms * 1e3 / (rounds * len(items))


def matmul_only_ms(dec, batch: int, device: torch.device, reps: int = 20) -> float | None:
    """Milliseconds of one decode step's linear layers alone, back to back in a CUDA graph."""
    if device.type != "cuda":
        return None
    inputs: dict[int, torch.Tensor] = {}

    def inp(n: int) -> torch.Tensor:
        if n not in inputs:
            inputs[n] = torch.randn(batch, 1, n, device=device, dtype=dec.output.weight.dtype)
        return inputs[n]

    calls = [(m, inp(m.in_features)) for m in dec.modules() if isinstance(m, torch.nn.Linear)]

    def step() -> None:
        for m, x in calls:
            m(x)

    with torch.no_grad():
        return cuda_graph_ms(step, reps)[0]


def kernel_breakdown(gen, prompts: list[list[int]], device: torch.device, steps: int = 16) -> dict[str, Any] | None:
    """Device time per decode step by kernel category (profiler over a short generate)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        res = gen.generate(prompts, steps + 1)
        _sync(device)
    cats: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if not us:
            continue
        name = ev.key
        low = name.lower()
        if low.startswith("triton"):  # before "attention": fused kernels feeding SDPA carry its name
            cat = "triton (fused norm/rope/cache/mask/sampling)"
        elif any(s in low for s in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk", "cublas")):
            cat = "matmul"
        elif any(s in low for s in ("fmha", "attention", "flash", "efficient")):
            cat = "attention"
        elif "memcpy" in low or "memset" in low:
            cat = "copies"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0.0) + us
        top.append((us, name, ev.count))
    top.sort(reverse=True)
    n = res.steps
    return {"ms_per_step_by_category": {k: v / 1000 / n for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "device_ms_per_step": sum(cats.values()) / 1000 / n,
            "wall_ms_per_step": 1000 * res.total_s / n,
            "top_kernels": [{"name": name[:120], "ms_per_step": us / 1000 / n, "calls_per_step": c / n}
                            for us, name, c in top[:12]]}


COMPILE_TIME_KEYS = {"_compile.compile_inner": "dynamo_and_backend_s", "bytecode_tracing": "dynamo_tracing_s",
                     "OutputGraph.call_user_compiler": "backend_s", "compile_fx_inner": "inductor_s",
                     "build_guards": "guards_s"}
"""Dynamo's own timers (``torch._dynamo.utils.compile_times``, process totals): ``_warmup`` keeps each phase's share."""


def compile_time_summary() -> dict[str, float]:
    """Seconds per compile phase so far in this process; the rest of a warmup is running, autotuning, CUDA graphs."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # noqa: BLE001 - a private timer API: its absence costs the breakdown, not the run
        return {}
    timers = dict(zip(names, values))
    return {label: float(timers[key]) for key, label in COMPILE_TIME_KEYS.items() if key in timers}


