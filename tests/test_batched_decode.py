"""Decode kernels for 2 to 16 rows, and switching them on and off without recompiling.

``LlamaDecoder.use_decode_kernels`` now serves decode steps of 1 to ``kernels.MAX_ROWS`` rows,
each row at its own position. On CPU the decoder's kernel path runs the kernels' eager
references, which checks how the batched step is wired (per-row positions into RoPE, the
cache write and the attention mask, per-row norms and residuals); with Triton's interpreter
(``kernel_check --interpret --parts decoder``) it runs the Triton kernels themselves. A
``Generator`` keys its compiled callables by the decoder's ``compile_key``, so both settings
warmed up serve alternately under ``fail_on_recompile``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from graphfix.engine import Generator, from_hf
from graphfix.engine.kernels import MAX_ROWS
from graphfix.engine.llama import DEFAULT_KERNEL_ROWS
from tests.test_runtime import hf_greedy, tiny_hf

NEW = 8
ROW_PROMPTS = [[5, 7, 9], [3, 4, 100, 22, 9, 8, 1, 17, 44], [60], [11, 12, 13, 14, 15, 16], [2, 90, 31, 8],
               [70, 71], [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9], [33, 44, 55, 66, 77]]
"""Eight prompts of different lengths: in a batch, every row decodes at its own positions."""


def _count_fused_steps(dec) -> list[int]:
    """Wrap the first layer's ``decode_fused``: the list receives the rows of each call (the kernel path ran)."""
    rows: list[int] = []
    block = dec.layers[0]
    original = block.decode_fused
    block.decode_fused = lambda x, *a, **k: rows.append(x.shape[0]) or original(x, *a, **k)
    return rows


@pytest.mark.parametrize("kind,overrides,batch", [("llama", {}, 8), ("qwen2", {}, 3), ("mistral", {"sliding_window": 4}, 5)])
def test_batched_decode_kernels_equal_the_standard_path(kind, overrides, batch):
    """Rows at different positions: the standard path's greedy tokens (HF's on row 0 alone), one step's logits equal."""
    model = tiny_hf(kind, **overrides)
    prompts = ROW_PROMPTS[:batch]
    dec = from_hf(model, max_batch_size=batch, max_seq_len=64, share=True)
    tokens = torch.tensor([[7 + b] for b in range(batch)])
    pos = torch.tensor([[len(p) + 3] for p in prompts])  # positions inside each row's sequence, all different
    with torch.no_grad():
        plain = Generator(dec, compile=False).generate(prompts, NEW).tokens
        before = dec.step(tokens, pos)
        rows = _count_fused_steps(dec.use_decode_kernels(max_rows=MAX_ROWS))
        fused = Generator(dec, compile=False).generate(prompts, NEW).tokens
        after = dec.step(tokens, pos)  # the cache holds the same sequences: the standard run wrote them too
    assert fused == plain and plain[0] == hf_greedy(model, prompts[0], NEW)
    assert rows == [batch] * NEW  # NEW - 1 decode steps of the request and the step above, all rows at once
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_kernels_serve_one_token_rows_up_to_max_rows():
    dec = from_hf(tiny_hf("llama"), max_batch_size=MAX_ROWS + 1, max_seq_len=32, share=True)
    assert not dec.kernels_serve(2, 1)  # switched off
    dec.use_decode_kernels(max_rows=1)
    assert dec.kernels_serve(1, 1) and not dec.kernels_serve(2, 1)
    dec.use_decode_kernels()  # by default up to MAX_ROWS rows (the H200 measurement, llama.DEFAULT_KERNEL_ROWS)
    assert DEFAULT_KERNEL_ROWS == MAX_ROWS and dec.kernels_serve(MAX_ROWS, 1)
    dec.use_decode_kernels(max_rows=MAX_ROWS)
    assert dec.kernels_serve(1, 1) and dec.kernels_serve(MAX_ROWS, 1)
    assert not dec.kernels_serve(MAX_ROWS + 1, 1) and not dec.kernels_serve(2, 2)
    rows = _count_fused_steps(dec)
    with torch.no_grad():
        for batch in (MAX_ROWS, MAX_ROWS + 1):
            dec.step(torch.ones(batch, 1, dtype=torch.long), torch.arange(batch).view(batch, 1))
        dec.step(torch.ones(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3))  # prefill: standard path
    assert rows == [MAX_ROWS]


def test_decode_kernel_settings_alternate_without_recompiling():
    """Both settings warmed up on one generator, then used alternately at batch 1 and 3 under fail_on_recompile,
    each setting's graphs in code objects of their own (one graph each).

    Before the callables were keyed by ``compile_key``, the second setting's warmup recompiled the first's
    code objects (a guard on ``decode_kernels`` failed): each held a graph per setting, shared one recompile
    limit, and a generator warmed under one setting recompiled under the other (the GPU self-check's failure).
    """
    prompts = ROW_PROMPTS[:3]
    dec = from_hf(tiny_hf("llama"), max_batch_size=3, max_seq_len=64)
    with torch.no_grad():
        refs = Generator(dec, compile=False).generate(prompts, NEW).tokens
    traced: dict[object, list[str]] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs):  # which setting each graph was traced under, and its ops
        traced.setdefault(dec.decode_kernels, []).append(
            " ".join(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward

    gen = Generator(dec, backend=backend)
    for enabled in (False, True):
        dec.use_decode_kernels(enabled, max_rows=3)
        gen.warmup(batch_sizes=(1, 3), prompt_lengths=[4])
    assert {key[-1] for key in gen._fns if key[0] == "decode"} == {(False, False, False, 0), ("all", False, True, 3)}
    assert set(traced["all"]) - set(traced[False])  # the kernel setting's decode graphs: the kernel path, traced
    with torch.compiler.set_stance("fail_on_recompile"):
        for enabled in (True, False, True, False):
            dec.use_decode_kernels(enabled, max_rows=3)
            assert gen.generate(prompts, NEW).tokens == refs
            assert gen.generate(prompts[1:2], NEW).tokens == refs[1:2]
    assert gen.recompiles() == 0  # one graph per code object: no setting ever evicted or guarded another's


def test_triton_kernels_in_the_batched_decoder_equal_the_standard_path():
    """Triton's interpreter runs the decoder's kernel path (rows kernel, RoPE/cache write, attention) on CPU."""
    import triton  # noqa: F401 - a test dependency: its absence is a failure, not a skip

    proc = subprocess.run([sys.executable, "-m", "graphfix.bench.kernel_check", "--interpret", "--parts", "decoder"],
                          check=False, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert {r["model"] for r in rows} == {"llama", "qwen2", "mistral"} and any(r["window"] for r in rows)
    assert all(r["rows"] > 1 for r in rows) and len({r["rows"] for r in rows}) == len(rows)
    for r in rows:
        assert r["calls_per_step"] == r["expected_calls"], r  # every linear, RoPE and attention as a kernel
        assert r["tokens_equal"] and r["rel_error"] < 1e-4 and r["ok"], r
