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

import platform
import resource
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from graphfix.diagnose import capture as cap_mod
from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.diagnose.drivers import CallsDriver, Driver, auto_driver
from graphfix.diagnose.findings import Category, Finding, Kind, Location, Severity
from graphfix.diagnose.modulemap import ModuleIndex
from graphfix.diagnose.report import Report, RunStats
from graphfix.diagnose.taxonomy import SUGGESTIONS, classify_break, classify_recompile
from graphfix.errors import GraphfixError, ModelRunError
from graphfix.rewrite.pass_manager import available_passes

Progress = Callable[[str], None]


def diagnose(
    model: nn.Module,
    inputs: Sequence[Any] | None = None,
    *,
    driver: Driver | None = None,
    backend: str = "auto",
    inductor: bool = False,
    fullgraph_check: bool = True,
    fullgraph_steps: int = 1,
    prefill_tokens: int = 8,
    decode_steps: int = 16,
    name: str | None = None,
    source: str = "module",
    progress: Progress | None = None,
) -> Report:
    """Diagnose ``model`` under ``torch.compile`` and return a ``Report``.

    ``inputs`` is an optional list of example calls (each a tuple of args, or a
    dict of kwargs); without it the driver is chosen from the model's calling
    convention (HF causal LM or Meta ``forward(tokens, start_pos)``).
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    # backend "auto": the loop runs on plain Dynamo (breaks and recompiles are Dynamo's), and a separate
    # hard-failure run compiles the prefill with aot_eager (AOT autograd is where e.g. inference mode fails).
    # On the meta device there are no weights and the AOT run is skipped.
    failure_backend = None
    if backend == "auto":
        backend = "eager"
        failure_backend = None if _device_of(model).type == "meta" else "aot_eager"
    if driver is None:
        driver = CallsDriver(_normalize_calls(inputs)) if inputs is not None else auto_driver(
            model, prefill_tokens, decode_steps
        )
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
    fixes = _fix_table()
    root_loc = _forward_location(model)

    say("eager run (checks the model works before compiling)")
    _eager_check(model, driver)

    use_inductor = inductor or backend == "inductor"
    say(f"compiling with fullgraph=False, backend={backend}: prefill + {driver.decode_steps} decode steps")
    findings: OrderedDict[tuple, Finding] = OrderedDict()
    stats = RunStats()
    run_started = time.perf_counter()
    with cap_mod.capture_dynamo() as cap, _maybe_scan(use_inductor and backend == "inductor") as scanner:
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend=cap.backend(backend), fullgraph=False)
        failure = _run(driver, compiled, model, cap, scanner)
        frames_ok = int(torch._dynamo.utils.counters["frames"].get("ok", 0))
    stats.seconds = round(time.perf_counter() - run_started, 3)
    stats.calls = driver.decode_steps + 1
    stats.graphs = cap.graphs
    stats.graph_breaks = len(cap.breaks)
    stats.graphs_per_prefill = cap.runs_by_phase.get("prefill", 0)
    stats.graphs_per_decode = cap.runs_by_phase.get(f"decode:{driver.decode_steps}", 0)
    stats.compiled_frames = frames_ok
    stats.recompiles = len(cap.recompiles)
    _add_breaks(findings, cap.breaks, index, fixes, mode="fullgraph=False")
    _add_recompiles(findings, cap.recompiles, index, fixes, root_loc)
    _add_limits(findings, cap.limits, index, fixes)
    if failure is not None:
        _add_failure(findings, failure, index, fixes, root_loc, mode="fullgraph=False")
    if scanner is not None:
        _add_fallbacks(findings, scanner.found, index, fixes)

    clean_run = not cap.breaks and failure is None
    if fullgraph_check and clean_run:
        # With no break and no failure, fullgraph=True would trace exactly the same graphs: skip the second compile.
        report.notes.append("fullgraph=True run skipped: the fullgraph=False run had no graph break to differ at")
    elif fullgraph_check:
        steps = min(fullgraph_steps, driver.decode_steps)
        say(f"compiling with fullgraph=True: prefill + {steps} decode steps")
        # Dynamo alone decides where a whole-graph compile stops; the plain eager backend is enough and fast.
        with cap_mod.capture_dynamo() as cap2:
            compiled = torch.compile(model, backend=cap2.backend("eager"), fullgraph=True)
            failure2 = _run(driver, compiled, model, cap2, None, steps=steps)
        if failure2 is not None:
            _add_failure(findings, failure2, index, fixes, root_loc, mode="fullgraph=True")
        else:
            report.notes.append(f"fullgraph=True compiled prefill + {steps} decode steps without error")

    if failure_backend is not None and failure is None:
        say(f"hard-failure check: compiling the prefill with {failure_backend}")
        with cap_mod.capture_dynamo() as cap4:
            compiled = torch.compile(model, backend=cap4.backend(failure_backend))
            failure4 = _run(driver, compiled, model, cap4, None, steps=0)
        if failure4 is not None:
            _add_failure(findings, failure4, index, fixes, root_loc, mode=failure_backend)
        report.backend = f"eager + {failure_backend} (prefill)"

    if use_inductor and backend != "inductor":
        say("compiling with inductor to find ATen fallbacks")
        with cap_mod.capture_dynamo() as cap3, _maybe_scan(True) as scanner3:
            compiled = torch.compile(model, backend=cap3.backend("inductor"))
            failure3 = _run(driver, compiled, model, cap3, scanner3, steps=min(1, driver.decode_steps))
        _add_fallbacks(findings, scanner3.found, index, fixes)
        if failure3 is not None:
            _add_failure(findings, failure3, index, fixes, root_loc, mode="inductor")

    _inherit_causes(findings)
    report.findings = list(findings.values())
    stats.compile_failures = len(report.compile_failures)
    stats.inductor_fallbacks = sum(f.occurrences for f in report.inductor_fallbacks)
    report.stats = stats
    report.wall_seconds = round(time.perf_counter() - started, 3)
    report.peak_memory_mb = round(_peak_rss_mb(), 1)
    return report


def _normalize_calls(inputs: Sequence[Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    calls = []
    for item in inputs:
        if isinstance(item, dict):
            calls.append(((), dict(item)))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) and isinstance(item[0], tuple):
            calls.append(item)
        elif isinstance(item, (tuple, list)):
            calls.append((tuple(item), {}))
        else:
            calls.append(((item,), {}))
    if not calls:
        raise GraphfixError("no example inputs given", hint="pass at least one call: a prefill")
    return calls


def _eager_check(model: nn.Module, driver: Driver) -> None:
    try:
        driver.run(model, steps=min(1, driver.decode_steps), model=model)  # type: ignore[call-arg]
    except GraphfixError:
        raise
    except Exception as exc:  # the user's model is broken, not graphfix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelRunError(
            f"{type(model).__name__}.forward fails in eager mode: {type(exc).__name__}: {first}",
            hint="fix the model or its inputs first; rerun with --debug for the traceback",
        ) from exc


def _run(driver: Driver, compiled: Any, model: nn.Module, cap: cap_mod.Capture, scanner: Any,
         steps: int | None = None) -> BaseException | None:
    """Run the loop; a compile error ends it and is returned, not raised."""

    def on_phase(phase: str) -> None:
        cap.phase = phase
        if scanner is not None:
            scanner.phase = phase

    try:
        with compile_failure_contained():
            driver.run(compiled, on_phase=on_phase, steps=steps, model=model)  # type: ignore[call-arg]
    except GraphfixError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model raises under compile is a finding, returned
        exc.graphfix_phase = cap.phase  # type: ignore[attr-defined]
        return exc
    return None


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


def _fix_table() -> dict[Category, str]:
    table: dict[Category, str] = {}
    for pass_name, cls in available_passes().items():
        for category in cls.fixes:
            table.setdefault(category, pass_name)
    return table


def _merge(findings: OrderedDict[tuple, Finding], key: tuple, make: Callable[[], Finding], phase: str,
           mode: str = "") -> Finding:
    existing = findings.get(key)
    if existing is None:
        finding = make()
        finding.phase = phase
        finding.mode = mode
        findings[key] = finding
        return finding
    existing.occurrences += 1
    if mode and mode not in existing.mode.split(", "):
        existing.mode = f"{existing.mode}, {mode}" if existing.mode else mode
    return existing


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Encountered graph break"):
            return line
    return text.strip()


def _add_breaks(findings: OrderedDict, breaks: list[cap_mod.RawBreak], index: ModuleIndex,
                fixes: dict[Category, str], mode: str) -> None:
    for event in breaks:
        category = classify_break(event.gb_type, event.reason, event.stack or [event.location])
        key = (Kind.GRAPH_BREAK, event.location.file, event.location.line, event.gb_type or _first_line(event.reason))

        def make(event: cap_mod.RawBreak = event, category: Category = category) -> Finding:
            message = event.gb_type or _first_line(event.reason)
            if event.skipped_frame:
                message = f"frame skipped, runs in Python: {message}"
            return Finding(
                kind=Kind.GRAPH_BREAK,
                category=category,
                message=message,
                location=event.location,
                stack=event.stack,
                module_paths=index.resolve(event.stack, event.location),
                gb_type=event.gb_type,
                gb_id=event.gb_id,
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.WARNING,
            )

        finding = _merge(findings, key, make, event.phase, mode)
        if event.stack:
            if not finding.stack:
                finding.stack = event.stack
                finding.module_paths = []
            # The same line breaks in different modules (fairscale's reduce in wo, w2, the embedding): list each.
            for path in index.resolve(event.stack, event.location):
                if path not in finding.module_paths:
                    finding.module_paths.append(path)


def guard_location(guard: str) -> Location | None:
    """Where a guard came from: Dynamo appends ``# source  # path/file.py:LINE in fn`` to it."""
    import re

    m = re.search(r"#\s*(.*?)\s*#\s*(\S+?\.py):(\d+) in (\S+)", guard)
    if not m:
        return None
    path = _find_file(m.group(2))
    return Location(path, int(m.group(3)), m.group(4), m.group(1).strip()) if path else None


