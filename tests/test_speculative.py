"""Speculative decoding on the engine (graphfix.engine.speculative): greedy output equals plain decoding.

Tiny random-weight decoders on CPU (large weights, so the logits are far apart and no greedy
token flips on the rounding of a several-token verify step against a one-token step).
"""

from __future__ import annotations

import pytest
import torch

from graphfix.bench.presets import tiny_hf_model
from graphfix.engine import Generator, from_hf
from graphfix.engine.draft import truncated_draft
from graphfix.engine.spec_rules import accept_greedy, lookup_proposals
from graphfix.engine.speculative import SpecConfig
from graphfix.errors import InputError

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 9, 10], [1, 2, 3], [7, 7, 7, 7, 7, 9, 12, 13]]
NEW = 16


def _decoder(kind: str = "llama", layers: int = 3, **overrides):
    return from_hf(tiny_hf_model(kind, "cpu", num_hidden_layers=layers, **overrides), max_batch_size=3, max_seq_len=64)


def test_spec_strings():
    assert SpecConfig.parse("lookup") == SpecConfig("lookup", 4)
    assert SpecConfig.parse("draft:2") == SpecConfig("draft", 2)
    assert SpecConfig.parse("none") is None and SpecConfig.parse(None) is None
    for bad in ("ngram:3", "lookup:x", "lookup:0", "lookup:99"):
        with pytest.raises(InputError):
            SpecConfig.parse(bad)


