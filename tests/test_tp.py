"""Tensor parallelism on CPU: 2 and 4 gloo processes give world size 1's greedy tokens and logits.

The parent builds four tiny models (HF Llama with 2 KV heads, so tp=4 replicates them, and
a vocabulary of 130 that 4 does not divide; Qwen2 with q/k/v biases; Mistral with an
8-token sliding window; Meta's reference model, written as 2 ``consolidated.NN.pth``
shards, so tp=4 re-shards it) and writes them as checkpoints. Each rank loads only its
slices (``load_sharded``), then runs a prefill and 32 decode steps through two compiled
callables (``fullgraph=True``, Dynamo only: the ``eager`` backend) with recompiles
forbidden after the first decode step. Llama also decodes through the decode-kernel path
and through a warmed-up ``Generator``. The reference is the plain world-size-1 decoder
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
    results = {"choice": choice.kind}
    for name, folder in cases.items():
        dec = load_sharded(folder, tp, max_seq_len=64, dtype=torch.float32, progress=False)
        results[name] = decode_run(dec)
        results[f"{name}_heads"] = (dec.config.n_heads, dec.config.n_kv_heads, dec.output.weight.shape[0])
        if name == "llama":
            dec.use_decode_kernels()
            results["llama_kernels"] = decode_run(dec, compiled=False)
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
    run_processes(_worker, (world, free_port(), {k: v[0] for k, v in checkpoints.items()}, out), nprocs=world,
                  timeout_s=240)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    for name, (_, ref_tokens, ref_logits) in checkpoints.items():
        for rank, got in enumerate(ranks):
            tokens, logits, graphs = got[name]
            assert tokens == ref_tokens, (name, rank)
            assert graphs == 2, (name, rank, graphs)  # one prefill graph, one decode graph: fullgraph, no recompile
            diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
            assert diff <= 1e-4, (name, rank, diff)
    first = ranks[0]
    assert first["choice"] == "gloo"
    assert first["llama_heads"] == (4 // world, 2 // world or 1, -(-130 // world))
    assert first["llama_kernels"][0] == checkpoints["llama"][1]
    assert first["llama_generator"] == checkpoints["llama"][1]
