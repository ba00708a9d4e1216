"""``verify``: check an optimized model against the original's outputs, with no break and no recompile.

The reference is recorded by ``optimize`` *before* it rewrites anything: the original
model, eager, runs a prefill and ``decode_steps`` greedy decode steps through its own
calling convention (HF ``generate``, Meta ``forward(tokens, start_pos)``), and the
last-position logits of every call and the greedy tokens are kept. ``verify`` then runs
the optimized model the same way and checks:

1. it compiles with ``fullgraph=True`` (a graph break raises, and is reported);
2. decode steps 2..N run under ``torch.compiler.set_stance("fail_on_recompile")`` and a
   second run (the same prompt, timed) and a prompt of another length run entirely under
   it: any recompile is reported with its guard;
3. parity (``graphfix.optimize.parity``): the logits' error against a high-precision run of the
   original, at most a small multiple of the original's own error in its dtype plus a floor, and
   the greedy tokens identical up to the first step the reference's top-2 margin does not decide;
   without a high-precision run, the old fixed tolerance (said in the result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.diagnose.intercept import recorded
from graphfix.errors import GraphfixError, InputError
from graphfix.optimize.parity import ParityResult, compare
from graphfix.optimize.quantized import adjust_parity, quantized_original

SCHEMA = "graphfix.verify"
SCHEMA_VERSION = 2

Progress = Callable[[str], None]


class VerificationError(GraphfixError):
    """Verification failed and ``strict=True`` was asked for (CLI exit code 1)."""

    exit_code = 1


@dataclasses.dataclass
class Trace:
    """What one greedy run produced: the tokens and each call's last-position logits."""

    prompt: torch.Tensor | None
    """The prompt graphfix gave; ``None`` for a user's loop (its prompt is its own)."""
    tokens: torch.Tensor
    """``(batch, steps + 1)``: the prefill's greedy token, then one per decode step; for a user's loop,
    the tokens it returned (or the argmax of each call when it returned none)."""
    logits: torch.Tensor
    """``(calls, batch, vocab)`` on CPU, float32 (float64 for a float64 run): the last position of each call."""
    seconds: float
    prefill_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt is not None and not self.prefill_tokens:
            self.prefill_tokens = int(self.prompt.shape[1])

    @property
    def steps(self) -> int:
        """Forward calls (a prefill and the decode steps)."""
        return self.logits.shape[0]

    @property
    def tokens_per_second(self) -> float:
        return self.logits.shape[0] * self.logits.shape[1] / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------
# Runners: drive a model through its own calling convention
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No transformers warnings and logs while graphfix drives the model itself."""
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            yield
    finally:
        hf_logger.setLevel(level)


class HFRunner:
    """``model.generate(prompt, max_new_tokens=steps + 1, do_sample=False)``, logits kept."""

    kind = "hf"

    def run(self, model: nn.Module, prompt: torch.Tensor, steps: int, *, enforce: str | None = None) -> Trace:
        """``enforce``: ``"decode"`` fails on a recompile from decode step 2, ``"all"`` on any."""
        from graphfix.optimize.hf_runtime import runtime_of

        rt = runtime_of(model)
        config = model.generation_config
        eos = config.eos_token_id
        new = steps + 1
        first_eos = eos[0] if isinstance(eos, list) and eos else eos
        kwargs: dict[str, Any] = {
            "max_new_tokens": new, "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
            "temperature": None, "top_p": None, "top_k": None,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else first_eos or 0,
        }
        kwargs["eos_token_id"] = None  # the same number of steps whatever the tokens, EOS never masked
        guard = rt.enforce(prefill=enforce == "all") if rt is not None and enforce else contextlib.nullcontext()
        with quiet(), guard, torch.no_grad():
            started = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            seconds = time.perf_counter() - started
        tokens = out.sequences[:, prompt.shape[1]:]
        logits = torch.stack([recorded(x) for x in out.logits])
        return Trace(prompt, tokens.cpu(), logits, seconds)


class StartPosRunner:
    """Meta's convention: ``model.forward(tokens, start_pos)`` with the cache kept in the model."""

    kind = "meta"

    def run(self, model: nn.Module, prompt: torch.Tensor, steps: int, *, enforce: str | None = None) -> Trace:
        tokens, logits = [], []
        started = time.perf_counter()
        with torch.no_grad():
            with torch.compiler.set_stance("fail_on_recompile") if enforce == "all" else contextlib.nullcontext():
                out = model.forward(prompt, 0)
            pos = prompt.shape[1]
            for step in range(steps + 1):
                last = out[:, -1]
                logits.append(recorded(last).clone())
                token = last.argmax(-1, keepdim=True)
                tokens.append(token.cpu())
                if step == steps:
                    break
                strict = enforce == "all" or (enforce == "decode" and step + 1 >= 2)
                with torch.compiler.set_stance("fail_on_recompile") if strict else contextlib.nullcontext():
                    out = model.forward(token, pos)
                pos += 1
        seconds = time.perf_counter() - started
        return Trace(prompt, torch.cat(tokens, dim=1), torch.stack(logits), seconds)


