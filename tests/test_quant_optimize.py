"""``optimize(model, quantize=...)`` and ``graphfix generate --quantize``: the pass wired into the front doors, verified
against the unquantized original with a tolerance derived from the measured quantization error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from graphfix.cli.generate_cmd import add_parser
from graphfix.errors import InputError
from graphfix.optimize.api import optimize
from graphfix.optimize.parity import default_tolerance
from graphfix.quant import QuantLinear
from tests.test_runtime import hf_greedy, tiny_hf


def test_optimize_quantize_verifies_against_the_unquantized_original():
    model = tiny_hf("llama")
    result = optimize(model, backend="aot_eager", max_seq_len=64, decode_steps=6, diagnose=False, quantize="int8")
    assert result.verified, result.verification.failures
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    parity = result.parity
    info = model.graphfix_optimized.quantization
    assert "quantization error as the allowance" in parity.describe() and parity.passed
    assert info.error > 0 and info.tolerance == pytest.approx(default_tolerance(torch.float32) + 2 * info.error)
    if parity.method == "reference":  # e_orig is the eager int8 model's error against the unquantized float64 run
        assert parity.e_orig > 1e-3 and parity.e_opt <= parity.bound
    else:
        assert parity.relative_error <= info.tolerance and not parity.tokens_required
    assert any("quantized to int8" in n for n in result.notes)


def test_optimize_refuses_a_bad_scheme_before_any_work():
    model = tiny_hf("llama")
    with pytest.raises(InputError, match="int3"):
        optimize(model, quantize="int3")
    assert "graphfix_optimized" not in model.__dict__ and type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"


def test_generate_quantize_from_the_command_line(tmp_path, capsys):
    model = tiny_hf("llama", seed=3)
    model.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser(prog="graphfix")
    parser.add_argument("--quiet", "-q", action="store_true")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["-q", "generate", str(tmp_path), "--prompt-ids", "5,7,9,11", "--max-new-tokens", "6",
                              "--no-compile", "--decode-kernels", "--quantize", "int8", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["tokens"][0]) == 6
    # int8 on the tiny model: the first greedy token is the float model's (well separated logits)
    assert out["tokens"][0][0] == hf_greedy(model, [5, 7, 9, 11], 1)[0]
