"""Parity against a high-precision reference: planted faults fail in bfloat16 and float32, correct rewrites pass.

Two codebases: a Hugging Face ``LlamaForCausalLM`` (``tests/fixtures/tiny_hf.py``, weights refilled by
the zoo's ``randomize_`` so attention is not uniform) driven by ``generate`` (graphfix's HF runner),
and the zoo's gpt-fast-style ``Transformer`` driven by its own loop (graphfix's loop runner). For each,
in each dtype, the original's run and its float64 run are recorded once, as ``optimize`` records
them; a copy is then rewritten by ``tests/fixtures/planted_faults.py`` (attention on a static cache
with graphfix's RoPE blocks and SDPA), correctly or with one fault, and run the same way; ``compare``
is ``verify``'s parity. End to end, ``graphfix.optimize`` passes a correct bfloat16 model and fails
one whose q/k rows its front door swaps (``graphfix.bench.parity_check``, the GPU check's fault).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch

from graphfix.diagnose.drivers import driver_from
from graphfix.optimize import reference
from graphfix.optimize.parity import ParityResult, compare
from graphfix.optimize.verification import HFRunner, LoopRunner
from tests.fixtures.planted_faults import FAULTS, plant
from tests.zoo import gpt_fast_style, hf_loop

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HF_STEPS = 12
"""Decode steps of the HF runs (every fault shows within the first few)."""


@functools.cache
def _recorded(codebase: str, dtype_name: str):
    """``(model, runner, prompt, steps, run in its dtype, high-precision run)``, recorded as ``optimize`` does."""
    dtype = DTYPES[dtype_name]
    if codebase == "hf":
        model, runner, steps = hf_loop.build_llama().to(dtype), HFRunner(), HF_STEPS
        prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    else:
        model, prompt, steps = gpt_fast_style.build().to(dtype), None, None
        runner = LoopRunner(driver_from(gpt_fast_style.loop, model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = runner.run(model, prompt, steps)
        high = reference.record(model, runner, prompt, steps, own, dtype)
    return model, runner, prompt, steps, own, high


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    _recorded.cache_clear()


def _run(codebase: str, dtype_name: str, fault: str | None):
    """``(the rewritten copy's trace, its parity)``."""
    model, runner, prompt, steps, own, high = _recorded(codebase, dtype_name)
    rewritten = plant(copy.deepcopy(model), codebase, fault)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output = runner.run(rewritten, prompt, steps)
    return output, compare(own, output, DTYPES[dtype_name], high=high.trace, reference_dtype=high.dtype,
                           note=high.note)


def _verdict(codebase: str, dtype_name: str, fault: str | None) -> ParityResult:
    return _run(codebase, dtype_name, fault)[1]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("codebase", ["hf", "gpt-fast"])
def test_a_correct_rewrite_passes(codebase, dtype_name):
    output, p = _run(codebase, dtype_name, None)
    assert p.method == "reference" and p.reference_dtype == "float64", p.note
    assert p.passed, p.describe()
    assert 0 < p.e_orig <= p.max_original_error and p.e_opt <= p.bound
    assert not torch.equal(output.logits, _recorded(codebase, dtype_name)[4].logits)  # other arithmetic: a rewrite
    if dtype_name == "float32":  # float32 stays strict: every step decided by its margin, every token identical
        assert p.tokens_checked_to == p.greedy_steps and p.tokens_match and p.compared_steps == p.greedy_steps


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("codebase", ["hf", "gpt-fast"])
def test_a_planted_fault_fails(codebase, dtype_name, fault):
    p = _verdict(codebase, dtype_name, fault)
    assert not p.passed, f"{fault} passed: {p.describe()}"
    assert p.reasons() and p.reasons()[0].startswith("logit error e_opt"), p.reasons()
    assert p.e_opt > 2 * p.bound  # far outside what rounding explains, not at its edge


def test_bfloat16_bound_is_what_the_original_itself_shows():
    """In bfloat16 the bound comes from the original's own error (the floor is a small part of it), and it is far
    above float32's: a fixed number could not be right for both."""
    bf16 = _verdict("gpt-fast", "bfloat16", None)
    fp32 = _verdict("gpt-fast", "float32", None)
    assert bf16.multiplier * bf16.e_orig > bf16.floor
    assert bf16.bound > 100 * fp32.bound


# ---------------------------------------------------------------------------
# End to end: graphfix.optimize
# ---------------------------------------------------------------------------


def _optimize(dtype: torch.dtype, planted: bool, **options):
    import graphfix
    from graphfix.bench.parity_check import planted_rope_fault

    model = hf_loop.build_llama().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with planted_rope_fault() if planted else _nothing():
            return graphfix.optimize(model, max_seq_len=64, decode_steps=8, diagnose=False, **options)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_optimize_verifies_a_correct_bfloat16_model():
    result = _optimize(torch.bfloat16, False, backend="aot_eager", keep_if_slower=False)  # bf16 on a CPU is slow
    p = result.parity
    assert result.verified and result.compiled, result.summary()
    assert p.method == "reference" and p.e_opt <= p.bound and p.reference_dtype == "float64"
    rows = {what: (before, after) for what, before, after in result.rows()}
    assert rows["parity vs float64 (rel RMS)"][0] == f"{p.e_orig:.1e}"
    assert f"<= {p.bound:.1e}" in rows["parity vs float64 (rel RMS)"][1]
    assert "e_opt <= 3 x e_orig + 0.003" in result.summary()
    data = result.to_dict()
    assert data["schema_version"] == 2 and data["verification"]["schema_version"] == 2
    assert data["parity"]["e_orig"] == p.e_orig and data["parity"]["bound"] == p.bound
    assert data["parity"]["tokens_checked_to"] == p.tokens_checked_to and data["parity"]["stop_reason"]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_optimize_fails_a_front_door_that_swaps_the_rope_layout(dtype_name):
    result = _optimize(DTYPES[dtype_name], True, compile=False)
    assert not result.verified
    failures = result.verification.failures
    assert any(f.startswith("parity: logit error e_opt") for f in failures), failures
    assert "returned as it was" in result.notes[-1]


def test_the_gpu_check_runs_at_tiny_size(capsys):
    """``graphfix.bench.parity_check`` end to end on the CPU: the preset's correct model verifies, the planted one
    does not (the GPU runs ``parity_7b``, the same code on Llama-2-7B shapes)."""
    from graphfix.bench.parity_check import parity_check

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = parity_check("tiny", "cpu", layers=1, decode_steps=2, backend="aot_eager", diagnose=False,
                           max_seq_len=32)
    assert res["ok"], res
    assert res["correct"]["verified"] and res["correct"]["e_opt"] <= res["correct"]["bound"]
    assert not res["planted"]["verified"] and res["planted"]["e_opt"] > res["planted"]["bound"]
    assert res["planted"]["failures"][0].startswith("parity: logit error")
    assert "[parity_check] planted:" in capsys.readouterr().out
