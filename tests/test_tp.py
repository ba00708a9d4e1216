"""Tensor parallelism on CPU: 2 and 4 gloo processes give world size 1's greedy tokens and logits.

The parent builds four tiny models (HF Llama with 2 KV heads, so tp=4 replicates them, and
a vocabulary of 130 that 4 does not divide; Qwen2 with q/k/v biases; Mistral with an
8-token sliding window and the vocabulary-parallel embedding; Meta's reference model, written as 2 ``consolidated.NN.pth``
shards, so tp=4 re-shards it) and writes them as checkpoints. Each rank loads only its
slices (``load_sharded``), then runs a prefill and 32 decode steps through two compiled
callables (``fullgraph=True``, Dynamo only: the ``eager`` backend) with recompiles
forbidden after the first decode step (at tp=4 only Llama, the KV-replicating case, is compiled:
each compile costs seconds of the shared CPU, and the other models' graphs are the same code). Llama also decodes through the decode-kernel path
(at tp=2 the Triton kernels themselves, in Triton's interpreter) and (at tp=2) through a warmed-up ``Generator`` under ``fail_on_recompile``. The reference is the plain world-size-1 decoder
(``from_hf``/``from_meta``); the world-size-1 run of the tensor-parallel code itself is
``test_world_size_1_runs_the_same_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from graphfix.convert.layout import meta_split_dim
from tests.helpers_meta import TINY_ARGS, build_meta_transformer, free_port, meta_state_dict, run_processes

STEPS = 32
KERNEL_STEPS = 6
"""Decode steps through the decode kernels: in Triton's interpreter each kernel program runs in Python."""
pytestmark = pytest.mark.slow  # spawns 2 and 4 processes: about 3 minutes on 2 shared CPU cores
PROMPT = [[3, 17, 42, 99, 7]]
HF_CASES = {"llama": {"vocab_size": 130}, "qwen2": {}, "mistral": {"sliding_window": 8}}


def _prefill(dec, tokens, pos):
    return dec.step(tokens, pos)


def _decode(dec, tokens, pos):
    return dec.step(tokens, pos)


def decode_run(dec, steps: int = STEPS, compiled: bool = True) -> tuple[list[int], list[torch.Tensor], int]:
    """Greedy tokens and last-position logits of a prefill and ``steps`` decode steps; and the graphs compiled."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    prefill, decode = _prefill, _decode
    if compiled:
        prefill = torch.compile(_prefill, backend=counter, fullgraph=True, dynamic=False)
        decode = torch.compile(_decode, backend=counter, fullgraph=True, dynamic=False)
    tokens = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = [prefill(dec, tokens, torch.arange(tokens.shape[1])[None])[:, -1]]
        out = [int(logits[-1].argmax(-1))]
        for i in range(steps):
            pos = torch.tensor([[tokens.shape[1] + i]])
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                logits.append(decode(dec, torch.tensor([[out[-1]]]), pos)[:, -1])
            finally:
                torch.compiler.set_stance("default")
            out.append(int(logits[-1].argmax(-1)))
    return out, logits, counter.frame_count


def _scale_weights(model) -> None:
    """Weights of std ``fan_in ** -0.5`` (norms around 1): activations stay O(1), so 1e-4 is a real tolerance."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * p.shape[1] ** -0.5 if p.dim() > 1 else 1.0 + 0.1 * torch.randn(p.shape))


