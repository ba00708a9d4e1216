"""``optimize``: diagnose, rewrite, compile and verify a Llama-style model, keeping its calling convention.

The flow (docs/optimize.md):

1. **reference**: the original model, eager, runs through its loop: the user's own (``driver``),
   or the one of its recognised convention (HF ``generate``, Meta ``forward(tokens, start_pos)``,
   tensor ``input_pos``, fms); every call's last-position logits and the tokens are kept
   (``verify`` compares against them, so numerics never change silently);
2. **before**: ``diagnose`` through the same loop lists breaks, recompiles, failures, and the
   breaks hidden behind them;
3. **passes**: ``"auto"`` picks the pass named by each finding (``Finding.fix_pass``), plus,
   for Meta's ``Transformer``, the five passes that give it the tensor-only core; they run in
   registry order. An explicit list of names is accepted too;
4. **front door**: HF models get ``hf_runtime`` (a static cache handed to ``generate``, the
   caller's own caches compiled with a dynamic length), Meta models ``meta_front`` (the
   tensor core compiled per phase), everything else the phase router (prefill and decode compiled
   apart by ``rewrite.blocks.phase_router``, dynamic where the loop changes shapes or integer attributes);
5. **after**: ``diagnose`` again, on the rewritten model. A break or failure left means a
   construct no pass rewrote: optimize refuses in one line naming it (``UnsupportedModelError``);
6. **compile** (warm-up: the loop's prefill and two decode calls, twice, timed), then **verify**:
   fullgraph, no recompile after warm-up, compiled graphs running in the loop, parity.

The model is rewritten **transactionally**: when optimize refuses, or the result fails
verification, every module is put back exactly as it was (``rewrite.snapshot``) and no
"already optimized" mark is left, so the returned model always works and never computes
anything other than the original did without proof.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.diagnosis import diagnose
from graphfix.diagnose.drivers import (
    LoopDriver,
    auto_driver,
    driver_from,
    is_hf_causal_lm,
    prompt_tokens,
)
from graphfix.diagnose.findings import Finding, Kind
from graphfix.diagnose.report import Report
from graphfix.errors import InputError, UnsupportedModelError
from graphfix.optimize import tp_front
from graphfix.optimize.compiling import Progress, Refusal, activate_cache, compile_and_warm_up, save_cache
from graphfix.optimize.reference import CHOICES as REFERENCE_CHOICES
from graphfix.optimize.reference import record as record_high_precision
from graphfix.optimize.result import OptimizeResult, diagnosed
from graphfix.optimize.state import OptimizedState
from graphfix.optimize.verification import (
    VerificationError,
    quiet,
    run_verification,
    runner_for,
)
from graphfix.rewrite.blocks import meta_llama, side_effects
from graphfix.rewrite.pass_manager import PassContext, PassResult, available_passes
from graphfix.rewrite.planner import META_PASSES, plan_passes
from graphfix.rewrite.snapshot import ModelSnapshot

MIN_TIMED_SECONDS = 0.25
"""A reference run shorter than this is timer and Python overhead, not the model: the speed check does not judge it."""


class OptimizeWarning(UserWarning):
    """``optimize`` could not verify the model, and returned it as it was."""


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


def optimize(
    model: nn.Module,
    *,
    driver: Any = None,
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
    diagnose_layers: str = "representative",
    inductor_scan: bool = False,
    tolerance: float | None = None,
    parity_reference: str = "auto",
    parity_multiplier: float | None = None,
    parity_floor: float | None = None,
    cuda_graphs: bool | None = None,
    pass_options: dict[str, Any] | None = None,
    name: str | None = None,
    keep_if_slower: bool | None = None,
    progress: Progress | None = None,
    quantize: str | None = None,
    tp: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> OptimizeResult:
    """Rewrite ``model`` in place so that it compiles clean, compile it, and verify it.

    ``driver``: the loop the model runs in, ``fn(model) -> tokens`` as the user's code runs it
    (prefill, then decode steps, with its own cache and positions); reference, diagnoses,
    warm-up and verification all go through it. Without one, the forward's calling convention
    decides (HF ``generate``, Meta ``start_pos``, tensor ``input_pos``, fms), with ``prompt`` (or
    ``prefill_tokens`` random ids) and ``decode_steps``. ``max_seq_len``: positions a static
    cache holds (HF: default ``min(max_position_embeddings, 2048)``; Meta models keep theirs).
    ``backend``: default ``default_backend()``. ``diagnose_steps``: decode steps of the two
    diagnoses of a recognised convention; ``diagnose=False`` skips them; ``diagnose_layers``: ``"representative"``
    (default: one decoder layer of each kind when the layers repeat, ``graphfix.diagnose.layer_subset``) or ``"all"``.
    ``inductor_scan``: also
    list Inductor's ATen fallbacks (slow). ``cuda_graphs``: HF and Meta decode with CUDA graphs
    (default: on CUDA with inductor). ``pass_options``: ``PassContext.options``. ``keep_if_slower``: when the
    verification's timed run of the optimized model is slower than the original's (timed the same way, warm),
    the original is kept and the summary says so (never slower by default; runs too short to time are not judged).
    Default: on with ``inductor`` (a backend for speed), off with ``eager``/``aot_eager`` (backends for checking).
    Parity (docs/optimize.md): ``parity_reference`` (``auto``, ``float64``, ``float32``, ``none``) is the precision
    of the original's reference run, ``parity_multiplier`` and ``parity_floor`` the bound
    ``e_opt <= multiplier * e_orig + floor`` (defaults by dtype), ``tolerance`` the fixed rule used only when
    there is no reference run.
    ``quantize``: ``"int8"``, ``"int4"`` or ``"int4:64"``: weight-only quantization of the linears
    (``graphfix.quantize``) after the reference run; verified against the unquantized original with a tolerance
    derived from the measured quantization error (``optimize.quantized``).
    ``tp``: tensor parallelism over ``tp`` processes (run under ``torchrun``): HF ``generate`` and Meta's
    ``forward(tokens, start_pos)`` are served by the engine over this rank's shard, verified on every rank
    (``graphfix.optimize.tp_front``, docs/tensor_parallel.md).
    ``cache_dir``: a compile cache kept between processes (``graphfix.engine.CompileCache``: Inductor's and
    Triton's caches, the mega-cache, the decode kernels' GEMV tiles), loaded before anything compiles and saved after
    the warm-up, so that the next process's ``optimize`` compiles and tunes less.
    Raises ``UnsupportedModelError`` (model unchanged) when a construct cannot be rewritten.
    """
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    if "graphfix_optimized" in model.__dict__:
        raise InputError(f"{type(model).__name__} is already optimized by graphfix",
                         hint="optimize the original model once; call graphfix.verify(model) to check it again")
    if decode_steps < 1 or prefill_tokens < 2:
        raise InputError("decode_steps must be at least 1 and prefill_tokens at least 2")
    names = _explicit_passes(passes)  # validate names before any work
    if diagnose_layers not in ("all", "representative"):
        raise InputError(f"diagnose_layers must be 'all' or 'representative', got {diagnose_layers!r}")
    if parity_reference not in REFERENCE_CHOICES:
        raise InputError(f"unknown parity_reference {parity_reference!r}", hint=f"one of {', '.join(REFERENCE_CHOICES)}")
    if quantize:
        from graphfix.quant.scheme import parse_scheme

        parse_scheme(quantize)  # a bad scheme name fails before the reference run
    kind = _kind_of(model)
    cache = activate_cache(cache_dir, say) if cache_dir is not None and compile else None
    user_driver = None if driver is None else driver_from(driver, model, prefill_tokens=prefill_tokens,
                                                          decode_steps=decode_steps)
    tp_group = None
    if tp is not None:
        tp_group = tp_front.prepare(model, kind, tp, driver, compile)
        device = device or tp_group.device
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
    if keep_if_slower is None:
        keep_if_slower = backend == "inductor"
    seq_len = _max_seq_len(model, kind, max_seq_len)
    if prompt is None and user_driver is None:
        prompt = prompt_tokens(model, prefill_tokens, 1)
    if prompt is not None:
        prompt = (prompt[None] if prompt.dim() == 1 else prompt).to(run_device)
        _check_prompt(prompt, kind, max_batch_size, decode_steps, seq_len)
    label = name or os.path.basename(str(getattr(getattr(model, "config", None), "name_or_path", "")).rstrip("/")) \
        or type(model).__name__

    loop = user_driver
    if loop is None and kind == "generic":
        loop = auto_driver(model, prompt.shape[1], decode_steps, prompt=prompt)  # one line for an unknown convention
    runner = runner_for(kind, loop)
    loop_steps = None if isinstance(loop, LoopDriver) else decode_steps
    what = f"the loop {loop.description}" if loop is not None else f"a prefill of {prompt.shape[1]} + " \
        f"{decode_steps} decode steps"
    say(f"reference: original model, eager, {what}")
    with quiet():
        reference = runner.run(model, prompt, loop_steps)
        if keep_if_slower and reference.seconds >= MIN_TIMED_SECONDS:  # timed again, warm, for the speed check
            reference.seconds = runner.run(model, prompt, loop_steps).seconds
    high = record_high_precision(model, runner, prompt, loop_steps, reference, run_dtype, parity_reference)
    say(f"reference in high precision: {high.note}" + (f", {high.seconds:.1f}s" if high.seconds else "")
        + ("" if high.trace is not None else "; parity falls back to the fixed tolerance"))

    diag_driver = user_driver if user_driver is not None else loop
    before = _diagnose(model, label, prompt, diagnose_steps, inductor_scan, diag_driver, say, diagnose, "original",
                       diagnose_layers)
    if names is None:
        names = plan_passes(model, before.findings)
        say(f"passes from the diagnosis: {', '.join(names) or 'none'}")

    _prime(runner, model, prompt)
    snapshot = ModelSnapshot.take(model)
    options = {k: v for k, v in (("tolerance", tolerance), ("multiplier", parity_multiplier),
                                 ("floor", parity_floor)) if v is not None}
    state = OptimizedState(model=model, kind=kind, reference=reference, dtype=run_dtype, max_seq_len=seq_len,
                           backend=backend if compile else None, driver=loop, high=high, parity_options=options)
    try:
        if quantize:
            from graphfix.optimize.quantized import quantize_for_optimize

            state.quantization = quantize_for_optimize(model, quantize, runner, reference, prompt, loop_steps,
                                                       run_dtype, say)
            notes.append(f"weights quantized to {state.quantization.scheme} ({state.quantization.modules} linears); "
                         f"{state.quantization.basis()}")
            say(notes[-1])
        ctx = PassContext(max_seq_len=seq_len, max_batch_size=max_batch_size, dtype=dtype, device=device,
                          options=dict(pass_options or {}))
        results = _apply(model, names, ctx, say)
        after_driver = _install_front_door(state, max_batch_size, prompt, diagnose_steps, notes, diag_driver)
        after = _diagnose(model, label, prompt, diagnose_steps, inductor_scan, after_driver, say, diagnose,
                          "rewritten", diagnose_layers)
        _refuse_if_blocked(label, after, results)
        compile_seconds = compile_and_warm_up(state, runner, prompt, backend, cuda_graphs, compile, notes, say,
                                               tp_group)
        if cache is not None and state.compiled:
            save_cache(cache, say)
    except Refusal as exc:
        _undo(state, snapshot)
        raise UnsupportedModelError(str(exc), hint="graphfix report MODEL lists every finding; rewrite that "
                                    "construct in the model's code, or add a pass for it") from None
    except BaseException:
        _undo(state, snapshot)
        raise
    model.graphfix_optimized = state

    verification, verified = None, False
    if verify:
        if tp_group is None:
            verification = run_verification(state, progress=say)
        else:
            verification = tp_front.verification_on_every_rank(tp_group,
                                                               lambda: run_verification(state, progress=say))
        verified = verification.ok and (state.compiled or not compile)
        if tp_group is not None:  # the ranks keep or undo together
            verified = tp_front.verified_on_every_rank(tp_group, verified, verification)
        slower = _slower_than_original(verification, reference, keep_if_slower) if verified and compile else None
        if tp_group is not None and verified and compile:
            slower = tp_front.slower_on_any_rank(tp_group, slower)
        if slower:
            _undo(state, snapshot)
            notes.append(slower)
            say(slower)
    result = OptimizeResult(
        model=model, before=before, after=after, passes=results,
        parity=verification.parity if verification else None, verified=verified, notes=notes,
        verification=verification, name=label, kind=kind, backend=backend if compile else None,
        device=str(run_device), dtype=str(run_dtype).replace("torch.", ""), compiled=state.compiled,
        compile_seconds=compile_seconds, inductor_scan=inductor_scan and diagnose,
        tensor_parallel=tp_group.describe() if tp_group is not None else None,
    )
    if verify and not verified:
        problem = verification.describe()
        if verification.ok:  # parity holds, but nothing is compiled
            problem = next((n for n in notes if n.startswith("not compiled")), "the model runs uncompiled")
        _undo(state, snapshot)
        result.compiled = False
        message = f"graphfix.optimize could not verify {label}: {problem}; the model is returned as it was"
        notes.append(message)
        result.seconds = round(time.perf_counter() - started, 3)
        if strict:
            raise VerificationError(message)
        warnings.warn(message, OptimizeWarning, stacklevel=2)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _prime(runner: Any, model: nn.Module, prompt: torch.Tensor | None) -> None:
    """Run a prefill and one decode step eagerly, so the model's state is a real call's when the passes look at it.

    A pass sizes what it swaps in from what the model holds (a cache attribute grown by ``torch.cat`` is ``None``
    until a call fills it); the diagnoses may have ended in a failed compile before the model's code got that far.
    """
    with quiet(), torch.no_grad():
        runner.run(model, prompt, 1)


def _slower_than_original(verification: Any, reference: Any, enabled: bool) -> str | None:
    """The note that keeps the original, when the optimized model measured slower than it (else ``None``)."""
    after, before = verification.tokens_per_second, verification.reference_tokens_per_second
    if not enabled or not after or not before or reference.seconds < MIN_TIMED_SECONDS:
        return None
    if after >= before:
        return None
    return (f"kept the original: optimized it ran {after:.1f} tokens/s against the original's {before:.1f} in the same "
            "measurement (verified, but no faster: the model is returned as it was; keep_if_slower=False to keep it)")


def _kind_of(model: nn.Module) -> str:
    """``hf`` and ``meta`` have front doors of their own; every other codebase is ``generic``."""
    if is_hf_causal_lm(model):
        return "hf"
    if meta_llama.is_meta_transformer(model):
        return "meta"
    return "generic"


def _check_prompt(prompt: torch.Tensor, kind: str, max_batch_size: int, decode_steps: int, seq_len: int) -> None:
    if prompt.dim() != 2 or prompt.is_floating_point():
        raise InputError(f"a prompt must be token ids of shape (batch, seq), got {tuple(prompt.shape)} {prompt.dtype}")
    if prompt.shape[0] > max_batch_size and kind == "hf":
        raise InputError(f"prompt batch {prompt.shape[0]} exceeds max_batch_size {max_batch_size}")
    if prompt.shape[1] + decode_steps + 1 > seq_len:
        raise InputError(f"prompt of {prompt.shape[1]} tokens plus {decode_steps + 1} generated tokens exceeds "
                         f"max_seq_len {seq_len}", hint="use fewer decode steps or a larger max_seq_len")


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


def _apply(model: nn.Module, names: list[str], ctx: PassContext, say: Progress) -> list[PassResult]:
    registry = available_passes()
    results = []
    for name in names:
        result = registry[name]().apply(model, ctx)
        say(f"pass {name}: {result.rewritten} rewritten, {len(result.skipped)} skipped")
        results.append(result)
    return results


def _diagnose(model: nn.Module, label: str, prompt: torch.Tensor | None, steps: int, inductor_scan: bool,
              driver: Any, say: Progress, enabled: bool, which: str, layers: str = "all") -> Report:
    if not enabled:
        return Report(model=label, notes=["not diagnosed (diagnose=False)"])
    say(f"diagnosing the {which} model (eager backend)")
    with quiet(), side_effects.reorder_logging(model):
        return diagnose(model, prompt if driver is None else None, driver=driver, backend="eager",
                        inductor=inductor_scan, prefill_tokens=prompt.shape[1] if prompt is not None else 8,
                        decode_steps=steps, hidden=which == "original", name=label,
                        progress=lambda m: say(f"  {m}"), layers=layers)


def _install_front_door(state: OptimizedState, max_batch_size: int, prompt: torch.Tensor | None, steps: int,
                        notes: list[str], user_driver: Any) -> Any:
    """Install the HF runtime (before the after-diagnosis: it decides how HF calls run); return that diagnosis's
    driver (``None``: the default one)."""
    model = state.model
    if state.kind != "hf":
        return user_driver
    from graphfix.optimize import hf_runtime

    rt = hf_runtime.install(model, max_seq_len=state.max_seq_len, max_batch_size=max_batch_size)
    notes.append(f"HF runtime: generate() gets a graphfix StaticCache of {state.max_seq_len} positions per batch "
                 f"size (up to {max_batch_size}); a caller's own cache (a DynamicCache) runs compiled with a dynamic "
                 "length; beams or more tokens than max_seq_len run the original forward, uncompiled")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        notes.append(f"sliding window {model.config.sliding_window}: a mask over the full-length static cache "
                     "(no ring buffer), so decode does not recompile as the window fills")
    logging_fns = side_effects.required_functions(model)
    if logging_fns:
        rt.logging_functions = frozenset(logging_fns)
    state.front = rt
    state.disable = rt.uncompile
    if user_driver is not None:
        return user_driver
    return hf_runtime.StaticCacheDriver(prefill_tokens=prompt.shape[1], decode_steps=steps, prompt=prompt)


def _refuse_if_blocked(label: str, after: Report, results: list[PassResult]) -> None:
    """Breaks or compile failures left after the passes: constructs no pass rewrote. Refuse, naming the first."""
    blocking = [f for f in after.findings if f.kind in (Kind.GRAPH_BREAK, Kind.COMPILE_FAILURE)]
    if not blocking:
        return
    first = blocking[0]
    where = first.location.short() if first.location else "-"
    reason = _skip_reason(first, results)
    more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
    raise Refusal(f"cannot optimize {label}: {first.message} at {where}{more}"
                  + (f"; {reason}" if reason else f" [{first.category.value}, no pass rewrites it]"))


def _skip_reason(finding: Finding, results: list[PassResult]) -> str | None:
    """The reason a pass gave for leaving the construct at ``finding``'s line alone, if one did."""
    if finding.location is None:
        return None
    line = f"line {finding.location.line}"
    for result in results:
        for _site, reason in result.skipped:
            if line in reason:
                return f"{result.name}: {reason}"
    return None


def _undo(state: OptimizedState, snapshot: ModelSnapshot) -> None:
    """The model exactly as it was: compiled callables off, every module's attributes restored, no mark."""
    state.uncompile()
    snapshot.restore()
    state.model.__dict__.pop("graphfix_optimized", None)


__all__ = ["META_PASSES", "OptimizeResult", "OptimizeWarning", "OptimizedState", "default_backend",
           "diagnosed", "optimize"]
