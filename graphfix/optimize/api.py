"""``optimize``: diagnose, rewrite, compile and verify a Llama-style model, keeping its calling convention.

The flow (docs/optimize.md):

1. **reference**: the original model, eager, runs a prefill and ``decode_steps`` greedy decode
   steps through its own calling convention; its logits and tokens are kept (``verify``
   compares against them, so numerics never change silently);
2. **before**: ``diagnose`` (cheap ``eager`` backend) lists breaks, recompiles, failures;
3. **passes**: ``"auto"`` picks the pass named by each finding (``Finding.fix_pass``), plus,
   for Meta's ``Transformer``, the five passes that give it the tensor-only core; they run
   in registry order. An explicit list of names is accepted too;
4. **runtime**: HF models get ``graphfix.optimize.hf_runtime`` (a static cache handed to ``generate``,
   decode and prefill compiled apart); Meta models get ``set_compiled_core`` with decode
   and prefill compiled apart; other ``forward(tokens, start_pos)`` models get their
   forward (or the core the inference-mode pass split off) compiled with ``fullgraph=True``;
5. **after**: ``diagnose`` again, on the rewritten model before compiling;
6. **compile** (warm-up: a prefill and one decode step, timed) and **verify**.

A failed verification never passes silently: ``verified=False``, a ``warnings.warn`` and a
note (or ``VerificationError`` with ``strict=True``). When the compiled path itself fails
(a graph break or a compile error), it is switched off and the model runs its rewritten
code eagerly, so the returned model always works.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

from graphfix.diagnose.diagnosis import diagnose
from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.diagnose.drivers import is_hf_causal_lm, prompt_tokens, takes_start_pos
from graphfix.diagnose.report import Report
from graphfix.errors import InputError, UnsupportedModelError
from graphfix.optimize.verification import (
    ParityResult,
    Trace,
    VerificationError,
    VerifyResult,
    classify_failure,
    quiet,
    run_verification,
    runner_for,
)
from graphfix.rewrite.blocks import meta_llama, side_effects
from graphfix.rewrite.codeobj import own_code
from graphfix.rewrite.pass_manager import PassContext, PassResult, available_passes

SCHEMA = "graphfix.optimize"
SCHEMA_VERSION = 1

META_PASSES = ("functional-collectives", "real-rope", "sdpa-attention", "static-kv-cache", "inference-mode")
"""Passes that always run on Meta's ``Transformer`` (their breaks hide each other from diagnosis)."""

Progress = Callable[[str], None]


class OptimizeWarning(UserWarning):
    """``optimize`` could not verify the model it returns."""


def default_backend(device: torch.device | str | None = None) -> str:
    """``inductor`` on CUDA, and on CPU when a C++ compiler is present; else ``aot_eager``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return "inductor"
    if dev.type == "cpu" and _has_cxx():
        return "inductor"
    return "aot_eager"


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


# ---------------------------------------------------------------------------
# What optimize leaves on the model
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class OptimizedState:
    """Stored on the model as ``model.graphfix_optimized``: what ``verify`` needs later."""

    model: nn.Module
    kind: str
    """``hf``, ``meta`` or ``generic`` (a ``forward(tokens, start_pos)`` model)."""
    reference: Trace
    dtype: torch.dtype
    max_seq_len: int
    backend: str | None = None
    code: dict[str, types.CodeType] = dataclasses.field(default_factory=dict)
    """Meta and generic: the code object of each compiled callable (``prefill``/``decode`` or ``forward``)."""
    runtime: Any = None
    """HF: the ``HFRuntime`` (its callables are made per call signature)."""
    disable: Callable[[], None] | None = None

    @property
    def compiled(self) -> bool:
        return bool(self.code) or (self.runtime is not None and self.runtime.compiled)

    def graphs(self) -> dict[str, int]:
        """Graphs compiled per callable (HF: per phase, over its variants)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        if self.runtime is not None:
            return self.runtime.graphs()
        return {phase: len(_debug_get_cache_entry_list(code)) for phase, code in self.code.items()}

    def recompiles(self) -> int:
        """Graphs beyond the expected ones: one per callable, two (prefill, decode) for a single ``forward``."""
        if self.runtime is not None:
            return self.runtime.recompiles()
        return sum(max(0, n - (2 if phase == "forward" else 1)) for phase, n in self.graphs().items())

    def new_variants_enforced(self) -> list[str]:
        return list(self.runtime.new_variants_enforced) if self.runtime is not None else []

    def eager_calls(self) -> dict[str, int]:
        from graphfix.optimize.hf_runtime import runtime_of

        rt = runtime_of(self.model) if self.kind == "hf" else None
        return dict(rt.eager_calls) if rt is not None else {}

    def uncompile(self) -> None:
        if self.disable is not None:
            self.disable()
        self.code, self.disable, self.runtime = {}, None, None


