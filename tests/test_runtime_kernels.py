"""The decode kernels: ``LlamaDecoder.use_decode_kernels`` and the Triton kernels behind it, on CPU.

The decoder's kernel path (``Block.decode_fused``: RMSNorm folded into the GEMVs,
residual adds and SiLU·mul into them, split-KV attention with the mask taken from the
positions) runs the eager references on CPU, so its structure and arithmetic are
checked here against the standard path and Hugging Face. The Triton kernels themselves
run in Triton's interpreter on CPU tensors (``graphfix.bench.kernel_check --interpret``);
on a GPU the same check runs compiled (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from graphfix.engine import Generator, from_hf, from_meta
from graphfix.engine.attention_kernel import (
    BLOCK_S,
    MAX_CHUNK,
    MIN_SPLITS,
    TARGET_PROGRAMS,
    decode_attention_reference,
    split_plan,
)
from graphfix.errors import InputError
from tests.test_runtime import PROMPTS, hf_greedy, tiny_hf

NEW = 12


@pytest.mark.parametrize("kind,overrides,fuse_linears", [("llama", {}, True), ("llama", {}, False), ("qwen2", {}, True),
                                                         ("mistral", {"sliding_window": 4}, True)])
def test_decode_kernels_path_gives_hf_greedy_tokens_and_the_same_logits(kind, overrides, fuse_linears):
    model = tiny_hf(kind, **overrides)
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    dec = from_hf(model, max_batch_size=2, max_seq_len=64, share=True)
    tokens, pos = torch.tensor([[7]]), torch.tensor([[20]])  # one row, one token: the only step the kernels serve
    with torch.no_grad():
        plain = [Generator(dec, compile=False).generate([p], NEW).tokens[0] for p in PROMPTS]
        before = dec.step(tokens, pos)
        dec.use_decode_kernels(fuse_linears=fuse_linears)
        after = dec.step(tokens, pos)
        fused = [Generator(dec, compile=False).generate([p], NEW).tokens[0] for p in PROMPTS]  # batch 1 each
    assert plain == refs and fused == refs
    assert dec.decode_kernels == ("all" if fuse_linears else "attention")
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)


def test_decode_kernels_compile_fullgraph_without_recompiles():
    model = tiny_hf("llama")
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    dec = from_hf(model, max_batch_size=2, max_seq_len=64, share=True).use_decode_kernels(max_rows=2)
    gen = Generator(dec, backend="aot_eager", kv_buckets=(16, 32))
    gen.warmup(batch_sizes=(1, 2))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert gen.generate(PROMPTS, NEW).tokens == refs
        assert gen.generate(PROMPTS[:1], NEW).tokens == refs[:1]


def test_decode_kernels_need_the_fused_layout():
    dec = from_hf(tiny_hf("llama"), max_batch_size=1, max_seq_len=32, fuse=False)
    with pytest.raises(InputError, match="fused"):
        dec.use_decode_kernels()
    assert dec.use_decode_kernels(False).decode_kernels is False


@pytest.mark.parametrize("heads,kv_len", [(32, 256), (32, 2048), (256, 64), (1, 40), (8, 4096), (256, 4096),
                                         (512, 1000)])
def test_split_plan_covers_the_cache_in_aligned_chunks(heads, kv_len):
    """``heads``: rows x heads (256 is Llama-2-7B at batch 8)."""
    splits, chunk = split_plan(heads, kv_len)
    assert chunk % BLOCK_S == 0 and splits * chunk >= kv_len > (splits - 1) * chunk and chunk <= MAX_CHUNK
    # about TARGET_PROGRAMS blocks, at least MIN_SPLITS per row and head where the cache has that many tiles, more
    # only to keep chunks within MAX_CHUNK
    tiles = -(-kv_len // BLOCK_S)
    assert splits >= min(tiles, MIN_SPLITS)
    assert heads * splits <= max(heads * -(-kv_len // MAX_CHUNK), TARGET_PROGRAMS + heads, MIN_SPLITS * heads)


def test_attention_reference_masks_by_position_and_window():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    pos = torch.tensor([5, 15])
    out = decode_attention_reference(q, k, v, pos, window=3)
    for b, p in enumerate(pos.tolist()):  # row b sees slots p-2 .. p of its KV head
        for h in range(4):
            keys, values = k[b, h // 2, p - 2: p + 1], v[b, h // 2, p - 2: p + 1]
            weights = torch.softmax(keys @ q[b, h] / 8 ** 0.5, dim=0)
            assert torch.allclose(out[b, h], weights @ values, atol=1e-6)


INTERPRETER_DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def interpreter_runs():
    """``kernel_check --interpret`` for each dtype, both started at once: each is one Python process running the
    interpreter on one core, so on the suite's two cores the second costs little wall time. dtype -> a function
    waiting for its ``(returncode, stdout, stderr)``."""
    import triton  # noqa: F401 - a test dependency (pyproject's [test] extra): its absence is a failure, not a skip

    procs = {dtype: subprocess.Popen([sys.executable, "-m", "graphfix.bench.kernel_check", "--interpret", "--dtype",
                                      dtype], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for dtype in INTERPRETER_DTYPES}

    def result(dtype: str) -> tuple[int, str, str]:
        out, err = procs[dtype].communicate(timeout=600)
        return procs[dtype].returncode, out, err

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("dtype,bound", [("float32", 1e-4), ("bfloat16", 1.6e-2)])
def test_triton_kernels_in_the_interpreter_match_the_references(dtype, bound, interpreter_runs):
    """Every kernel in Triton's interpreter against its eager reference (computed in float32), for 1 to 16 rows at
    different positions: the one-row GEMV and the rows kernel with every prologue and epilogue, attention with
    grouped heads, windows and splits, RoPE and the cache write."""
    returncode, stdout, stderr = interpreter_runs(dtype)
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert returncode == 0, stderr[-2000:] + stdout[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"gemv", "fused_gemv", "decode_attention", "rope_cache", "rope_cache_compiled"}
    assert any(r.get("window") for r in rows) and any(r.get("splits", 1) > 2 for r in rows)
    assert {r.get("interleaved") for r in rows if r["kernel"] == "rope_cache"} == {False, True}
    assert {r.get("shared_row") for r in rows if r["kernel"] == "rope_cache" and r["shape"][0] > 1} == {False, True}
    assert [r["in_place"] for r in rows if r["kernel"] == "rope_cache_compiled"] == [True]  # no copy of a cache
    gemv_rows = {r["rows"] for r in rows if r["kernel"] == "fused_gemv"}
    flags = {tuple(r["flags"]) for r in rows if r["kernel"] == "fused_gemv" and r["rows"] == 16}
    assert gemv_rows == {1, 2, 3, 8, 16} and {"norm", "bias"} <= {f for fs in flags for f in fs}
    assert {"silu", "residual"} <= {f for fs in flags for f in fs}
    for kernel in ("decode_attention", "rope_cache"):  # batches of 2, 3, 8 and 16 rows, no two at one position
        batches = [r["shape"][0] for r in rows if r["kernel"] == kernel]
        assert {2, 3, 8, 16} <= set(batches), (kernel, batches)
    assert all(r["ok"] and r["rel_error"] < bound for r in rows), [r for r in rows if not r["rel_error"] < bound]


def test_pdl_is_a_no_op_where_the_device_lacks_it():
    """``pdl=True`` (the default) only changes how GEMVs launch on sm_90+; on CPU the decoder runs as before."""
    from graphfix.engine.kernels import fused_linear, pdl_supported

    assert pdl_supported("cpu") is False
    model = tiny_hf("llama")
    dec = from_hf(model, max_batch_size=1, max_seq_len=32, share=True)
    tokens, pos = torch.tensor([[5]]), torch.tensor([[2]])
    with torch.no_grad():
        plain = dec.use_decode_kernels(pdl=False).step(tokens, pos)
        assert dec.use_decode_kernels().decode_pdl is False
        assert torch.equal(dec.step(tokens, pos), plain)
        x, w, nw = torch.randn(1, 1, 16), torch.randn(8, 16), torch.randn(16)
        assert torch.equal(fused_linear(x, w, norm_weight=nw, eps=1e-5, pdl=True),
                           fused_linear(x, w, norm_weight=nw, eps=1e-5))


def test_gemv_tile_choices_round_trip_for_the_same_gpu_and_triton_only(monkeypatch):
    """A warm start takes the first process's tiles (``CompileCache`` keeps them) instead of timing every tile again."""
    import triton

    from graphfix.engine import kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    tuned = kernels.gemv_kernel_tuned
    monkeypatch.setattr(tuned, "cache", {})
    best = tuned.configs[2]
    key = (4096, 11008, False, True, False, True, "torch.bfloat16", "torch.bfloat16")
    tuned.cache[key] = best
    choices = json.loads(json.dumps(kernels.tile_choices()))  # through JSON, as the file holds it
    assert choices["device"] == "Test GPU" and len(choices["tiles"]) == 1

    tuned.cache.clear()
    assert kernels.use_tile_choices(choices) == 1
    chosen = tuned.cache[key]  # the autotuner looks its cache up with the tuple it builds from the call
    assert (chosen.kwargs, chosen.num_warps, chosen.num_stages) == (best.kwargs, best.num_warps, best.num_stages)

    tuned.cache.clear()
    assert kernels.use_tile_choices({**choices, "device": "Other GPU"}) == 0
    assert kernels.use_tile_choices({**choices, "triton": triton.__version__ + ".x"}) == 0
    odd = {**choices, "tiles": [{**choices["tiles"][0], "num_warps": 3}]}  # a tile this version does not offer
    assert kernels.use_tile_choices(odd) == 0 and tuned.cache == {}


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_cache_kernel_path_equals_inductors_rope_and_cache_write(layout):
    """``rope_kernel`` (one kernel: RoPE of q and k, k/v into the cache) against the separate ops, both layouts:
    the same logits and the same cache contents after a step."""
    if layout == "half":
        dec = from_hf(tiny_hf("llama"), max_batch_size=2, max_seq_len=64, share=True)
    else:
        from tests.test_runtime import _meta_pair

        dec = from_meta(_meta_pair()[1], max_batch_size=2, max_seq_len=64)
    assert dec.config.rope_layout == layout
    prompt = torch.tensor([[5, 9, 17, 3, 8]])
    tokens, pos = torch.tensor([[7]]), torch.tensor([[5]])  # batch 1, one token: the decode-kernel step
    results = []
    with torch.no_grad():
        for rope_kernel in (False, True):
            for layer in dec.layers:
                layer.attention.kv_cache.reset()
            dec.use_decode_kernels(False).step(prompt, torch.arange(5)[None])  # the prompt in the cache
            calls = []
            dec.use_decode_kernels(rope_kernel=rope_kernel)
            block = dec.layers[0]
            original = block.decode_fused
            block.decode_fused = lambda *a, calls=calls, original=original, **k: (
                calls.append(a[-1] is not None) or original(*a, **k))
            logits = dec.step(tokens, pos)
            del block.decode_fused
            cache = dec.layers[1].attention.kv_cache
            results.append((logits, cache.k_cache.clone(), cache.v_cache.clone(), calls))
    (plain, k0, v0, calls0), (fused, k1, v1, calls1) = results
    assert calls0 == [False] and calls1 == [True]  # the kernel path ran, with the tables only when asked
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(v1, v0) and torch.allclose(k1, k0, atol=1e-6)
    assert k1[0, :, 5].abs().sum() > 0 and k1[0, :, 6].abs().sum() == 0