def test_lookup_proposes_what_followed_the_latest_match():
    seq = torch.tensor([[1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 0, 0, 0, 0],    # "1 2" last seen before "3 4 5"
                        [4, 4, 4, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])   # no earlier "8": starts at the last token
    out = lookup_proposals(seq, torch.tensor([12, 5]), k=3)
    assert out.tolist() == [[3, 4, 5], [8, 0, 0]]
    seq[0, 6] = 7  # now "1 2" was followed by "3" only at the start: the longer "2"-match loses to the "1 2" one
    assert lookup_proposals(seq, torch.tensor([12, 5]), k=3)[0].tolist() == [3, 9, 9]


def test_greedy_acceptance_counts_the_matching_prefix():
    logits = torch.nn.functional.one_hot(torch.tensor([[4, 5, 6, 7]]), 8).float()
    tokens, accepted = accept_greedy(logits, torch.tensor([[4, 5, 1]]))
    assert tokens.tolist() == [[4, 5, 6, 7]] and accepted.tolist() == [2]


@pytest.mark.parametrize("kind,overrides,specs", [
    ("llama", {}, (("lookup:4", None), ("draft:3", 1), ("draft:2", 2))),
    ("mistral", {"sliding_window": 8}, (("draft:3", 1),)),  # windows: the verify step's mask and the draft's
    ("qwen2", {}, (("lookup:2", None),)),
])
def test_greedy_equals_plain_decoding(kind, overrides, specs):
    dec = _decoder(kind, **overrides)
    plain = Generator(dec, compile=False).generate(PROMPTS, NEW)
    for spec, layers in specs:
        draft = truncated_draft(dec, layers) if layers else None
        out = Generator(dec, compile=False, speculate=spec, draft=draft).generate(PROMPTS, NEW)
        assert out.tokens == plain.tokens, (kind, spec)
        assert out.speculation["rounds"] < NEW  # several tokens per verify step at least sometimes


def test_a_perfect_draft_is_always_accepted():
    dec = _decoder()
    out = Generator(dec, compile=False, speculate="draft:3", draft=truncated_draft(dec, 3)).generate(PROMPTS, 21)
    assert out.speculation["acceptance"] == 1.0
    assert out.speculation["rounds"] == 5  # 1 token from prefill, then 4 a round


def test_stale_cache_contents_are_never_seen():
    """Rejected proposals leave keys and values above a row's length: garbage there changes nothing."""
    dec = _decoder()
    gen = Generator(dec, compile=False, speculate="lookup:4")
    first = gen.generate(PROMPTS, NEW)
    for layer in dec.layers:
        layer.attention.kv_cache.k_cache.normal_(0, 100)
        layer.attention.kv_cache.v_cache.normal_(0, 100)
    assert gen.generate(PROMPTS, NEW).tokens == first.tokens


def test_eos_and_max_new_tokens_stop_each_row():
    dec = _decoder()
    plain = Generator(dec, compile=False).generate(PROMPTS, NEW)
    eos = plain.tokens[0][5]
    ref = Generator(dec, compile=False).generate(PROMPTS, NEW, eos_token_id=eos)
    out = Generator(dec, compile=False, speculate="draft:4", draft=truncated_draft(dec, 2)).generate(
        PROMPTS, NEW, eos_token_id=eos)
    assert out.tokens == ref.tokens and out.finished == ref.finished
    assert out.tokens[0][-1] == eos and len(out.tokens[0]) == plain.tokens[0].index(eos) + 1
    assert [len(t) for t in Generator(dec, compile=False, speculate="lookup:8").generate(PROMPTS, 5).tokens] == [5] * 3


def test_compiled_rounds_do_not_recompile():
    dec = _decoder()
    plain = Generator(dec, compile=False).generate(PROMPTS, NEW)
    gen = Generator(dec, backend="eager", speculate="draft:2", draft=truncated_draft(dec, 1))
    gen.warmup(batch_sizes=(3,), prompt_lengths=[10])
    gen.generate(PROMPTS, 4, speculate="lookup:4")  # another speculation per request: its own round graph
    with torch.compiler.set_stance("fail_on_recompile"):
        out = gen.generate(PROMPTS, NEW)
        lookup = gen.generate(PROMPTS, NEW, speculate="lookup:4")
    assert out.tokens == plain.tokens and lookup.tokens == plain.tokens
    # draft:2's round, lookup:4's verify round and its plain fallback round (compiled by the first lookup request)
    assert gen.graphs().get("spec_round") == 3 and gen.recompiles() == 0
    assert gen.generate(PROMPTS, NEW, speculate="none").tokens == plain.tokens  # per-request switch off


def test_draft_problems_are_input_errors():
    dec = _decoder()
    with pytest.raises(InputError, match="draft model"):
        Generator(dec, compile=False, speculate="draft:2")
    other = from_hf(tiny_hf_model("llama", "cpu", vocab_size=96), max_batch_size=3, max_seq_len=64)
    with pytest.raises(InputError, match="vocabulary"):
        Generator(dec, compile=False, speculate="draft", draft=other)
    small = truncated_draft(dec, 1, max_batch_size=1)
    with pytest.raises(InputError, match="draft's cache"):
        Generator(dec, compile=False, speculate="draft", draft=small).generate(PROMPTS, NEW)



def test_implied_speedup():
    from graphfix.bench.speculative import implied_speedup

    assert implied_speedup(1.0, 4, 0.5) == pytest.approx(1.9375)  # 1 + .5 + .25 + .125 + .0625 tokens a round
    assert implied_speedup(2.0, 3, 1.0) == 2.0


@pytest.mark.slow
def test_smollm2_greedy_equals_plain_with_lookup_and_its_own_layers_as_draft():
    """The real SmolLM2-135M (float32, CPU): prompt lookup, and its first 24 of 30 layers as the draft."""
    from graphfix.diagnose import sources

    dec = from_hf(sources.load("smollm2").model, max_batch_size=1, max_seq_len=128)
    prompt = [1, 504, 3458, 282, 260, 1345, 28, 253, 1345, 2254, 30, 504, 3458, 282, 260, 1345, 28]
    plain = Generator(dec, compile=False).generate([prompt], 32)
    for spec, draft in (("lookup:3", None), ("draft:3", truncated_draft(dec, 24))):
        out = Generator(dec, compile=False, speculate=spec, draft=draft).generate([prompt], 32)
        assert out.tokens == plain.tokens, spec
        assert out.speculation["acceptance"] > 0, spec


VERIFY_LINEARS_CHECK = """
import torch
from graphfix.bench.presets import tiny_hf_model
from graphfix.engine import from_hf
from graphfix.engine.verify_linears import RowsLinear, undo_rows_kernel, use_rows_kernel
dec = from_hf(tiny_hf_model("qwen2", "cpu"), max_batch_size=2, max_seq_len=64)  # q/k/v biases
tokens = torch.tensor([[3, 9, 4, 1, 7], [5, 5, 2, 8, 6]])
pos = torch.stack([torch.arange(10, 15), torch.arange(3, 8)])
with torch.no_grad():
    ref = dec.step(tokens, pos)
    swapped = use_rows_kernel(dec)
    assert all(type(m) is RowsLinear for m in dec.modules() if isinstance(m, torch.nn.Linear)), "not all swapped"
    out = dec.step(tokens, pos)
    assert undo_rows_kernel(dec) == swapped
print(swapped, float((out - ref).abs().max() / ref.abs().max()))
"""


def test_verify_linears_through_the_rows_kernel_in_the_interpreter():
    """``use_rows_kernel``: a 5-token step over 2 rows (10 rows of x) runs the skinny GEMM, same logits."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", VERIFY_LINEARS_CHECK], env=env, capture_output=True, text=True, check=False,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    swapped, err = done.stdout.split()
    assert int(swapped) == 2 * 4 + 1 and float(err) < 1e-5  # wqkv, wo, w13, w2 per layer, the LM head


def test_a_truncated_draft_takes_the_targets_decode_kernel_setting():
    """The decode kernels' path (their eager references on CPU) in the draft's one-token steps: still exact."""
    dec = _decoder()
    plain = Generator(dec, compile=False).generate(PROMPTS, NEW)
    dec.use_decode_kernels()
    draft = truncated_draft(dec, 2)
    assert draft.compile_key == dec.compile_key
    out = Generator(dec, compile=False, speculate="draft:2", draft=draft).generate(PROMPTS, NEW)
    assert out.tokens == plain.tokens


def test_streaming_gives_every_token_once_in_order():
    dec = _decoder()
    chunks = []
    gen = Generator(dec, compile=False, speculate="lookup:3")
    out = gen.generate(PROMPTS, NEW, stream=chunks.append, stream_interval=2)
    assert len(chunks) > 2 and [c.start for c in chunks] == [0] + [sum(c.tokens.shape[1] for c in chunks[:i])
                                                                  for i in range(1, len(chunks))]
    joined = torch.cat([c.tokens for c in chunks], dim=1).tolist()
    assert [row[: len(t)] for row, t in zip(joined, out.tokens)] == out.tokens
    with pytest.raises(InputError, match="record logits"):
        gen.generate(PROMPTS, NEW, record_logits=True)


def test_verify_step_runs_the_decode_kernels_as_rows_of_one_cache_row(monkeypatch):
    """At batch 1 with the decode kernels on for several rows, a verify step of k + 1 tokens is a rows step over
    cache row 0 (``LlamaDecoder.kernels_serve``, ``rope_cache(shared_row=True)``): same logits as the standard
    path, same greedy output as plain decoding."""
    from graphfix.engine import llama

    model = tiny_hf_model("llama", "cpu", num_hidden_layers=2)
    standard = from_hf(model, max_batch_size=1, max_seq_len=64, share=True)
    kernels = from_hf(model, max_batch_size=1, max_seq_len=64, share=True).use_decode_kernels(max_rows=16, pdl=False)
    assert kernels.kernels_serve(1, 5, shared_rows=True) and not kernels.kernels_serve(1, 5)
    assert not kernels.kernels_serve(2, 5, shared_rows=True) and not kernels.kernels_serve(1, 17, shared_rows=True)
    shared_calls = []
    real = llama.rope_cache

    def counting(*args):
        shared_calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(llama, "rope_cache", counting)
    tokens, pos = torch.tensor([[5, 6, 7, 8, 9, 3]]), torch.arange(6).view(1, 6)
    torch.testing.assert_close(kernels.step(tokens, pos, shared_rows=True), standard.step(tokens, pos), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(kernels.step(tokens[:, :5], pos[:, 1:] + 5, shared_rows=True),
                               standard.step(tokens[:, :5], pos[:, 1:] + 5), rtol=1e-5, atol=1e-5)
    assert shared_calls and all(shared_calls)
    for prompt in PROMPTS:
        plain = Generator(standard, compile=False).generate([prompt], NEW).tokens
        assert Generator(kernels, compile=False, speculate="lookup:4").generate([prompt], NEW).tokens == plain


SHARED_ROWS_COMPILED = """
import json, torch
from graphfix.bench.presets import tiny_hf_model
from graphfix.engine import Generator, from_hf
model = tiny_hf_model("llama", "cpu", num_hidden_layers=2)
standard = from_hf(model, max_batch_size=1, max_seq_len=64, share=True)
kernels = from_hf(model, max_batch_size=1, max_seq_len=64, share=True).use_decode_kernels(max_rows=16, pdl=False)
prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 9, 10]]
plain = Generator(standard, compile=False).generate(prompts, 16).tokens
gen = Generator(kernels, backend="aot_eager", speculate="lookup:4")
first = gen.generate(prompts, 16).tokens
with torch.compiler.set_stance("fail_on_recompile"):
    again = gen.generate(prompts, 16)
print(json.dumps({"first": first == plain, "again": again.tokens == plain, "rounds": again.speculation["rounds"]}))
"""


def test_compiled_round_verifies_on_the_kernels_in_the_interpreter():
    """The round graph (aot_eager) with the verify step as rows of one cache row, the Triton kernels' own code in
    the interpreter: plain decoding's tokens, and a second request without recompiling."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SHARED_ROWS_COMPILED], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["first"] and result["again"] and result["rounds"] >= 1, result  # every token through a round
