"""Every zoo codebase, driven by its own loop: the report lists what torch logs, and optimize verifies.

For each Llama implementation in ``tests/zoo`` (litgpt, IBM fms, Meta's reference code,
gpt-fast style, Hugging Face Llama and Qwen2 with a hand-written ``DynamicCache`` loop, a
research-style file), ``graphfix.optimize(model, driver=loop)`` runs once (module fixture):

- its *before* report (diagnosis through the codebase's loop, hidden breaks searched) is
  compared with torch's own ``TORCH_LOGS=graph_breaks,recompiles`` record of the same loop
  (``tests/zoo/torch_logs.py``, which shares no code with graphfix's capture): every break
  site and every failing guard torch logs is in the report, and so is every break torch logs
  once the passes the report names are applied (the hidden ones);
- the optimized model gives the original's greedy tokens over a prefill and 32 decode steps
  through that same loop, with no graph break, no recompile after warm-up, and compiled
  graphs running in the loop; or optimize refuses in one line and leaves the model as it was.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings

import pytest
import torch

import graphfix
from graphfix.diagnose.findings import Kind
from graphfix.errors import UnsupportedModelError
from graphfix.rewrite.planner import plan_passes
from tests.zoo import ZOO, load
from tests.zoo.torch_logs import torch_logged_once

NAMES = list(ZOO)
REFUSED_AT_MOST = 1
"""The issue allows one codebase of the zoo to be refused (in one line); the names refused are listed here."""
EXPECTED_REFUSALS: set[str] = set()
BREAKING = {"meta", "research"}
"""The codebases whose own code graph-breaks under torch.compile (the others only recompile)."""


def _site(file: str, line: int) -> tuple[str, int]:
    return os.path.realpath(file), line


def _guard_kind(guard: str) -> str:
    """A guard with its numbers and source comment removed: what stays the same across runs."""
    return re.sub(r"\d+", "#", guard.split("#")[0]).strip()


def _root_site(model: torch.nn.Module) -> tuple[str, int]:
    code = inspect.unwrap(type(model).forward).__code__
    return _site(code.co_filename, code.co_firstlineno)


def _forward_wrapper_sites(model: torch.nn.Module) -> set[tuple[str, int]]:
    """The decorators wrapped around the class's forward (transformers' ``deprecate_kwarg``, ``inference_mode``)."""
    sites, fn = set(), type(model).forward
    while getattr(fn, "__wrapped__", None) is not None:
        sites.add(_site(fn.__code__.co_filename, fn.__code__.co_firstlineno))
        fn = fn.__wrapped__
    return sites


def _is_wrapper(file: str, line: int, wrappers: set[tuple[str, int]]) -> bool:
    """A frame of torch's own machinery, or a decorator around forward: the report names the forward instead."""
    return _site(file, line) in wrappers or f"{os.sep}torch{os.sep}" in os.path.realpath(file)


@pytest.fixture(scope="module", params=NAMES)
def zoo_run(request):
    name = request.param
    model, loop = load(name)
    fresh, _ = load(name)
    with torch.no_grad():
        expected = loop(fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = graphfix.optimize(model, driver=loop, backend="aot_eager")
        except UnsupportedModelError as exc:
            return name, model, loop, expected, exc
    return name, model, loop, expected, result


def test_optimize_through_the_codebases_own_loop(zoo_run):
    name, model, loop, expected, result = zoo_run
    if isinstance(result, UnsupportedModelError):
        assert name in EXPECTED_REFUSALS, f"{name} refused: {result}"
        assert "\n" not in str(result) and "cannot" in str(result)
        assert "graphfix_optimized" not in model.__dict__
        with torch.no_grad():
            assert torch.equal(loop(model), expected)  # left exactly as it was: the original's tokens
        return
    v = result.verification
    assert result.verified, result.summary()
    assert v.graph_breaks == 0 and v.recompiles == 0 and v.compile_failures == 0, v.failures
    assert result.parity.tokens_match and result.parity.greedy_steps == 33, result.parity.describe()
    state = model.graphfix_optimized
    runs = state.graph_runs()
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        again = loop(model)  # the codebase's own loop once more, nothing may compile
    assert torch.equal(again, expected)
    assert state.graph_runs() > runs, "the loop must run compiled graphs"


def test_at_most_one_codebase_refused():
    assert len(EXPECTED_REFUSALS) <= REFUSED_AT_MOST and EXPECTED_REFUSALS <= set(NAMES)


def test_report_lists_what_torch_logs(zoo_run):
    name, _, _, _, result = zoo_run
    if isinstance(result, UnsupportedModelError):
        report = graphfix.diagnose(*load(name))
    else:
        report = result.before
    logged = torch_logged_once(name)
    reported_sites = {_site(f.location.file, f.location.line) for f in report.graph_breaks if f.location}
    reported_sites |= {_site(s.file, s.line) for f in report.graph_breaks for s in f.stack}
    missing = [(file, line, why) for file, line, why in logged.breaks if _site(file, line) not in reported_sites]
    assert not missing, f"{name}: breaks torch logged that the report lacks: {missing}"
    # A recompile is the same event when it recompiles the same function: which failing guard Dynamo names first
    # can differ between processes (it checks guards in an order that adapts to earlier failures).
    recompiled = {_site(f.location.file, f.location.line) for f in report.recompiles if f.location}
    recompiled |= {_site(s.file, s.line) for f in report.recompiles for s in f.stack}
    wrappers = _forward_wrapper_sites(load(name)[0])  # reported at the forward they wrap, by design
    missing_recompiles = [(r.function, r.file, r.line, r.guard) for r in logged.recompile_records
                          if _site(r.file, r.line) not in recompiled
                          and not (_is_wrapper(r.file, r.line, wrappers) and _root_site(load(name)[0]) in recompiled)]
    assert not missing_recompiles, f"{name}: recompiles torch logged that the report lacks: {missing_recompiles}"
    guards = {_guard_kind(f.guard or "") for f in report.recompiles}
    assert len(guards) >= len({_guard_kind(g) for _, g in logged.recompiles}) / 2  # the causes, not just sites
    assert report.stats.graph_runs and report.stats.graph_runs > 0


def test_hidden_breaks_are_the_ones_torch_logs_once_the_first_are_fixed(zoo_run):
    name, _, _, _, result = zoo_run
    report = result.before if not isinstance(result, UnsupportedModelError) else graphfix.diagnose(*load(name))
    if not report.graph_breaks:  # nothing can hide behind no break: only the codebases without breaks get here
        assert name not in BREAKING, f"{name} must break"
        return
    names = plan_passes(load(name)[0], report.findings)
    fixed = torch_logged_once(name, passes=names)
    import graphfix as package

    own = os.path.dirname(os.path.realpath(package.__file__))
    reported = {_site(f.location.file, f.location.line) for f in report.findings if f.location}
    reported |= {_site(s.file, s.line) for f in report.findings for s in f.stack}
    missing = [(file, line, why) for file, line, why in fixed.breaks
               if _site(file, line) not in reported and not os.path.realpath(file).startswith(own)]
    assert not missing, f"{name}: breaks torch logs with {names} applied that the report lacks: {missing}"


def test_models_with_breaks_are_the_expected_ones(zoo_run):
    name, _, _, _, result = zoo_run
    if isinstance(result, UnsupportedModelError):
        return
    has_breaks = bool(result.before.of_kind(Kind.GRAPH_BREAK))
    assert has_breaks == (name in BREAKING), (name, [f.message for f in result.before.graph_breaks])