class LoopRunner:
    """A driver's loop (the user's own, or a recognised convention's), each forward call watched and recorded.

    ``steps`` (``None``: the loop's own length) stops the loop after a prefill and that many decode
    calls. ``enforce``: ``"decode"`` fails on a recompile from the third call on, ``"all"`` on any.
    """

    kind = "loop"

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def run(self, model: nn.Module, prompt: torch.Tensor | None, steps: int | None, *,
            enforce: str | None = None) -> Trace:
        from graphfix.diagnose.drivers import vocab_size
        from graphfix.diagnose.intercept import intercepted

        try:
            vocab = vocab_size(model)
        except GraphfixError:
            vocab = None
        strict_from = {"decode": 2, "all": 0}.get(enforce or "")
        started = time.perf_counter()
        with quiet(), intercepted(model, record_logits=True, vocab=vocab, strict_from=strict_from) as log:
            returned = self.driver.run(model, steps=steps)
        seconds = time.perf_counter() - started
        if not log.logits or log.unrecorded:
            raise InputError(f"the driver's loop ({self.driver.description}) made {log.calls} forward call(s), "
                             f"{log.unrecorded} of them without logits graphfix can find",
                             hint="forward must return the logits (a tensor, .logits, or the first of a tuple)")
        tokens = returned if returned is not None else log.greedy_tokens()
        first = log.new_tokens[0] if log.new_tokens else 0
        return Trace(None, tokens, torch.stack(log.logits), seconds, prefill_tokens=first or 0)


class EngineRunner:
    """An HF model whose ``generate`` the engine serves: the drop-in ``generate`` (its tokens and time), checked
    against the engine's run of the same prompt with each step's logits recorded (the parity)."""

    kind = "hf-engine"

    def run(self, model: nn.Module, prompt: torch.Tensor, steps: int, *, enforce: str | None = None) -> Trace:
        from graphfix.optimize.hf_runtime import runtime_of

        door = runtime_of(model).engine
        new = steps + 1
        stance = torch.compiler.set_stance("fail_on_recompile") if enforce else contextlib.nullcontext()
        config = model.generation_config
        eos = config.eos_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else \
            (eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else 0)
        with quiet(), stance, torch.no_grad():
            recorded = door.generator.generate(prompt, new, eos_token_id=[], pad_token_id=pad, record_logits=True)
            started = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new, eos_token_id=None, do_sample=False, pad_token_id=pad,
                                 temperature=None, top_p=None, top_k=None)
            seconds = time.perf_counter() - started
        tokens = out[:, prompt.shape[1]:].cpu()
        if door.served == 0 or not torch.equal(tokens, torch.tensor(recorded.tokens)):
            raise AssertionError("the drop-in generate() did not give the engine's tokens (a fallback took the call, "
                                 "or the serving graphs differ from the recording ones)")
        return Trace(prompt, tokens, recorded.logits, seconds)


def runner_for(kind: str, driver: Any = None, model: nn.Module | None = None) -> Any:
    """The runner of a model's convention; a driver (a user's loop) always wins; an HF model on the engine is run
    through it."""
    if driver is not None:
        return LoopRunner(driver)
    if kind == "hf" and model is not None:
        from graphfix.optimize.hf_runtime import runtime_of

        rt = runtime_of(model)
        if rt is not None and rt.engine is not None and rt.backend is not None:
            return EngineRunner()
    return HFRunner() if kind == "hf" else StartPosRunner()


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class VerifyResult:
    """Compile cleanliness, recompiles and parity of an optimized model."""

    ok: bool
    failures: list[str] = dataclasses.field(default_factory=list)
    compiled: bool = True
    graphs: dict[str, int] = dataclasses.field(default_factory=dict)
    """Graphs compiled per callable (``prefill``, ``decode`` or ``forward``) since the last Dynamo reset.
    Expected: one each for ``prefill`` and ``decode``; two (prefill, decode) for a single ``forward``."""
    graph_breaks: int = 0
    recompiles: int = 0
    compile_failures: int = 0
    parity: ParityResult | None = None
    prefill_tokens: int = 0
    decode_steps: int = 0
    other_prompt_length: int | None = None
    """The length of the second prompt run entirely under ``fail_on_recompile`` (``None``: not run; a user's
    loop brings its own prompt)."""
    strict_decode_steps: int = 0
    """Decode steps run under ``fail_on_recompile`` (steps 2..N of the first run, all of the later runs)."""
    tokens_per_second: float | None = None
    reference_tokens_per_second: float | None = None
    eager_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_graphs(self) -> int:
        return sum(self.graphs.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["parity"] = self.parity.to_dict() if self.parity else None
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data}

    def describe(self) -> str:
        if self.ok:
            return (f"verified: {self.total_graphs} graphs, no break, no recompile over a prefill and "
                    f"{self.decode_steps} decode steps; {self.parity.describe() if self.parity else 'no parity check'}")
        return "verification failed: " + "; ".join(self.failures)


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """``(kind, one-line message)`` for an error raised while running the compiled model."""
    text = str(exc)
    if "fail_on_recompile" in text or "Detected recompile" in text:
        guard = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("-")), _first_line(exc))
        return "recompile", f"recompiled: {guard.lstrip('- ').strip()}"
    if isinstance(exc, torch._dynamo.exc.Unsupported):
        return "graph_break", f"graph break under fullgraph=True: {_first_line(exc)}"
    if isinstance(exc, torch._dynamo.exc.TorchDynamoException):
        return "compile_failure", f"compile failed: {type(exc).__name__}: {_first_line(exc)}"
    return "error", f"{type(exc).__name__}: {_first_line(exc)}"


