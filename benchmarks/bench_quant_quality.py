"""The quality table of docs/quantization.md: SmolLM2-135M perplexity and greedy tokens per scheme, on CPU.

    python benchmarks/bench_quant_quality.py [--schemes bfloat16,int8+rtn,int8,...] [--greedy ...]
                                             [--calibration-tokens 16384]

Prints one JSON line per scheme (``graphfix.bench.quant_quality``; ``SCHEME+METHOD`` forces a method, plain
``SCHEME`` is ``graphfix.quantize``'s default: GPTQ on the shipped calibration text), then the Markdown table.
GPTQ's calibration forward over 16,384 tokens takes minutes on a 2-core CPU (seconds on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from graphfix.bench.quant_quality import MAX_CALIBRATION, NEW_TOKENS, PROMPTS, SCHEMES, evaluate


def table(rows: list[dict]) -> str:
    lines = [("| scheme | method | weight MB a step reads | perplexity | vs float32 | greedy tokens equal (5 x 64) "
             "| quantize s |"), "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        greedy = r.get("greedy_leading_equal")
        same = "-" if greedy is None else f"{sum(greedy)}/{len(PROMPTS) * NEW_TOKENS} ({greedy})"
        ratio = f"{100 * (r['ratio'] - 1):+.2f}%" if "ratio" in r else "-"
        lines.append(f"| {r['scheme'].partition('+')[0]} | {r.get('method', '-')} | {r['weight_bytes'] / 1e6:.1f} "
                     f"| {r['perplexity']:.3f} | {ratio} | {same} | {r.get('quantize_seconds', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--greedy", default="bfloat16,int8+rtn,int8,int4:32")
    p.add_argument("--calibration-tokens", type=int, default=MAX_CALIBRATION)
    args = p.parse_args(argv)
    rows = evaluate(tuple(s for s in args.schemes.split(",") if s), tuple(s for s in args.greedy.split(",") if s),
                    args.calibration_tokens)
    for row in rows:
        print(json.dumps(row))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
