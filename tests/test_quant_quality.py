"""Quality on the real SmolLM2-135M (CPU), perplexity on a fixed 2,048-token English text
(``tests/fixtures/quant_eval_text.txt``) and greedy tokens of 5 prompts over 64 tokens, against the unquantized
model (the GGUF's Q4_1 weights dequantized to float32: the only SmolLM2 graphfix ships).

Measured (docs/quantization.md): int8 round-to-nearest is +1.05% in perplexity; GPTQ on the shipped calibration
text (never the evaluation text) is +0.67% on 4,096 calibration tokens and +0.49% on 16,384 (the issue's 0.5%;
minutes of calibration on a 2-core CPU, so not here). The issue's other int8 bound, 64 equal greedy tokens for
every prompt, is met by no method and not by bfloat16 either (64/16/36/3/64): the unquantized model's own top-2
margin at the tokens where they part is 0.001 to 0.005 logits. This test holds what GPTQ meets at a calibration a
test can afford, so a regression shows: int8 GPTQ on 4,096 tokens within 0.8% (round-to-nearest is 1.05%). The
calibration forward costs what the greedy reference run (64 decode steps) used to, so greedy agreement, a coin
toss at those near-ties, is left to the benchmark, and int4:32's exactness on this GGUF to
``tests/test_quant_checkpoint.py`` (re-packed logits equal the float model's); the whole table is
``benchmarks/bench_quant_quality.py``."""

from __future__ import annotations

import pytest

from graphfix.bench.quant_quality import EVAL_TOKENS, evaluate

CALIBRATION_TOKENS = 4096


@pytest.mark.slow
def test_smollm2_int8_gptq_perplexity():
    rows = {r["scheme"]: r for r in evaluate(("int8",), greedy_for=(), calibration_tokens=CALIBRATION_TOKENS)}
    base, int8 = rows["float32"], rows["int8"]
    assert base["tokens"] == EVAL_TOKENS and 1 < base["perplexity"] < 100
    assert int8["method"] == "gptq" and f"{CALIBRATION_TOKENS} calibration tokens" in int8["calibration"], int8
    assert 1.0 < int8["ratio"] <= 1.008, int8
    assert int8["weight_bytes"] < base["weight_bytes"]
