"""``graphfix.optimize.parity`` (the bound, the token window, the fallback) and ``graphfix.optimize.reference``
(which precision, the widened copy, what happens when there is no room or the run fails), on synthetic traces
and tiny modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from graphfix.optimize import reference
from graphfix.optimize.parity import compare, default_floor, default_multiplier
from graphfix.optimize.verification import StartPosRunner, Trace

STEPS, VOCAB = 6, 512


def _trace(logits: torch.Tensor) -> Trace:
    return Trace(None, logits.argmax(-1).T, logits, 1.0, prefill_tokens=4)


def _noisy(high: torch.Tensor, relative: float, seed: int) -> torch.Tensor:
    """``high`` plus noise of ``relative`` times its RMS, rounded to float32 as a recorded run is."""
    noise = torch.randn(high.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rms = high[high.isfinite()].square().mean().sqrt()
    return (high + relative * rms * noise).float()


@pytest.fixture(scope="module")
def high() -> torch.Tensor:
    """Reference logits whose top-2 margins are all decisive (the top logit stands out by about 5 RMS)."""
    logits = torch.randn(STEPS, 1, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    top = torch.randint(0, VOCAB, (STEPS, 1), generator=torch.Generator().manual_seed(1))
    return logits.scatter_add(-1, top[..., None], torch.full((STEPS, 1, 1), 8.0, dtype=torch.float64))


def _parity(high: torch.Tensor, orig: torch.Tensor, opt: torch.Tensor, dtype=torch.bfloat16, **kwargs):
    return compare(_trace(orig), _trace(opt), dtype, high=_trace(high), **kwargs)


def test_the_bound_is_a_multiple_of_the_originals_own_error_plus_a_floor(high):
    orig = _noisy(high, 1e-2, 2)
    within, beyond = _noisy(high, 2.5e-2, 3), _noisy(high, 5e-2, 4)
    ok, bad = _parity(high, orig, within), _parity(high, orig, beyond)
    assert ok.passed and not bad.passed
    assert ok.bound == pytest.approx(default_multiplier(torch.bfloat16) * ok.e_orig + default_floor(torch.bfloat16))
    assert ok.e_orig == pytest.approx(1e-2, rel=0.1) and bad.e_opt == pytest.approx(5e-2, rel=0.1)
    assert bad.reasons()[0].startswith("logit error e_opt") and f"{bad.bound:.2e}" in bad.reasons()[0]
    assert ok.tokens_checked_to == STEPS and ok.stop_reason == f"all {STEPS} steps"
    # the same errors with arguments: a multiplier of 6 lets the larger one through
    assert _parity(high, orig, beyond, multiplier=6.0).passed


def test_a_flipped_token_fails_where_the_margin_decides_it_even_inside_the_logit_bound(high):
    step, high = 3, high.clone()
    first, second = high[step, 0].topk(2).indices.tolist()
    rms = high[step, 0].square().mean().sqrt().item()
    high[step, 0, second] = high[step, 0, first] - 0.4 * rms  # above the threshold (0.21), yet a swap moves the
    orig = _noisy(high, 1e-2, 2)  # logits' RMS by only 0.4 * sqrt(2 / 512) = 0.025 of it, under the bound (0.034)
    opt = _noisy(high, 1e-2, 5)
    opt[step, 0, first], opt[step, 0, second] = opt[step, 0, second].item(), opt[step, 0, first].item()
    p = _parity(high, orig, opt)
    assert p.logits_ok and not p.tokens_ok and not p.passed, p.describe()
    assert p.greedy_match == step and p.compared_steps == step + 1  # later steps ran on another sequence
    assert p.reasons() == [r for r in p.reasons() if r.startswith("greedy token 3 differs")]


def test_tokens_may_differ_after_the_first_close_margin(high):
    close = high.clone()
    first, second = close[2, 0].topk(2).indices.tolist()
    close[2, 0, second] = close[2, 0, first] - 1e-3  # the reference barely prefers `first` at step 2
    orig = _noisy(close, 1e-2, 2)
    opt = _noisy(close, 1e-2, 6)
    opt[2, 0, second] = opt[2, 0, first] + 1e-3  # the optimized model picks the other one: allowed there
    p = _parity(close, orig, opt)
    assert p.passed, p.describe()
    assert p.tokens_checked_to == 2 and "at step 2" in p.stop_reason and p.greedy_match == 2
    assert p.margin_threshold > 1e-3 / close[2].square().mean().sqrt().item()


def test_an_original_that_does_not_reproduce_itself_fails(high):
    noise = _noisy(high, 1.0, 7)
    p = _parity(high, noise, _noisy(high, 1.0, 8), dtype=torch.float32)
    assert p.e_orig > p.max_original_error and not p.passed
    assert "do not reproduce" in p.reasons()[0]


def test_masked_vocabulary_entries_must_match_exactly(high):
    masked = high.clone()
    masked[..., -8:] = -math.inf
    orig, opt = _noisy(masked, 1e-2, 2), _noisy(masked, 1e-2, 3)
    orig[..., -8:] = opt[..., -8:] = -math.inf
    p = _parity(masked, orig, opt)
    assert p.passed and math.isfinite(p.logit_scale) and math.isfinite(p.max_abs_error)
    opt[0, 0, -1] = 0.0  # a masked token became possible
    assert _parity(masked, orig, opt).e_opt == math.inf


def test_without_a_high_precision_run_the_fixed_tolerance_decides(high):
    orig = _noisy(high, 1e-5, 2)
    p = compare(_trace(orig), _trace(_noisy(high, 1e-5, 3)), torch.float32, note="no room for a float64 copy")
    assert p.method == "fixed-tolerance" and p.e_orig is None and p.bound is None
    assert p.passed and "no room for a float64 copy" in p.describe()
    far = compare(_trace(orig), _trace(_noisy(high, 1e-2, 3)), torch.float32)
    assert not far.passed and far.reasons() == [far.describe()]


# ---------------------------------------------------------------------------
# reference: which precision, the copy, the run
# ---------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(4))
        self.table = torch.polar(torch.ones(4, 2), torch.ones(4, 2))  # a complex tensor attribute

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_the_widened_copy_keeps_ties_and_integers_and_leaves_the_original_alone():
    model = Tied().to(torch.bfloat16)
    copy64 = reference.widened_copy(model, torch.float64)
    assert copy64.embed.weight.dtype == torch.float64 and copy64.head.weight is copy64.embed.weight
    assert isinstance(copy64.embed.weight, nn.Parameter) and copy64.table.dtype == torch.complex128
    assert copy64.positions.dtype == torch.int64 and copy64.positions is not model.positions
    assert model.embed.weight.dtype == torch.bfloat16 and model.table.dtype == torch.complex64
    assert torch.equal(copy64.embed.weight.to(torch.bfloat16), model.embed.weight)
    assert reference.copy_bytes(model, torch.float64) == {torch.device("cpu"): 16 * 8 * 8 + 4 * 8 + 8 * 16}


def test_which_precision(monkeypatch):
    model = Tied()
    assert reference.choose(model, torch.float32)[0] == torch.float64
    assert reference.choose(model, torch.bfloat16)[0] == torch.float64  # small, on the CPU
    assert reference.choose(model, torch.float64) == (torch.float64, "a float64 model: its own run is the reference")
    assert reference.choose(model, torch.bfloat16, "float32")[0] == torch.float32
    assert reference.choose(model, torch.float32, "none")[0] is None
    monkeypatch.setattr(reference, "CPU_FLOAT64_BYTES", 0)  # "large": float32 for half precision
    assert reference.choose(model, torch.bfloat16)[0] == torch.float32
    monkeypatch.setattr(reference, "free_bytes", lambda device: 100)  # no room for anything
    dtype, why = reference.choose(model, torch.bfloat16)
    assert dtype is None and why.startswith("no room for a float32 copy") and "100 B" not in why


def test_a_failed_high_precision_run_leaves_the_fixed_rule_with_the_reason():
    class HardCoded(Tied):
        def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
            weight = self.head.weight.to(torch.float32)  # a model that fixes its own matmul dtype
            return self.embed(tokens) @ weight.T

    model, prompt = HardCoded(), torch.tensor([[1, 2, 3]])
    own = StartPosRunner().run(model, prompt, 2)
    high = reference.record(model, StartPosRunner(), prompt, 2, own, torch.float32)
    assert high.trace is None and high.dtype is None
    assert high.note.startswith("the float64 run of the original failed (RuntimeError")
    assert model.embed.weight.dtype == torch.float32


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def _cli(capsys, *options: str) -> tuple[int, dict]:
    import json

    from graphfix.cli.app import main

    code = main(["--quiet", "verify", "tests.test_optimize_cli:start_pos_model", "--backend", "aot_eager",
                 "--no-diagnose", "--decode-steps", "4", "--format", "json", *options])
    return code, json.loads(capsys.readouterr().out)


def test_cli_parity_options(capsys):
    code, data = _cli(capsys)
    assert code == 0 and data["parity"]["method"] == "reference" and data["parity"]["reference_dtype"] == "float64"
    assert data["parity"]["multiplier"] == 2.0 and data["parity"]["floor"] == 1e-5
    code, data = _cli(capsys, "--parity-multiplier", "0.5", "--parity-floor", "0")  # below the original's own error
    assert code == 1 and data["parity"]["bound"] == 0.5 * data["parity"]["e_orig"]
    assert any(f.startswith("parity: logit error") for f in data["verification"]["failures"])
    code, data = _cli(capsys, "--parity-reference", "none", "--tolerance", "1e-3")
    assert code == 0 and data["parity"]["method"] == "fixed-tolerance" and data["parity"]["tolerance"] == 1e-3
    assert "parity_reference='none'" in data["parity"]["note"]
