"""Speculative decoding through the front doors: ``graphfix generate --speculate`` and HF ``prompt_lookup_num_tokens``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from graphfix.errors import InputError
from graphfix.optimize import hf_engine
from tests.test_runtime import hf_greedy, tiny_hf
from tests.test_runtime_cli import _parse

GEN = {"max_new_tokens": 12, "eos_token_id": None, "do_sample": False, "pad_token_id": 0}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model, path = tiny_hf("llama", seed=3), tmp_path_factory.mktemp("tiny-llama-spec")
    model.save_pretrained(path)
    return path, model


def _generate(path, *extra: str) -> list[list[int]]:
    args = _parse(["-q", "generate", str(path), "--prompt-ids", "5,7,9,11,5,7", "--max-new-tokens", "8", "--device",
                   "cpu", "--dtype", "fp32", "--no-compile", "--json", *extra])
    assert args.func(args) == 0
    return args


@pytest.mark.parametrize("extra", [("--speculate", "lookup:3"), ("--speculate", "draft:2", "--draft-layers", "1"),
                                   ("--speculate", "draft", "--draft", "SELF")])
def test_cli_speculation_prints_the_greedy_tokens(hf_dir, capsys, extra):
    path, model = hf_dir
    extra = tuple(str(path) if e == "SELF" else e for e in extra)  # the model as its own draft, loaded from disk
    _generate(path, *extra)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == [hf_greedy(model, [5, 7, 9, 11, 5, 7], 8)]


def test_cli_speculation_options_are_checked(hf_dir):
    path, _ = hf_dir
    for extra in (("--speculate", "draft:2"), ("--draft-layers", "1"), ("--speculate", "beam:2")):
        with pytest.raises(InputError):
            _generate(path, *extra)


def test_prompt_lookup_requests_go_to_the_engine():
    model = tiny_hf("llama", seed=1)
    prompt = torch.tensor([[5, 7, 9, 11, 5, 7, 9, 3]])
    req, why = hf_engine.request(model, (prompt,), dict(GEN, prompt_lookup_num_tokens=40))
    assert why == "" and req["speculate"] == "lookup:16"  # capped at MAX_K
    req, _ = hf_engine.request(model, (prompt,), dict(GEN))
    assert req["speculate"] == "none"


def test_optimized_generate_with_prompt_lookup_is_served_and_exact():
    from graphfix.optimize.api import optimize
    from graphfix.optimize.hf_runtime import runtime_of

    original = tiny_hf("llama", seed=2)
    prompt = torch.tensor([[5, 7, 9, 11, 5, 7, 9, 3, 5, 7]])
    with torch.no_grad():
        expected = original.generate(prompt, **GEN)
    result = optimize(tiny_hf("llama", seed=2), backend="eager", max_seq_len=64, diagnose=False, verify=False)
    engine = runtime_of(result.model).engine
    served = engine.served
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", hf_engine.EngineFallbackWarning)
        out = result.model.generate(prompt, prompt_lookup_num_tokens=4, **GEN)
    assert torch.equal(out, expected) and engine.served == served + 1 and not engine.fallbacks