# ---------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class OptimizeResult:
    """What ``optimize`` did and measured; ``model`` is the optimized model (the same object)."""

    model: nn.Module
    before: Report
    after: Report
    passes: list[PassResult]
    parity: ParityResult | None
    verified: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    verification: VerifyResult | None = None
    name: str = ""
    kind: str = ""
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    compiled: bool = False
    compile_seconds: float | None = None
    inductor_scan: bool = False
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str, str]]:
        """The before/after table: ``(what, before, after)``, cells already formatted."""
        v = self.verification

        def cell(report: Report, field: str, verified: int | None = None) -> str:
            if verified is not None:
                return str(verified)
            return str(getattr(report.stats, field)) if diagnosed(report) else "-"

        scan = self.inductor_scan
        rows = [
            ("graphs", cell(self.before, "graphs"), cell(self.after, "graphs", v.total_graphs if v and self.compiled
                                                         else None)),
            ("graph breaks", cell(self.before, "graph_breaks"), cell(self.after, "graph_breaks",
                                                                     v.graph_breaks if v else None)),
            ("recompiles", cell(self.before, "recompiles"), cell(self.after, "recompiles", v.recompiles if v else None)),
            ("compile failures", cell(self.before, "compile_failures"),
             cell(self.after, "compile_failures", v.compile_failures if v else None)),
            ("inductor fallbacks", cell(self.before, "inductor_fallbacks") if scan else "-",
             cell(self.after, "inductor_fallbacks") if scan else "-"),
        ]
        p = self.parity
        rows.append(("parity (max rel err)", "-", f"{p.relative_error:.1e} (tol {p.tolerance:.0e})" if p else "-"))
        rows.append(("greedy tokens", "-", f"{p.greedy_match}/{p.greedy_steps} identical" if p else "-"))
        tps_b = v.reference_tokens_per_second if v else None
        tps_a = v.tokens_per_second if v else None
        rows.append(("tokens/s", f"{tps_b:.1f}" if tps_b else "-", f"{tps_a:.1f}" if tps_a else "-"))
        return rows

    def summary(self) -> str:
        """A short aligned before/after table, the passes, and the verdict."""
        what = f"{self.name} ({self.kind}, {self.dtype}, {self.device}, backend {self.backend or 'none'})"
        header = ("", "before", "after")
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [what]
        for r in rows:
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip())
        v = self.verification
        before = (f"diagnose ({self.before.backend}), prefill {self.before.prefill_tokens} + "
                  f"{self.before.decode_steps} decode steps" if diagnosed(self.before) else "not diagnosed")
        after = (f"verify, prefill {v.prefill_tokens} + {v.decode_steps} decode steps, twice, and another prompt "
                 "length" if v else f"diagnose, prefill {self.after.prefill_tokens} + {self.after.decode_steps} "
                 "decode steps" if diagnosed(self.after) else "not diagnosed")
        lines.append(f"  before: {before}; after: {after}")
        if self.compile_seconds is not None:
            lines.append(f"  compile (warm-up prefill + decode): {self.compile_seconds:.1f}s")
        for p in self.passes:
            lines.append(f"  pass {p.name}: {p.rewritten} rewritten, {len(p.skipped)} skipped"
                         + (f" ({p.notes[0]})" if p.notes and not p.rewritten else ""))
        lines.append("  verified: " + ("yes" if self.verified else "NO" if v else "not run"))
        if v and not v.ok:
            lines.extend(f"    - {f}" for f in v.failures)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "compiled": self.compiled,
            "verified": self.verified,
            "compile_seconds": self.compile_seconds,
            "seconds": self.seconds,
            "table": [{"what": w, "before": b, "after": a} for w, b, a in self.rows()],
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "parity": self.parity.to_dict() if self.parity else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "notes": list(self.notes),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def diagnosed(report: Report) -> bool:
    """Whether ``report`` comes from a diagnosis (``diagnose=False`` leaves an empty one)."""
    return report.stats.calls > 0


