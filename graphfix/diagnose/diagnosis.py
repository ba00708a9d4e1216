"""``diagnose``: run Dynamo over a real prefill + decode loop and report what went wrong.

Three runs, because each shows something the others hide:
1. ``fullgraph=False`` over the whole loop lists every graph break and every
   recompile (with the guard that failed), and counts graphs;
2. ``fullgraph=True`` over prefill and the first decode steps shows where a
   whole-graph compile stops (``.item()`` behaves differently here);
3. with ``inductor=True`` (or ``backend="inductor"``) the post-grad graph is
   scanned for ops Inductor runs as ATen fallbacks (complex RoPE, for one).
Errors raised by compilation itself (not graph breaks) become compile-failure
findings. Raw events are grouped by site into ``Finding``s with the module path,
a category and the pass that fixes it.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphfix.diagnose import capture as cap_mod
from graphfix.diagnose import grouping
from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.diagnose.drivers import NO_CONVENTION_HINT, Driver, describe_signature, driver_from
from graphfix.diagnose.findings import Finding, Location
from graphfix.diagnose.intercept import CallLog, intercepted
from graphfix.diagnose.modulemap import ModuleIndex
from graphfix.diagnose.report import Report, RunStats
from graphfix.errors import GraphfixError, InputError, ModelRunError

Progress = Callable[[str], None]


def diagnose(
    model: nn.Module,
    inputs: Any = None,
    *,
    driver: Any = None,
    backend: str = "auto",
    inductor: bool = False,
    fullgraph_check: bool = True,
    fullgraph_steps: int = 1,
    prefill_tokens: int = 8,
    decode_steps: int = 16,
    hidden: bool = True,
    name: str | None = None,
    source: str = "module",
    progress: Progress | None = None,
    layers: str = "all",
) -> Report:
    """Diagnose ``model`` under ``torch.compile`` and return a ``Report``.

    ``driver``: the loop that runs the model, ``fn(model) -> tokens`` as the user's code runs
    it (or a ``graphfix.diagnose.drivers`` driver). ``inputs``: a prompt tensor for the
    recognised calling conventions, or a list of example calls (each a tuple of args, or a dict
    of kwargs). Without either, the driver is chosen from the forward's signature (HF, Meta
    ``start_pos``, tensor ``input_pos``, fms). ``hidden``: look for breaks hidden behind the
    first ones, on a scratch copy with the suggested passes applied. ``layers``: ``"all"``, or
    ``"representative"``: when the decoder layers repeat (same classes, shapes and per-layer
    configuration), only one layer of each kind (at least two) runs, which divides Dynamo's
    tracing by the depth (``graphfix.diagnose.layer_subset``; the report says which ran).
    """
    if layers not in ("all", "representative"):
        raise InputError(f"layers must be 'all' or 'representative', got {layers!r}")
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    driver = driver_from(driver if driver is not None else inputs, model, prefill_tokens=prefill_tokens,
                         decode_steps=decode_steps)
    def run(cut: Any) -> Report:
        report = _diagnose_once(model, driver, backend=backend, inductor=inductor, fullgraph_check=fullgraph_check,
                                fullgraph_steps=fullgraph_steps, name=name, source=source, say=say, cut=cut)
        if hidden:
            from graphfix.diagnose.hidden import find_hidden_breaks

            find_hidden_breaks(model, driver, report, lambda scratch: _diagnose_once(
                scratch, driver, backend=backend, inductor=False, fullgraph_check=fullgraph_check,
                fullgraph_steps=fullgraph_steps, name=name, source=source, say=lambda m: say(f"  {m}"), cut=cut), say)
        return report

    with _subset(model, layers) as cut:
        if cut is not None:
            say(cut.note().split(", one of")[0])
        report = run(cut)
    if cut is not None:
        guard = cut.position_guard(report.recompiles)
        if guard is None:
            report.notes.append(cut.note())
        else:  # Dynamo tells the layers apart by their position: each would recompile, so the subset cannot stand in
            say(f"recompiles guard on the layers' position ({guard}): diagnosing every layer")
            report = run(None)
            report.notes.append(f"every layer diagnosed: a subset recompiled on the layers' position ({guard}), "
                                "which the whole stack repeats per layer")
    report.wall_seconds = round(time.perf_counter() - started, 3)
    report.peak_memory_mb = round(_peak_rss_mb(), 1)
    return report


def _subset(model: nn.Module, layers: str) -> Any:
    if layers == "all":
        return contextlib.nullcontext()
    from graphfix.diagnose.layer_subset import representative_layers

    return representative_layers(model)


def _diagnose_once(model: nn.Module, driver: Driver, *, backend: str, inductor: bool, fullgraph_check: bool,
                   fullgraph_steps: int, name: str | None, source: str, say: Progress, cut: Any = None) -> Report:
    """One diagnosis: the eager probe, then the compiled runs (see the module docstring)."""
    # backend "auto": the loop runs on plain Dynamo (breaks and recompiles are Dynamo's), and a separate
    # hard-failure run compiles the prefill with aot_eager (AOT autograd is where e.g. inference mode fails).
    # On the meta device there are no weights and the AOT run is skipped.
    failure_backend = None
    if backend == "auto":
        backend = "eager"
        failure_backend = None if _device_of(model).type == "meta" else "aot_eager"
    device = _device_of(model)
    report = Report(
        model=name or type(model).__name__,
        source=source,
        backend=backend,
        device=str(device),
        driver=driver.description,
        prefill_tokens=driver.prefill_tokens,
        decode_steps=driver.decode_steps,
        versions=_versions(),
    )
    index = ModuleIndex(model)
    if cut is not None:  # the model runs a subset of its layers: paths name the layers' own indices
        index.renumber(cut.path, cut.kept)
    fixes = grouping.fix_table()
    root_loc = _forward_location(model)

    say("eager run (checks the model works before compiling)")
    _eager_check(model, driver)

    use_inductor = inductor or backend == "inductor"
    say(f"compiling with fullgraph=False, backend={backend}: the driver's loop ({driver.description})")
    findings: OrderedDict[tuple, Finding] = OrderedDict()
    stats = RunStats()
    run_started = time.perf_counter()
    with cap_mod.capture_dynamo() as cap, _maybe_scan(use_inductor and backend == "inductor") as scanner:
        torch._dynamo.utils.counters.clear()
        failure, log = _run(driver, model, cap, backend, fullgraph=False, scanner=scanner)
        frames_ok = int(torch._dynamo.utils.counters["frames"].get("ok", 0))
    stats.seconds = round(time.perf_counter() - run_started, 3)
    decode_phases = [p for p in log.phases if p.startswith("decode")]
    report.prefill_tokens = (log.new_tokens[0] or 0) if log.new_tokens else report.prefill_tokens
    report.decode_steps = len(decode_phases)
    stats.calls = log.calls
    stats.forward_calls = log.calls
    stats.graphs = cap.graphs
    stats.graph_runs = sum(cap.runs_by_phase.values())
    stats.graph_breaks = len(cap.breaks)
    stats.graphs_per_prefill = cap.runs_by_phase.get("prefill", 0)
    stats.graphs_per_decode = cap.runs_by_phase.get(decode_phases[-1], 0) if decode_phases else 0
    stats.compiled_frames = frames_ok
    stats.recompiles = len(cap.recompiles)
    grouping.add_breaks(findings, cap.breaks, index, fixes, mode="fullgraph=False")
    grouping.add_recompiles(findings, cap.recompiles, index, fixes, root_loc, report.prefill_tokens or None)
    grouping.add_limits(findings, cap.limits, index, fixes)
    if failure is not None:
        grouping.add_failure(findings, failure, index, fixes, root_loc, mode="fullgraph=False")
    elif stats.graph_runs == 0:
        grouping.add_not_compiled(findings, log.calls, root_loc, driver)
    if scanner is not None:
        grouping.add_fallbacks(findings, scanner.found, index, fixes)

    clean_run = not cap.breaks and failure is None
    if fullgraph_check and clean_run:
        # With no break and no failure, fullgraph=True would trace exactly the same graphs: skip the second compile.
        report.notes.append("fullgraph=True run skipped: the fullgraph=False run had no graph break to differ at")
    elif fullgraph_check:
        steps = min(fullgraph_steps, max(report.decode_steps, 0))
        say(f"compiling with fullgraph=True: prefill + {steps} decode steps")
        # Dynamo alone decides where a whole-graph compile stops; the plain eager backend is enough and fast.
        with cap_mod.capture_dynamo() as cap2:
            failure2, _ = _run(driver, model, cap2, "eager", fullgraph=True, steps=steps)
        if failure2 is not None:
            grouping.add_failure(findings, failure2, index, fixes, root_loc, mode="fullgraph=True")
        else:
            report.notes.append(f"fullgraph=True compiled prefill + {steps} decode steps without error")

    if failure_backend is not None and failure is None:
        say(f"hard-failure check: compiling the prefill with {failure_backend}")
        with cap_mod.capture_dynamo() as cap4:
            failure4, _ = _run(driver, model, cap4, failure_backend, steps=0)
        if failure4 is not None:
            grouping.add_failure(findings, failure4, index, fixes, root_loc, mode=failure_backend)
        report.backend = f"eager + {failure_backend} (prefill)"

    if use_inductor and backend != "inductor":
        say("compiling with inductor to find ATen fallbacks")
        with cap_mod.capture_dynamo() as cap3, _maybe_scan(True) as scanner3:
            failure3, _ = _run(driver, model, cap3, "inductor", scanner=scanner3, steps=min(1, report.decode_steps))
        grouping.add_fallbacks(findings, scanner3.found, index, fixes)
        if failure3 is not None:
            grouping.add_failure(findings, failure3, index, fixes, root_loc, mode="inductor")

    grouping.inherit_causes(findings)
    report.findings = list(findings.values())
    stats.compile_failures = len(report.compile_failures)
    stats.inductor_fallbacks = sum(f.occurrences for f in report.inductor_fallbacks)
    report.stats = stats
    return report


def _eager_check(model: nn.Module, driver: Driver) -> None:
    """Run a prefill and one decode step eagerly: the model (or graphfix's reading of its convention) must work."""
    try:
        with intercepted(model) as log:
            driver.run(model, steps=min(1, max(driver.decode_steps, 1)))
    except GraphfixError:
        raise
    except Exception as exc:  # the user's model is broken, or graphfix's guess of its convention is wrong
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if getattr(driver, "auto", False):
            raise InputError(
                f"{describe_signature(model)} looked like the {driver.description} convention, but a prefill call "
                f"that way failed: {type(exc).__name__}: {first}", hint=NO_CONVENTION_HINT) from exc
        raise ModelRunError(
            f"{type(model).__name__}.forward fails in eager mode: {type(exc).__name__}: {first}",
            hint="fix the model or its inputs first; rerun with --debug for the traceback",
        ) from exc
    if log.calls == 0:
        raise InputError(f"the driver ({driver.description}) never called {type(model).__name__}'s forward",
                         hint="the driver must run the model it is given: fn(model) calls model(...) or model.forward")


def _run(driver: Driver, model: nn.Module, cap: cap_mod.Capture, backend: str, *, fullgraph: bool = False,
         scanner: Any = None, steps: int | None = None) -> tuple[BaseException | None, CallLog]:
    """Run the driver's loop with the model's forward compiled; a compile error ends it and is returned."""

    def on_phase(phase: str) -> None:
        cap.phase = phase
        if scanner is not None:
            scanner.phase = phase

    compiled = torch.compile(model.forward, backend=cap.backend(backend), fullgraph=fullgraph)
    log = CallLog()
    try:
        with compile_failure_contained(), intercepted(model, compiled, on_phase=on_phase) as log:
            driver.run(model, steps=steps)
    except GraphfixError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model raises under compile is a finding, returned
        exc.graphfix_phase = cap.phase  # type: ignore[attr-defined]
        return exc, log
    return None, log


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_scan(enabled: bool) -> Any:
    if not enabled:
        return _NullContext()
    from graphfix.diagnose.inductor_scan import scan_fallbacks

    return scan_fallbacks()


def _forward_location(model: nn.Module) -> Location | None:
    import inspect

    fn = inspect.unwrap(type(model).forward)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return Location(code.co_filename, code.co_firstlineno, code.co_name, "")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / (1024 * 1024)


def _versions() -> dict[str, str]:
    from graphfix import __version__

    versions = {"graphfix": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions
