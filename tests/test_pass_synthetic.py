"""All passes on the synthetic model: its sdp_kernel and async_op breaks go, its outputs stay."""

from __future__ import annotations

import warnings

import torch

from graphfix.rewrite.blocks.side_effects import reorder_logging
from tests.fixtures.synthetic import build
from tests.helpers_meta import apply_passes, pass_classes, run_decode


def _break_lines(model, tokens) -> list[str]:
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        explained = torch._dynamo.explain(model)(tokens, 0)
    return [f"{r.reason.splitlines()[0]} @ line {r.user_stack[-1].lineno}" for r in explained.break_reasons]


def test_passes_remove_sdp_kernel_and_async_op_breaks_and_keep_outputs(capsys):
    ref_model, model = build(0), build(0)
    tokens = torch.randint(0, 97, (1, 5))
    before = _break_lines(build(0), tokens)
    assert any("async_op=True" in b for b in before) and any("non-Tensor" in b for b in before)

    results = {r.name: r for r in apply_passes(model, list(pass_classes()))}
    assert results["sdpa-context"].rewritten == 1 and results["functional-collectives"].rewritten == 1
    assert results["side-effects"].rewritten == 1  # the print in the root forward
    assert any(".item()" in reason for _, reason in results["side-effects"].skipped)
    assert results["static-kv-cache"].rewritten == 0 and len(results["static-kv-cache"].skipped) == 1
    for name in ("real-rope", "sdpa-attention", "inference-mode"):
        assert results[name].rewritten == 0 and results[name].notes

    with reorder_logging(model):
        after = _break_lines(model, tokens)
    assert not any("async_op" in b or "non-Tensor" in b for b in after), after
    assert len(after) == 1 and "item()" in after[0]  # left to the user, with a suggestion

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, fed = run_decode(ref_model, tokens, 3)
    out, _ = run_decode(model, tokens, 3, fed)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert all(r.rewritten == 0 for r in apply_passes(model, list(pass_classes())))