def verify(model_or_result: Any, *, decode_steps: int | None = None, tolerance: float | None = None,
           parity_multiplier: float | None = None, parity_floor: float | None = None,
           measure_speed: bool = True, other_prompt_length: bool = True, strict: bool = False,
           progress: Progress | None = None) -> VerifyResult:
    """Verify a model returned by ``graphfix.optimize`` (or its ``OptimizeResult``).

    ``decode_steps`` defaults to the reference ``optimize`` recorded (and cannot exceed it:
    the original model is gone). ``parity_multiplier`` and ``parity_floor``: the parity bound
    ``e_opt <= multiplier * e_orig + floor`` (defaults by dtype: ``graphfix.optimize.parity``, or what
    ``optimize`` was given); ``tolerance``: the fixed rule's, used only without a high-precision
    reference. ``strict`` raises ``VerificationError`` on failure.
    """
    model = getattr(model_or_result, "model", model_or_result)
    state = getattr(model, "__dict__", {}).get("graphfix_optimized") if isinstance(model, nn.Module) else None
    if state is None:
        raise InputError("this model was not optimized by graphfix, so there is no reference to verify against",
                         hint="call graphfix.optimize(model) (it verifies by default) and pass its result")
    result = run_verification(state, decode_steps=decode_steps, tolerance=tolerance,
                              parity_multiplier=parity_multiplier, parity_floor=parity_floor,
                              measure_speed=measure_speed, other_prompt_length=other_prompt_length, progress=progress)
    if strict and not result.ok:
        raise VerificationError(result.describe())
    return result