def _find_file(rel: str) -> str | None:
    import os

    if os.path.isabs(rel) and os.path.exists(rel):
        return rel
    for base in [os.getcwd(), *sys.path]:
        candidate = os.path.join(base, rel)
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return None


def _add_recompiles(findings: OrderedDict, recompiles: list[cap_mod.RawRecompile], index: ModuleIndex,
                    fixes: dict[Category, str], root: Location | None) -> None:
    for event in recompiles:
        if root is not None and (cap_mod.is_internal(event.location.file) or _is_root_wrapper(event.location, index)):
            # Dynamo's or a library's decorator around the model's forward: blame the forward itself.
            event.location = root
        guard = event.guards[0] if event.guards else "(guard not reported)"
        where = guard_location(guard) or event.location
        category = classify_recompile(guard, event.phase)
        probe = Finding(Kind.RECOMPILE, category, "", guard=guard)
        key = (Kind.RECOMPILE, event.location.file, event.location.line, probe.guard_kind())

        def make(event: cap_mod.RawRecompile = event, guard: str = guard, where: Location = where,
                 category: Category = category) -> Finding:
            return Finding(
                kind=Kind.RECOMPILE,
                category=category,
                message=f"{event.function} recompiled: {guard.split('#')[0].strip()}",
                location=where,
                stack=[event.location] if where is not event.location else [],
                module_paths=index.resolve([event.location], event.location),
                guard=guard,
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.WARNING,
            )

        _merge(findings, key, make, event.phase)