# ---------------------------------------------------------------------------
# optimize
# ---------------------------------------------------------------------------


def optimize(
    model: nn.Module,
    *,
    passes: str | Sequence[str] = "auto",
    max_seq_len: int | None = None,
    max_batch_size: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    compile: bool = True,
    backend: str | None = None,
    verify: bool = True,
    strict: bool = False,
    prompt: torch.Tensor | None = None,
    prefill_tokens: int = 8,
    decode_steps: int = 32,
    diagnose_steps: int = 4,
    diagnose: bool = True,
    inductor_scan: bool = False,
    tolerance: float | None = None,
    cuda_graphs: bool | None = None,
    pass_options: dict[str, Any] | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Rewrite ``model`` in place so that it compiles clean, compile it, and verify it.

    ``max_seq_len``: positions the cache holds (HF; default ``min(max_position_embeddings, 2048)``;
    Meta models keep their ``ModelArgs.max_seq_len``). ``backend``: default ``default_backend()``.
    ``prompt`` (or ``prefill_tokens`` random ids) and ``decode_steps``: the reference and the
    verification loop. ``diagnose_steps``: decode steps of the two diagnoses; ``diagnose=False``
    skips them (``"auto"`` then picks only the structural Meta passes). ``inductor_scan``:
    also list Inductor's ATen fallbacks before and after (slow). ``cuda_graphs``: decode with
    CUDA graphs (default: on CUDA with inductor). ``pass_options``: ``PassContext.options``
    (e.g. ``{"sliding_window": 4096}`` for a Meta model).
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    if "graphfix_optimized" in model.__dict__:
        raise InputError(f"{type(model).__name__} is already optimized by graphfix",
                         hint="optimize the original model once; call graphfix.verify(model) to check it again")
    kind = _kind_of(model)
    if decode_steps < 1 or prefill_tokens < 2:
        raise InputError("decode_steps must be at least 1 and prefill_tokens at least 2")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    notes: list[str] = []
    if model.training:
        model.eval()
        notes.append("the model was in training mode: optimize put it in eval mode")
    param = next(model.parameters(), None)
    if param is None or param.device.type == "meta":
        raise InputError(f"{type(model).__name__} has no weights (meta device)",
                         hint="optimize needs a real model; 'graphfix report' diagnoses from config.json alone")
    run_dtype, run_device = param.dtype, param.device
    backend = backend or default_backend(run_device)
    if cuda_graphs is None:
        cuda_graphs = run_device.type == "cuda" and backend == "inductor"
    seq_len = _max_seq_len(model, kind, max_seq_len)
    if prompt is None:
        prompt = prompt_tokens(model, prefill_tokens, 1)
    prompt = prompt.to(run_device)
    if prompt.shape[0] > max_batch_size and kind == "hf":
        raise InputError(f"prompt batch {prompt.shape[0]} exceeds max_batch_size {max_batch_size}")
    if prompt.shape[1] + decode_steps + 1 > seq_len:
        raise InputError(f"prompt of {prompt.shape[1]} tokens plus {decode_steps + 1} generated tokens exceeds "
                         f"max_seq_len {seq_len}", hint="use fewer decode steps or a larger max_seq_len")
    label = name or os.path.basename(str(getattr(getattr(model, "config", None), "name_or_path", "")).rstrip("/")) \
        or type(model).__name__

    names = _explicit_passes(passes)  # validate names before any work
    runner = runner_for(kind)
    say(f"reference: original model, eager, prefill of {prompt.shape[1]} + {decode_steps} decode steps")
    with quiet():
        reference = runner.run(model, prompt, decode_steps)

    before = _diagnose(model, label, prompt.shape[1], diagnose_steps, inductor_scan, None, say, diagnose, "original")
    if names is None:
        names = _auto_passes(model, before)
        say(f"passes from the diagnosis: {', '.join(names) or 'none'}")
    ctx = PassContext(max_seq_len=seq_len, max_batch_size=max_batch_size, dtype=dtype, device=device,
                      options=dict(pass_options or {}))
    results = _apply(model, names, ctx, say)

    state = OptimizedState(model=model, kind=kind, reference=reference, dtype=run_dtype, max_seq_len=seq_len,
                           backend=backend if compile else None)
    driver = None
    if kind == "hf":
        from graphfix.optimize import hf_runtime

        rt = hf_runtime.install(model, max_seq_len=seq_len, max_batch_size=max_batch_size)
        driver = hf_runtime.StaticCacheDriver(prefill_tokens=prompt.shape[1], decode_steps=diagnose_steps)
        notes.append(f"HF runtime: generate() gets a graphfix StaticCache of {seq_len} positions per batch size "
                     f"(up to {max_batch_size}); callers that pass their own cache (e.g. a DynamicCache), "
                     "beams, or more tokens than max_seq_len run the original forward, uncompiled")
        if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
            notes.append(f"sliding window {model.config.sliding_window}: a mask over the full-length static cache "
                         "(no ring buffer), so decode does not recompile as the window fills")
        logging_fns = side_effects.required_functions(model)
        if logging_fns:
            rt.logging_functions = frozenset(logging_fns)
    model.graphfix_optimized = state

    after = _diagnose(model, label, prompt.shape[1], diagnose_steps, inductor_scan, driver, say, diagnose, "rewritten")

    compile_seconds, warm_up_failures = None, []
    if compile:
        reason = _cannot_compile(model, kind)
        if reason:
            notes.append(f"not compiled: {reason}")
        else:
            say(f"compiling with {backend} (decode fullgraph static, prefill fullgraph dynamic length)")
            _install_compiled(state, backend, cuda_graphs)
            compile_seconds, failure = _warm_up(state, runner, prompt)
            if failure is not None:
                state.uncompile()
                warm_up_failures.append(failure)
                notes.append(f"compiled path switched off, the model runs eagerly: {classify_failure(failure)[1]}")
            elif cuda_graphs:
                notes.append("decode runs with CUDA graphs (mode='reduce-overhead')")

    verification, verified = None, False
    if verify:
        verification = run_verification(state, tolerance=tolerance, progress=say, earlier=warm_up_failures)
        verified = verification.ok and (state.compiled or not compile)
        if not verification.ok and (verification.graph_breaks or verification.compile_failures) and state.compiled:
            state.uncompile()
            notes.append("compiled path switched off after the failed verification: the model runs eagerly")
    result = OptimizeResult(
        model=model, before=before, after=after, passes=results,
        parity=verification.parity if verification else None, verified=verified, notes=notes,
        verification=verification, name=label, kind=kind, backend=backend if compile else None,
        device=str(run_device), dtype=str(run_dtype).replace("torch.", ""), compiled=state.compiled,
        compile_seconds=compile_seconds, inductor_scan=inductor_scan and diagnose,
    )
    result.seconds = round(time.perf_counter() - started, 3)
    if verify and not verified:
        problem = verification.describe()
        if verification.ok:  # parity holds, but nothing is compiled
            problem = next((n for n in notes if n.startswith("not compiled")), "the model runs uncompiled")
        message = f"graphfix.optimize could not verify {label}: {problem}"
        notes.append(message)
        if strict:
            raise VerificationError(message)
        warnings.warn(message, OptimizeWarning, stacklevel=2)
    return result


def _kind_of(model: nn.Module) -> str:
    if is_hf_causal_lm(model):
        return "hf"
    if meta_llama.is_meta_transformer(model):
        return "meta"
    if takes_start_pos(model):
        return "generic"
    raise UnsupportedModelError(
        f"optimize does not know how to drive {type(model).__name__}",
        hint="it handles Hugging Face causal LMs and models called as forward(tokens, start_pos)",
    )


def _max_seq_len(model: nn.Module, kind: str, requested: int | None) -> int:
    if kind == "hf":
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        return int(requested or min(limit, 2048))
    params = getattr(model, "params", None)
    own = getattr(params, "max_seq_len", None)
    if isinstance(own, int):
        if requested is not None and requested != own:
            raise InputError(f"max_seq_len {requested} differs from the model's own {own}",
                             hint="Meta models keep the cache size of their ModelArgs: build the model with it")
        return own
    return int(requested or 2048)


def _explicit_passes(passes: str | Sequence[str]) -> list[str] | None:
    """``None`` for ``"auto"``, else the validated names (unknown name: ``GraphfixError``)."""
    if isinstance(passes, str):
        if passes == "auto":
            return None
        passes = [p.strip() for p in passes.split(",") if p.strip() and p.strip() != "none"]
    registry = available_passes()
    unknown = [p for p in passes if p not in registry]
    if unknown:
        raise InputError(f"unknown pass {unknown[0]!r}", hint=f"available: {', '.join(registry)}")
    order = list(registry)
    return sorted(dict.fromkeys(passes), key=order.index)


def _auto_passes(model: nn.Module, report: Report) -> list[str]:
    registry = available_passes()
    wanted = {f.fix_pass for f in report.findings if f.fix_pass in registry}
    if meta_llama.is_meta_transformer(model):
        wanted |= {p for p in META_PASSES if p in registry}
    return [p for p in registry if p in wanted]


def _apply(model: nn.Module, names: list[str], ctx: PassContext, say: Progress) -> list[PassResult]:
    registry = available_passes()
    results = []
    for name in names:
        result = registry[name]().apply(model, ctx)
        say(f"pass {name}: {result.rewritten} rewritten, {len(result.skipped)} skipped")
        results.append(result)
    return results


def _diagnose(model: nn.Module, label: str, prefill: int, steps: int, inductor_scan: bool, driver: Any,
              say: Progress, enabled: bool, which: str) -> Report:
    if not enabled:
        return Report(model=label, notes=["not diagnosed (diagnose=False)"])
    say(f"diagnosing the {which} model ({steps} decode steps, eager backend)")
    with quiet(), side_effects.reorder_logging(model):
        return diagnose(model, backend="eager", inductor=inductor_scan, prefill_tokens=prefill, decode_steps=steps,
                        driver=driver, name=label, progress=lambda m: say(f"  {m}"))


def _cannot_compile(model: nn.Module, kind: str) -> str | None:
    if kind == "meta" and not meta_llama.has_tensor_core(model):
        return ("Meta's Transformer without the static-kv-cache pass keeps int start_pos, attribute caches and "
                "@torch.inference_mode on forward (which aot_eager/inductor cannot compile)")
    if meta_llama.inference_mode_state(model) == "inside":
        return "inference mode is still entered inside the compiled code: add the inference-mode pass"
    if kind == "hf" and side_effects.required_functions(model):
        return ("the HF forward has reorderable logging calls, which Dynamo drops when the forward is inlined in "
                "graphfix's decode/prefill callables")
    return None


# ---------------------------------------------------------------------------
# Compiled callables per kind
# ---------------------------------------------------------------------------


def _install_compiled(state: OptimizedState, backend: str, cuda_graphs: bool) -> None:
    model = state.model
    if state.kind == "hf":
        from graphfix.optimize.hf_runtime import runtime_of

        rt = runtime_of(model)
        rt.compile(backend, cuda_graphs=cuda_graphs)
        state.runtime = rt
        state.disable = rt.uncompile
    elif meta_llama.has_tensor_core(model):
        step = model.graphfix_step.__func__
        prefill, decode = own_code(step), own_code(step)
        mode = "reduce-overhead" if cuda_graphs else None
        compiled = _MetaCompiled(
            prefill=torch.compile(types.MethodType(prefill, model), backend=backend, fullgraph=True),
            decode=torch.compile(types.MethodType(decode, model), backend=backend, fullgraph=True, dynamic=False,
                                 mode=mode),
            cuda_graphs=cuda_graphs,
        )
        meta_llama.set_compiled_core(model, functools.partial(_meta_core, compiled))
        state.code = {"prefill": prefill.__code__, "decode": decode.__code__}
        state.disable = functools.partial(meta_llama.set_compiled_core, model, None)
    elif "graphfix_forward_core" in model.__dict__:
        core = own_code(model.graphfix_forward_core.__func__)
        model.graphfix_core_fn = torch.compile(types.MethodType(core, model), backend=backend, fullgraph=True)
        state.code = {"forward": core.__code__}
        state.disable = functools.partial(setattr, model, "graphfix_core_fn", None)
    else:
        previous = model.__dict__.get("forward")
        forward = own_code(model.forward.__func__)
        compiled_forward = torch.compile(types.MethodType(forward, model), backend=backend, fullgraph=True)
        model.forward = functools.partial(_generic_call, model, compiled_forward)
        state.code = {"forward": forward.__code__}
        state.disable = functools.partial(_restore_forward, model, previous)


@dataclasses.dataclass
class _MetaCompiled:
    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    cuda_graphs: bool


@skip_frame
def _meta_core(compiled: _MetaCompiled, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The compiled core ``forward`` calls: decode (one token) or prefill (several, length dynamic)."""
    from graphfix.optimize.hf_runtime import (
        dense,  # here, so that importing graphfix.optimize does not import transformers
    )

    tokens = dense(tokens)  # Meta's loop passes slices of a wider buffer: other strides would recompile
    if torch.is_inference_mode_enabled() and not tokens.is_inference():
        tokens = tokens.clone()  # Llama3.generate makes inference tensors, other callers normal ones: one kind
    if tokens.shape[1] == 1:
        if compiled.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled.decode(tokens, input_pos).clone()
        return compiled.decode(tokens, input_pos)
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    torch._dynamo.maybe_mark_dynamic(input_pos, 0)
    return compiled.prefill(tokens, input_pos)


@skip_frame
def _generic_call(model: nn.Module, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A ``forward(tokens, start_pos)`` model's compiled forward: prompt length dynamic, logging registered."""
    from graphfix.optimize.hf_runtime import dense

    tokens = args[0] if args else None
    if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
        tokens = dense(tokens)
        args = (tokens, *args[1:])
        if tokens.shape[1] > 1:
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
    with side_effects.reorder_logging(model):
        return compiled(*args, **kwargs)


def _restore_forward(model: nn.Module, previous: Any) -> None:
    if previous is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = previous


def _warm_up(state: OptimizedState, runner: Any, prompt: torch.Tensor) -> tuple[float, BaseException | None]:
    """Compile prefill and decode with one run of a prefill and one decode step: (seconds, the error if any)."""
    started = time.perf_counter()
    try:
        with side_effects.reorder_logging(state.model), compile_failure_contained():
            runner.run(state.model, prompt, 1)
    except Exception as exc:  # noqa: BLE001 - a break under fullgraph=True or a compile error: reported
        return round(time.perf_counter() - started, 3), exc
    return round(time.perf_counter() - started, 3), None


__all__ = ["OptimizeResult", "OptimizeWarning", "OptimizedState", "default_backend", "optimize"]
