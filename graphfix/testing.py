"""pytest helpers: fail a test when your model graph-breaks or recompiles.

These use torch directly (``torch._dynamo.explain`` and the
``fail_on_recompile`` compile stance), not graphfix's diagnosis engine, so
they are cheap enough for a unit test of a small model::

    from graphfix.testing import assert_no_graph_breaks, assert_no_recompiles

    def test_block_compiles_whole():
        assert_no_graph_breaks(MyBlock(), torch.randn(2, 8, 64))

    def test_decode_step_does_not_recompile():
        step = DecodeStep(model)
        assert_no_recompiles(step, [(tok, 10), (tok, 11), (tok, 12)], dynamic=True)

Both raise ``AssertionError`` naming each site (``file:line``) and the reason
or guard that failed, so pytest shows what to fix.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

from graphfix.diagnose.findings import display_path

_CAUSE_LINES = 3
"""How many lines of a break reason or guard failure the assertion message keeps."""


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """One graph-break site found by ``torch._dynamo.explain``; ``count`` is how often it was hit."""

    file: str
    line: int
    function: str
    source: str
    reason: str
    count: int = 1

    def short(self) -> str:
        return f"{display_path(self.file)}:{self.line}" if self.file else "<unknown>"

    @property
    def skipped_frame(self) -> bool:
        """Dynamo gave up on the whole frame (e.g. a break inside a loop): all of it runs eagerly."""
        text = self.reason.lower()
        return "skipping the frame" in text or "skipping the function" in text

    def describe(self) -> str:
        reason = _first_lines(self.reason, 1)
        if self.skipped_frame:
            reason += " [Dynamo skipped the whole frame: it runs eagerly]"
        times = f" (x{self.count})" if self.count > 1 else ""
        where = f" in {self.function}" if self.function else ""
        text = f"{self.short()}{where}{times}: {reason}"
        return text + (f"\n      {self.source.strip()}" if self.source.strip() else "")


def _first_lines(text: str, n: int) -> str:
    lines = [ln.rstrip() for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n])


def _uncompiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The original module or function behind a ``torch.compile`` wrapper."""
    import torch

    if isinstance(fn, torch._dynamo.eval_frame.OptimizedModule):
        return fn._orig_mod
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _is_compiled(fn: Callable[..., Any]) -> bool:
    import torch

    return isinstance(fn, torch._dynamo.eval_frame.OptimizedModule) or hasattr(fn, "_torchdynamo_orig_callable")


def graph_breaks(model_or_fn: Callable[..., Any], *example_inputs: Any, **example_kwargs: Any) -> list[GraphBreak]:
    """The graph-break sites of ``model_or_fn(*example_inputs, **example_kwargs)``.

    ``torch._dynamo.explain`` lists the breaks Dynamo handled (one
    ``GraphBreak`` per distinct innermost user frame and reason, in the order
    first hit). A break inside a loop is not handled: Dynamo skips the whole
    frame and runs it eagerly, and explain lists nothing. So when explain
    finds no break, the call is compiled once more with ``fullgraph=True``
    (eager backend), which fails at the first break of any kind; that break
    is returned. The call runs two or three times; Dynamo's caches are reset
    before and after.
    """
    import torch
    from torch._dynamo.utils import counters

    target = _uncompiled(model_or_fn)
    unimplemented_before = dict(counters["unimplemented"])
    out = torch._dynamo.explain(target)(*example_inputs, **example_kwargs)
    sites: dict[tuple[str, int, str], GraphBreak] = {}
    for br in out.break_reasons:
        stack = list(getattr(br, "user_stack", None) or [])
        _add(sites, stack[-1] if stack else None, str(getattr(br, "reason", "") or "unknown reason"))
    if sites:
        return list(sites.values())

    # Nothing listed: either the call is one graph, or Dynamo gave up on a frame (a break in a loop).
    skipped = [r for r, n in counters["unimplemented"].items() if n > unimplemented_before.get(r, 0)]
    # Prefer the reason that says the frame was skipped: it explains why explain listed nothing.
    skipped.sort(key=lambda r: "skipping the frame" not in r.lower())
    torch._dynamo.reset()
    try:
        torch.compile(target, backend="eager", fullgraph=True)(*example_inputs, **example_kwargs)
    except torch._dynamo.exc.TorchDynamoException as exc:
        stack = list(getattr(exc, "real_stack", None) or [])
        frame = stack[-1] if stack else getattr(exc, "innermost_user_frame_summary", None)
        _add(sites, frame, skipped[0] if skipped else str(exc))
    finally:
        torch._dynamo.reset()
    if not sites and (skipped or out.graph_break_count > 0):
        # Dynamo split or skipped without a location we could recover (rare): still a break.
        _add(sites, None, skipped[0] if skipped else f"{out.graph_break_count} graph break(s), no reason recorded")
    return list(sites.values())