def _is_root_wrapper(location: Location, index: ModuleIndex) -> bool:
    """True for the code of a decorator wrapping the root module's forward (transformers' ``wrapper``)."""
    fn = getattr(index.root_class, "forward", None)
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_filename == location.file and code.co_firstlineno == location.line:
            return getattr(fn, "__wrapped__", None) is not None
        fn = getattr(fn, "__wrapped__", None)
    return False


def _add_limits(findings: OrderedDict, limits: list[cap_mod.RawLimit], index: ModuleIndex,
                fixes: dict[Category, str]) -> None:
    for event in limits:
        loc = event.location
        key = (Kind.RECOMPILE, loc.file if loc else "", loc.line if loc else 0, "limit")
        _merge(
            findings,
            key,
            lambda event=event, loc=loc: Finding(
                kind=Kind.RECOMPILE,
                category=Category.RECOMPILE_LIMIT,
                message=event.message,
                location=loc,
                module_paths=index.resolve([], loc) if loc else [],
                fix_pass=fixes.get(Category.DYNAMIC_CACHE),
                suggestion=SUGGESTIONS[Category.RECOMPILE_LIMIT],
                severity=Severity.ERROR,
            ),
            event.phase,
        )


def _add_failure(findings: OrderedDict, exc: BaseException, index: ModuleIndex, fixes: dict[Category, str],
                 root: Location | None, mode: str) -> None:
    inner = getattr(exc, "inner_exception", None)
    shown = inner if isinstance(inner, BaseException) else exc  # BackendCompilerFailed wraps the real error
    text = f"{type(shown).__name__}: {shown}\n{exc}"
    gb_type, gb_id = cap_mod.parse_gb_type(str(exc))
    message_stack = [f for f in cap_mod.parse_stack(str(exc)) if not cap_mod.is_internal(f.file)]
    tb_stack = [
        Location(fs.filename, fs.lineno or 0, fs.name, (fs.line or "").strip())
        for fs in traceback.extract_tb(exc.__traceback__)
        if not cap_mod.is_internal(fs.filename) and "site-packages/torch/" not in fs.filename
    ]
    stack = message_stack or tb_stack
    location = stack[-1] if stack else root
    is_break = isinstance(exc, torch._dynamo.exc.Unsupported) and "fullgraph" in mode
    kind = Kind.GRAPH_BREAK if is_break else Kind.COMPILE_FAILURE
    category = classify_break(gb_type, text, stack)
    first = gb_type or _first_line(str(shown)) or type(shown).__name__
    file, line = (location.file, location.line) if location else ("", 0)
    key = (kind, file, line, gb_type or first)

    def make() -> Finding:
        return Finding(
            kind=kind,
            category=category,
            message=first if is_break else f"{type(shown).__name__}: {first}",
            location=location,
            stack=stack,
            module_paths=index.resolve(stack, location),
            gb_type=gb_type,
            gb_id=gb_id,
            fix_pass=fixes.get(category),
            suggestion=SUGGESTIONS.get(category) or None,
            severity=Severity.ERROR,
        )

    _merge(findings, key, make, getattr(exc, "graphfix_phase", ""), mode)


