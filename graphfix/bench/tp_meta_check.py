"""GPU check of ``optimize(meta_model, tp=N)``: Meta's ``forward(tokens, start_pos)`` on each rank's shard.

    torchrun --nproc-per-node 2 -m graphfix.bench.tp_meta_check     # tp=2 (any N that divides 8 heads, 2 KV heads)
    python -m graphfix.bench.tp_meta_check                         # tp=1: one GPU, the same tensor-parallel path
    torchrun --nproc-per-node 2 -m graphfix.bench.tp_meta_check --model-parallel   # fairscale's slices, in place

Every rank builds the same tiny Meta reference ``Transformer`` (seeded random weights, no
checkpoint; 8 heads of 64 and 2 KV heads, so tp=4 and 8 replicate the KV heads) and runs
``graphfix.optimize(model, tp=N)`` with its defaults on a GPU: Inductor, CUDA-graph decode,
the decode kernels. Then Meta's own token loop (a wide buffer sliced per call, as
``Llama3.generate`` does) runs through ``model.forward`` under ``fail_on_recompile`` and is
compared with the original model's tokens, eager. A cache of 256 positions and 80 new tokens
cross the engine's 64-position decode bucket. ``--model-parallel``: the model is built by
fairscale at model-parallel size N (each rank holding its slices, as Meta's ``Llama.build``
loads a checkpoint), which ``optimize(tp=N)`` serves in place. Rank 0 prints the optimize summary, one line
of results and a JSON line; the process exits 1 unless every rank verified. The CPU proof
is tests/test_tp_meta.py.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from typing import Any

import torch
from torch import nn

PARAMS = {"dim": 512, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 64,
          "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
SEQ_LEN = 256
PROMPT = [3, 17, 42, 99, 7]


def tiny_meta(device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Meta's ``Transformer`` of ``PARAMS``, seeded weights of std ``fan_in ** -0.5`` (norms around 1).

    Each tensor draws from ``(seed, name)``, plus the fairscale rank where it is split (a model-parallel model's
    slices must differ, or the vocabulary halves would tie), so every rank builds the same model.
    """
    from graphfix.convert.layout import meta_split_dim
    from graphfix.diagnose.meta_loader import build_meta_transformer

    model = build_meta_transformer(PARAMS, dtype=dtype, max_seq_len=SEQ_LEN, max_batch_size=1)
    import fairscale.nn.model_parallel.initialize as fs_init

    rank = fs_init.get_model_parallel_rank()  # 0 for a single-device model, whatever the process's rank
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = rank if meta_split_dim(name) is not None else 0
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{part}".encode()))
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[1] ** -0.5 if "tok_emb" not in name else 1.0))
    return model.to(device)


def meta_loop(forward: Any, prompt: list[int], new_tokens: int, device: torch.device) -> list[int]:
    """Greedy tokens through ``forward(tokens, start_pos)``: a prefill, then one position at a time."""
    buffer = torch.zeros((1, len(prompt) + new_tokens), dtype=torch.long, device=device)
    buffer[0, : len(prompt)] = torch.tensor(prompt)
    start = 0
    with torch.inference_mode():
        for end in range(len(prompt), buffer.shape[1]):
            logits = forward(buffer[:, start:end], start)
            buffer[0, end] = logits[0, -1].argmax()
            start = end
    return buffer[0, len(prompt):].tolist()


def check(tp_size: int | None, new_tokens: int = 80, backend: str | None = None,
          model_parallel: bool = False) -> dict[str, Any]:
    """Optimize the tiny Meta model at ``tp_size`` on this rank and run Meta's loop; the figures rank 0 prints.

    ``backend``: optimize's default (Inductor on a GPU) unless given (a CPU smoke run uses ``eager``).
    """
    import graphfix
    from graphfix.diagnose.meta_loader import ensure_model_parallel
    from graphfix.engine.tp import init_tp
    from graphfix.optimize import tp_front

    tp = init_tp(tp_size)
    # fairscale at model-parallel size 1 inside the tp world (a single-device model), or N (each rank its slices)
    ensure_model_parallel(tp.world_size if model_parallel else 1)
    model = tiny_meta(tp.device, torch.bfloat16)
    original = meta_loop(model.forward, PROMPT, new_tokens, tp.device)
    started = time.perf_counter()
    result = graphfix.optimize(model, tp=tp.world_size, prompt=torch.tensor([PROMPT]), decode_steps=new_tokens,
                               diagnose=False, backend=backend, keep_if_slower=False)  # check the sharded path
    seconds = time.perf_counter() - started
    state = model.__dict__.get("graphfix_optimized")
    graphs = state.graphs() if state is not None else {}
    with torch.compiler.set_stance("fail_on_recompile"):
        tokens = meta_loop(model.forward, PROMPT, new_tokens, tp.device)
    same = next((i for i, (a, b) in enumerate(zip(original, tokens)) if a != b), len(tokens))
    v = result.verification
    return {"tp": tp.world_size, "model_parallel": model_parallel, "verified": result.verified,
            "verified_on_every_rank": tp_front.agree(tp, result.verified),
            "graphs_after_optimize": graphs, "graphs_after_loop": state.graphs() if state is not None else {},
            "recompiles": v.recompiles if v else None, "graph_breaks": v.graph_breaks if v else None,
            "tokens_identical": same, "new_tokens": new_tokens, "optimize_s": round(seconds, 1),
            "tokens_per_s": round(v.tokens_per_second, 1) if v and v.tokens_per_second else None,
            "original_tokens_per_s": round(v.reference_tokens_per_second, 1)
            if v and v.reference_tokens_per_second else None,
            "summary": result.summary(), "tp_group": tp}


def main(argv: list[str] | None = None) -> int:
    from graphfix.engine.tp import main_print

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=None, help="expected world size (default: torchrun's)")
    p.add_argument("--new-tokens", type=int, default=80)
    p.add_argument("--model-parallel", action="store_true", help="build the model with fairscale at size N")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tp_meta_check needs CUDA GPUs (the CPU proof is tests/test_tp_meta.py)")
        return 2
    r = check(args.tp, args.new_tokens, model_parallel=args.model_parallel)
    tp = r.pop("tp_group")
    main_print(tp, r.pop("summary"))
    slices = " (fairscale slices)" if r["model_parallel"] else ""
    main_print(tp, f"tp_meta_check tp={r['tp']}{slices}: verified on every rank {r['verified_on_every_rank']}; graphs "
                   f"{r['graphs_after_loop']} (after optimize {r['graphs_after_optimize']}); Meta loop under "
                   f"fail_on_recompile: {r['tokens_identical']}/{r['new_tokens']} tokens identical to the original "
                   f"(bf16: a late divergence is rounding, verify's parity decides); optimize {r['optimize_s']} s; "
                   f"{r['tokens_per_s']} tok/s in verify's timed run (the original, eager: "
                   f"{r['original_tokens_per_s']})")
    main_print(tp, json.dumps(r))
    return 0 if r["verified_on_every_rank"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