def _write_meta(folder: Path, shards: int) -> None:
    folder.mkdir()
    params = {k: v for k, v in TINY_ARGS.items() if k not in ("max_batch_size", "max_seq_len")}
    (folder / "params.json").write_text(json.dumps(params))
    state = meta_state_dict(0)
    pieces = [{} for _ in range(shards)]
    for name, t in state.items():
        axis = meta_split_dim(name)
        for rank in range(shards):
            pieces[rank][name] = t.chunk(shards, axis)[rank].clone() if axis is not None else t.clone()
    for rank, sd in enumerate(pieces):
        torch.save(sd, folder / f"consolidated.{rank:02d}.pth")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{name: (folder, reference tokens, reference logits)}``, references from the plain world-size-1 decoder."""
    from graphfix.bench.presets import tiny_hf
    from graphfix.engine import from_hf, from_meta

    root = tmp_path_factory.mktemp("tp")
    cases = {}
    for kind, overrides in HF_CASES.items():
        torch.manual_seed(1)
        model = tiny_hf(kind, 0, **overrides)
        _scale_weights(model)
        model.save_pretrained(root / kind)
        tokens, logits, _ = decode_run(from_hf(model, max_seq_len=64), compiled=False)
        cases[kind] = (root / kind, tokens, logits)
    _write_meta(root / "meta", shards=2)
    tokens, logits, _ = decode_run(from_meta(build_meta_transformer(0), max_batch_size=1, max_seq_len=64),
                                   compiled=False)
    cases["meta"] = (root / "meta", tokens, logits)
    return cases


def _worker(rank: int, world: int, port: int, cases: dict, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from graphfix.engine import Generator
    from graphfix.engine.tp import choose_all_reduce, init_tp, load_sharded

    tp = init_tp(world, "cpu")
    choice = choose_all_reduce(tp)
    from graphfix.engine.kernels import INTERPRET

    results = {"choice": choice.kind, "interpret": INTERPRET}
    for name, folder in cases.items():
        dec = load_sharded(folder, tp, max_seq_len=64, dtype=torch.float32, progress=False,
                           vocab_parallel_embedding=name == "mistral")
        results[name] = decode_run(dec, compiled=world == 2 or name == "llama")
        results[f"{name}_heads"] = (dec.config.n_heads, dec.config.n_kv_heads, dec.output.weight.shape[0])
        results[f"{name}_embedding"] = type(dec.tok_embeddings).__name__
        if name == "llama":
            dec.use_decode_kernels()
            results["llama_kernels"] = decode_run(dec, KERNEL_STEPS, compiled=False)
        if name == "llama" and world == 2:  # the engine's own loop once (its warm-up compiles several graphs)
            gen = Generator(dec, backend="eager")
            gen.warmup(batch_sizes=(1,))
            with torch.compiler.set_stance("fail_on_recompile"):
                results["llama_generator"] = gen.generate(PROMPT, STEPS + 1).tokens[0]
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_runs_match_world_size_1(world, checkpoints, tmp_path):
    out = str(tmp_path / "result")
    interpret = {"TRITON_INTERPRET": "1"} if world == 2 else {}  # tp=2: the decode kernels in Triton's interpreter
    with pytest.MonkeyPatch.context() as mp:
        for key, value in interpret.items():
            mp.setenv(key, value)  # the spawned ranks inherit it before Triton reads it
        run_processes(_worker, (world, free_port(), {k: v[0] for k, v in checkpoints.items()}, out), nprocs=world,
                      timeout_s=300)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    for name, (_, ref_tokens, ref_logits) in checkpoints.items():
        for rank, got in enumerate(ranks):
            tokens, logits, graphs = got[name]
            assert tokens == ref_tokens, (name, rank)
            if world == 2 or name == "llama":  # one prefill graph, one decode graph: fullgraph, no recompile
                assert graphs == 2, (name, rank, graphs)
            diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
            assert diff <= 1e-4, (name, rank, diff)
    first = ranks[0]
    assert first["choice"] == "gloo"
    assert first["llama_heads"] == (4 // world, 2 // world or 1, -(-130 // world))
    assert first["interpret"] == (world == 2)
    kernel_tokens, kernel_logits, _ = first["llama_kernels"]
    assert kernel_tokens == checkpoints["llama"][1][:KERNEL_STEPS + 1]
    assert max((a - b).abs().max().item() for a, b in zip(kernel_logits, checkpoints["llama"][2])) <= 1e-4
    assert first["mistral_embedding"] == "VocabParallelEmbedding"
    if world == 2:
        assert first["llama_generator"] == checkpoints["llama"][1]


def _optimize_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import graphfix
    from graphfix.bench.presets import tiny_hf

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    model = tiny_hf("llama", 0)
    result = graphfix.optimize(model, tp=2, backend="aot_eager", diagnose=False, decode_steps=4)
    tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False)[0].tolist()
    torch.save({"verified": result.verified, "notes": result.notes, "tokens": tokens,
                "head": type(model.graphfix_optimized.front.engine.decoder.output).__name__}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_optimize_with_tp_2_verifies_the_sharded_engine(tmp_path):
    from graphfix.bench.presets import tiny_hf

    model = tiny_hf("llama", 0)
    with torch.no_grad():
        ref = model.generate(torch.tensor(PROMPT), max_new_tokens=8, do_sample=False)[0].tolist()
    out = str(tmp_path / "result")
    run_processes(_optimize_worker, (free_port(), out), nprocs=2, timeout_s=240)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["verified"], got["notes"]
        assert got["head"] == "VocabParallelHead"
        assert any("tp=2" in n and "heads" in n for n in got["notes"]), got["notes"]
        assert got["tokens"] == ref


def test_generate_cli_under_torchrun(checkpoints):
    import subprocess
    import sys

    folder, ref_tokens, _ = checkpoints["llama"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "graphfix.cli", "-q", "generate", str(folder), "--prompt-ids", ",".join(map(str, PROMPT[0])),
           "--max-new-tokens", "8", "--tp", "2", "--device", "cpu", "--no-compile", "--json"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    assert json.loads(lines[0])["tokens"] == [ref_tokens[:8]]
