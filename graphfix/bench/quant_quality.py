"""Quality of the quantization schemes on the real SmolLM2-135M, on CPU: perplexity and greedy tokens.

``python -m graphfix.bench.quant_quality [--schemes int8,int8+rtn,int4:32,...] [--calibration-tokens N]``
prints one JSON line per scheme: the perplexity on a fixed English text
(``tests/fixtures/quant_eval_text.txt``, 2,048 tokens), its ratio to the unquantized model's, and how
many of 64 greedy tokens for each of 5 prompts equal the unquantized model's. The unquantized model
is the GGUF file's weights dequantized to float32 (the only SmolLM2 graphfix ships); every scheme
quantizes those same weights. ``SCHEME+METHOD`` picks ``graphfix.quantize``'s method (``gptq``,
``mse``, ``rtn``; plain ``SCHEME`` is its default, ``auto``): GPTQ calibrates on the first
``--calibration-tokens`` tokens of the shipped calibration text (``graphfix/quant/calibration_text.txt``,
never the evaluation text). ``bfloat16`` is the unquantized model cast to bf16: the honest baseline of
how far a model moves under rounding that nobody calls lossy. The tests keep the int8 bound
(``tests/test_quant_quality.py``); ``benchmarks/bench_quant_quality.py`` prints the whole table for
docs/quantization.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from graphfix.quant.calibration import MAX_TOKENS as MAX_CALIBRATION

TEXT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "quant_eval_text.txt"
EVAL_TOKENS = 2048
PROMPTS = ("The capital of France is", "Once upon a time, in a small village,",
           "To install a Python package, you", "The three primary colors are",
           "Write a short poem about the sea:")
NEW_TOKENS = 64
SCHEMES = ("bfloat16", "int8+rtn", "int8", "int4:32", "int4:64", "int4:64+gptq", "int4:128", "int4:128+gptq")


def smollm2_and_tokens(text: Path = TEXT, n_tokens: int = EVAL_TOKENS,
                       calibration_tokens: int = 0) -> tuple[Any, torch.Tensor, list[list[int]], torch.Tensor]:
    """The float32 SmolLM2 decoder (``from_hf``), the text's first ``n_tokens`` ids ``(1, T)``, the prompts' ids
    and the first ``calibration_tokens`` ids of the shipped calibration text ``(1, C)``."""
    from graphfix.cli.generate_cmd import _tokenizer
    from graphfix.diagnose import sources
    from graphfix.engine import from_hf
    from graphfix.quant.calibration import text_tokens

    tok = _tokenizer(sources.SMOLLM2_ALIAS)
    ids = tok(text.read_text(), return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"{text}: {ids.shape[1]} tokens, fewer than {n_tokens}")
    prompts = [tok(p).input_ids for p in PROMPTS]
    calibration = text_tokens(tok, max_tokens=calibration_tokens)
    model = sources.load(sources.SMOLLM2_ALIAS).model
    return from_hf(model, max_batch_size=len(PROMPTS), max_seq_len=n_tokens), ids, prompts, calibration


@torch.no_grad()
def perplexity(dec: Any, ids: torch.Tensor, chunk: int = 512) -> float:
    """exp(mean NLL) of each next token, the text prefilled in chunks through the decoder's static cache."""
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, chunk):
        tokens = ids[:, start:start + chunk]
        pos = torch.arange(start, start + tokens.shape[1]).unsqueeze(0)
        logits = dec.step(tokens, pos).float()
        targets = ids[:, start + 1:start + 1 + tokens.shape[1]]
        logits = logits[:, : targets.shape[1]]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)


@torch.no_grad()
def greedy(dec: Any, prompts: list[list[int]], new: int = NEW_TOKENS) -> list[list[int]]:
    from graphfix.engine import Generator

    return Generator(dec, compile=False).generate(prompts, new).tokens