def run_verification(state: Any, *, decode_steps: int | None = None, tolerance: float | None = None,
                     parity_multiplier: float | None = None, parity_floor: float | None = None,
                     measure_speed: bool = True, other_prompt_length: bool = True,
                     progress: Progress | None = None, earlier: Sequence[BaseException] = ()) -> VerifyResult:
    """The checks of ``verify`` on an ``OptimizedState`` (see ``graphfix.optimize``)."""
    say = progress or (lambda _msg: None)
    reference: Trace = state.reference
    steps = reference.steps - 1 if decode_steps is None else decode_steps
    if steps < 1 or steps > reference.steps - 1:
        raise InputError(f"decode_steps must be between 1 and {reference.steps - 1} (the reference optimize recorded)",
                         hint="optimize with a larger decode_steps to verify longer")
    model, runner = state.model, runner_for(state.kind, getattr(state, "driver", None), state.model)
    run_steps: int | None = steps
    if isinstance(runner, LoopRunner) and steps == reference.steps - 1:
        run_steps = None  # the loop's own length: its returned tokens are compared as they are
    high = getattr(state, "high", None)
    reference = _shortened(reference, steps, run_steps, isinstance(runner, LoopRunner))
    high_trace = _shortened(high.trace, steps, run_steps, isinstance(runner, LoopRunner)) \
        if high is not None and high.trace is not None else None
    result = VerifyResult(ok=False, compiled=state.compiled, prefill_tokens=reference.prefill_tokens,
                          decode_steps=steps, reference_tokens_per_second=state.reference.tokens_per_second)
    started = time.perf_counter()
    eager_before = dict(state.eager_calls())
    variants_before = len(state.new_variants_enforced())

    def record(label: str, exc: BaseException) -> None:
        kind, message = classify_failure(exc)
        if kind == "graph_break":
            result.graph_breaks += 1
        elif kind == "recompile":
            result.recompiles += 1
        elif kind == "compile_failure":
            result.compile_failures += 1
        result.failures.append(f"{label}: {message}")

    def attempt(label: str, fn: Callable[[], Trace]) -> Trace | None:
        try:
            with compile_failure_contained():
                return fn()
        except Exception as exc:  # noqa: BLE001 - a break, a recompile, a compile error: all are findings
            record(label, exc)
            return None

    for exc in earlier:  # the compiled path failed before (optimize's warm-up) and was switched off
        record("compiling (warm-up)", exc)

    enforce = "decode" if state.compiled else None
    say(f"verify: prefill of {reference.prefill_tokens} tokens + {steps} decode steps"
        + (" (decode steps 2.. under fail_on_recompile)" if state.compiled else ""))
    runs_before = state.graph_runs()
    output = attempt("run 1", lambda: runner.run(model, reference.prompt, run_steps, enforce=enforce))
    if output is not None and state.compiled and state.graph_runs() == runs_before:
        result.failures.append("no compiled graph ran in the loop: every call ran in Python (a skipped frame, "
                               "a recompile limit reached, or a path the compiled callables do not cover)")
    if output is not None:
        result.strict_decode_steps += max(0, steps - 1) if state.compiled else 0
        options = {**getattr(state, "parity_options", {}),
                   **{k: v for k, v in (("tolerance", tolerance), ("multiplier", parity_multiplier),
                                        ("floor", parity_floor)) if v is not None}}
        quant = getattr(state, "quantization", None)  # optimize(quantize=...): see optimize.quantized
        original, options = quantized_original(quant, reference, high_trace, options,
                                               lambda t: _shortened(t, steps, run_steps, isinstance(runner, LoopRunner)))
        result.parity = adjust_parity(compare(original, output, state.dtype, high=high_trace,
                                              reference_dtype=high.dtype if high is not None else None,
                                              note=high.note if high is not None else "no high-precision run recorded",
                                              **options), quant)
        result.failures.extend(f"parity: {why}" for why in result.parity.reasons())
        if measure_speed and not result.failures:
            say("verify: the same run again, timed, everything under fail_on_recompile")
            again = attempt("run 2 (timed)", lambda: runner.run(model, reference.prompt, run_steps,
                                                                 enforce="all" if state.compiled else None))
            if again is not None:
                result.tokens_per_second = again.tokens_per_second
                result.strict_decode_steps += steps if state.compiled else 0
                if not torch.equal(again.tokens, output.tokens):
                    result.failures.append("run 2 gave other tokens than run 1 (state left over between runs?)")
        if other_prompt_length and state.compiled and not result.failures:
            other = _other_prompt(state)
            if other is not None:
                say(f"verify: a prompt of {other.shape[1]} tokens + 2 decode steps, under fail_on_recompile")
                result.other_prompt_length = other.shape[1]
                attempt("prompt of another length", lambda: runner.run(model, other, 2, enforce="all"))
    result.graphs = state.graphs()
    result.recompiles += state.recompiles()
    for variant in state.new_variants_enforced()[variants_before:]:
        result.failures.append(f"compiled a new call signature while checking for recompiles: {variant}")
    eager_after = state.eager_calls()
    result.eager_calls = {k: v - eager_before.get(k, 0) for k, v in eager_after.items() if v > eager_before.get(k, 0)}
    if state.compiled and result.eager_calls:
        from graphfix.optimize.hf_runtime import FALLBACK_REASONS

        for reason, n in result.eager_calls.items():
            result.failures.append(f"{n} call(s) ran uncompiled: {FALLBACK_REASONS.get(reason, reason)}")
    if state.compiled and result.recompiles and not any("recompile" in f for f in result.failures):
        result.failures.append(f"{result.recompiles} recompile(s): graphs per callable {result.graphs}")
    result.ok = not result.failures
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _shortened(trace: Trace, steps: int, run_steps: int | None, loop: bool) -> Trace:
    """``trace`` cut to a prefill and ``steps`` decode steps (a loop stopped early returns no tokens of its own:
    each call's greedy choice stands for them)."""
    if run_steps is None:
        return trace
    tokens = trace.logits[: steps + 1].argmax(-1).T if loop else trace.tokens[:, : steps + 1]
    return dataclasses.replace(trace, tokens=tokens, logits=trace.logits[: steps + 1])


def _other_prompt(state: Any) -> torch.Tensor | None:
    """A prompt 3 tokens longer (or shorter when that does not fit), to show prefill does not recompile."""
    from graphfix.diagnose.drivers import prompt_tokens

    prompt = state.reference.prompt
    if prompt is None:  # a user's loop brings its own prompt
        return None
    length = prompt.shape[1] + 3
    if length + 3 > state.max_seq_len:
        length = prompt.shape[1] - 3
    if length < 2:
        return None
    return prompt_tokens(state.model, length, prompt.shape[0], seed=1).to(prompt.device)