def _add_fallbacks(findings: OrderedDict, found: list[Any], index: ModuleIndex, fixes: dict[Category, str]) -> None:
    for event in found:
        category = Category.COMPLEX_ROPE if "complex" in event.reason else Category.UNSUPPORTED_OP
        loc = event.location
        key = (Kind.INDUCTOR_FALLBACK, loc.file if loc else "", loc.line if loc else 0, event.op)
        _merge(
            findings,
            key,
            lambda event=event, loc=loc, category=category: Finding(
                kind=Kind.INDUCTOR_FALLBACK,
                category=category,
                message=f"{event.op}: {event.reason}",
                location=loc,
                stack=event.stack,
                module_paths=index.resolve(event.stack, loc),
                fix_pass=fixes.get(category),
                suggestion=SUGGESTIONS.get(category) or None,
                severity=Severity.NOTE,
            ),
            event.phase,
            "inductor",
        )


def _inherit_causes(findings: OrderedDict) -> None:
    """A frame skipped after a break at the same line shares that break's cause."""
    by_line: dict[tuple[str, int], Finding] = {}
    for f in findings.values():
        if f.location and f.category != Category.OTHER:
            by_line.setdefault((f.location.file, f.location.line), f)
    for f in findings.values():
        if f.category == Category.OTHER and f.location:
            cause = by_line.get((f.location.file, f.location.line))
            if cause is not None:
                f.category, f.fix_pass, f.suggestion = cause.category, cause.fix_pass, cause.suggestion


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