@torch.no_grad()
def greedy_agreement(dec: Any, prompts: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens of ``reference`` (the unquantized model's greedy continuation) are
    ``dec``'s greedy choice too, checked in one forward over prompt + continuation (teacher forcing).

    Greedy decoding is a function of the prefix, so when ``dec`` picks every reference token given the reference
    prefix, its own greedy run is the same sequence: one call per prompt instead of one per token.
    """
    counts = []
    for prompt, ref in zip(prompts, reference):
        seq = torch.tensor([prompt + ref[:-1]])
        logits = dec.step(seq, torch.arange(seq.shape[1]).unsqueeze(0))
        choice = logits[0, len(prompt) - 1:].argmax(-1).tolist()
        counts.append(next((i for i, (a, b) in enumerate(zip(choice, ref)) if a != b), len(ref)))
    return counts


def dequantized(dec: Any) -> Any:
    """``dec`` with each ``QuantLinear`` replaced by an ``nn.Linear`` holding its dequantized weight.

    The same arithmetic as ``QuantLinear.forward`` (which dequantizes, then ``F.linear``), done once instead of
    at every step: on a CPU, dequantizing 135M weights per decode step dominated the run.
    """
    from torch import nn

    from graphfix.quant import QuantLinear

    for module in list(dec.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                lin.weight = nn.Parameter(child.dequantize(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = child.bias
                setattr(module, name, lin)
    return dec


def _variant(base: Any, name: str, calibration: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """A copy of ``base`` as ``name`` says (``bfloat16``, ``SCHEME`` or ``SCHEME+METHOD``) and its row's facts."""
    from graphfix.quant import quantize

    dec = copy.deepcopy(base)
    if name == "bfloat16":
        return dec.to(torch.bfloat16), {"weight_bytes": dec.weight_bytes()}
    scheme, _, method = name.partition("+")
    started = time.perf_counter()
    report = quantize(dec, scheme, method=method or "auto", calibration=calibration if calibration.numel() else None)
    row = {"weight_bytes": dec.weight_bytes(), "method": report.method, "calibration": report.calibration,
           "quantize_seconds": round(time.perf_counter() - started, 1)}
    return dequantized(dec), row


def evaluate(schemes: tuple[str, ...] = SCHEMES, greedy_for: tuple[str, ...] = ("int8",),
             calibration_tokens: int = MAX_CALIBRATION) -> list[dict[str, Any]]:
    """One row for the unquantized model and one per scheme (perplexity; greedy tokens for ``greedy_for``)."""
    started = time.perf_counter()
    base, ids, prompts, calibration = smollm2_and_tokens(calibration_tokens=calibration_tokens)
    ref_ppl = perplexity(base, ids)
    ref_tokens = greedy(base, prompts) if greedy_for else None
    rows = [{"scheme": "float32", "perplexity": ref_ppl, "tokens": ids.shape[1],
             "seconds": round(time.perf_counter() - started, 1)}]
    for name in schemes:
        started = time.perf_counter()
        dec, row = _variant(base, name, calibration)
        row = {"scheme": name, **row}
        ppl = perplexity(dec, ids)
        row.update(perplexity=ppl, ratio=ppl / ref_ppl)
        if name in greedy_for:
            row["greedy_leading_equal"] = greedy_agreement(dec, prompts, ref_tokens)
            row["greedy_identical"] = all(n == NEW_TOKENS for n in row["greedy_leading_equal"])
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        del dec
    rows[0]["weight_bytes"] = base.weight_bytes()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphfix.bench.quant_quality", description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--greedy", default="int8", help="schemes whose 5 x 64 greedy tokens are compared")
    p.add_argument("--calibration-tokens", type=int, default=MAX_CALIBRATION,
                   help="tokens of the shipped calibration text GPTQ runs on")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = evaluate(tuple(s for s in args.schemes.split(",") if s), tuple(s for s in args.greedy.split(",") if s),
                    args.calibration_tokens)
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