def _add(sites: dict[tuple[str, int, str], GraphBreak], frame: Any, reason: str) -> None:
    """Record one hit of a break at ``frame`` (a ``FrameSummary`` or ``None``)."""
    file = getattr(frame, "filename", "") or ""
    line = int(getattr(frame, "lineno", 0) or 0)
    key = (file, line, _first_lines(reason, 1))
    if key in sites:
        sites[key] = dataclasses.replace(sites[key], count=sites[key].count + 1)
    else:
        sites[key] = GraphBreak(file=file, line=line, function=getattr(frame, "name", "") or "",
                                source=getattr(frame, "line", "") or "", reason=reason)


def assert_no_graph_breaks(model_or_fn: Callable[..., Any], *example_inputs: Any, **example_kwargs: Any) -> None:
    """Fail (``AssertionError``) if Dynamo cannot capture the call as one graph.

    ``example_inputs`` and ``example_kwargs`` are passed to ``model_or_fn``
    (a module, a function, or an already ``torch.compile``-d one). A
    compilation error (not a graph break) fails too, with the error chained.
    """
    import torch

    name = getattr(_uncompiled(model_or_fn), "__qualname__", None) or type(model_or_fn).__name__
    try:
        found = graph_breaks(model_or_fn, *example_inputs, **example_kwargs)
    except torch._dynamo.exc.TorchDynamoException as exc:
        raise AssertionError(f"{name}: torch.compile failed: {_first_lines(exc, _CAUSE_LINES)}") from exc
    if found:
        total = sum(b.count for b in found)
        lines = [f"{name}: {len(found)} graph-break site(s), {total} break(s) in all:"]
        lines += [f"  - {b.describe()}" for b in found]
        raise AssertionError("\n".join(lines))


def _call(fn: Callable[..., Any], item: Any) -> Any:
    return fn(*item) if isinstance(item, tuple) else fn(item)


def assert_no_recompiles(
    fn: Callable[..., Any],
    inputs_sequence: Iterable[Any],
    *,
    backend: str | Callable[..., Any] = "eager",
    dynamic: bool | None = None,
    fullgraph: bool = False,
    reset: bool = True,
) -> None:
    """Fail (``AssertionError``) if any call after the first recompiles ``fn``.

    Each item of ``inputs_sequence`` is one call: a tuple is unpacked into
    positional arguments, anything else is passed as the only argument (wrap a
    single tuple argument in another tuple; use ``functools.partial`` or a
    lambda for keyword arguments). The first call compiles (warm-up); the rest
    run under ``torch.compiler.set_stance("fail_on_recompile")`` and the
    guard failure that would have triggered a recompile becomes the message.

    ``fn`` is compiled with ``torch.compile(fn, backend=backend,
    dynamic=dynamic, fullgraph=fullgraph)`` unless it is already compiled (then
    it is used as is). ``reset`` clears Dynamo's caches first so that earlier
    tests do not hide or cause a recompile.
    """
    import torch

    items = list(inputs_sequence)
    if len(items) < 2:
        raise ValueError("assert_no_recompiles needs at least two inputs: one to compile, one or more to check")
    if not hasattr(torch.compiler, "set_stance"):  # pragma: no cover - torch < 2.6
        raise RuntimeError("assert_no_recompiles needs torch.compiler.set_stance (torch >= 2.6)")
    if reset:
        torch._dynamo.reset()
    compiled = fn if _is_compiled(fn) else torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    name = getattr(_uncompiled(fn), "__qualname__", None) or type(fn).__name__

    _call(compiled, items[0])
    for i, item in enumerate(items[1:], start=2):
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                _call(compiled, item)
        except RuntimeError as exc:
            text = str(exc)
            if "fail_on_recompile" not in text:
                raise
            raise AssertionError(
                f"{name}: call {i} of {len(items)} recompiled (the first call compiled it).\n"
                + _describe_recompile(text)
            ) from None


_FRAME = re.compile(r"filename: '(?P<file>.*?)', function name: '(?P<fn>.*?)', line number: (?P<line>\d+)")


def _describe_recompile(text: str) -> str:
    """Dynamo's fail_on_recompile message: the frame (path shortened) and the guard failures."""
    out = []
    for ln in text.strip().splitlines():
        if not ln.strip():
            continue
        m = _FRAME.search(ln) if ln.startswith("Detected recompile") else None
        if m:
            out.append(f"  frame: {m['fn']} at {display_path(m['file'])}:{m['line']}")
        else:
            out.append("  " + re.sub(r" {3,}", "  ", ln.strip()))
    return "\n".join(out)


__all__ = ["GraphBreak", "assert_no_graph_breaks", "assert_no_recompiles", "graph_breaks"]
