"""The drop-in measured beside the engine: ``graphfix.optimize(model)``, then the model's own ``generate``.

The benchmark's last section (``--systems ...,optimize``): it runs on the same HF model, with
the same weights, as every other system. ``optimize`` is called as a user calls it (its
defaults, plus ``max_batch_size`` for the largest batch measured and the benchmark's backend); its wall time is the
cold time (the compile cache the benchmark activated starts empty). Then
``model.generate`` is timed exactly as HF's own (``bench_hf``), batch by batch, so the rows
compare with the engine's and HF's directly. It runs last: ``optimize``'s diagnosis resets
Dynamo, which drops the graphs the other sections compiled.
"""

from __future__ import annotations

from typing import Any

import torch

from graphfix.bench.timing import _now


def bench_dropin(model: torch.nn.Module, batches: list[int], args: Any, device: torch.device, vocab: int,
                 res: Any) -> None:
    """Optimize ``model`` in place and time its ``generate`` at each batch size; rows go into ``res``."""
    import graphfix
    from graphfix.bench.decode import bench_hf

    started = _now()
    # the benchmark's own warm start turns on Dynamo's precompile cache, which graphfix's diagnosis cannot run under
    with torch._dynamo.config.patch(caching_precompile=False):
        result = graphfix.optimize(model, max_batch_size=max(batches), backend=args.backend,
                                   progress=lambda m: print(f"[optimize] {m}", flush=True))
    optimize_s = _now() - started
    p = result.parity
    res.doc["optimize"] = {"seconds": optimize_s, "verified": result.verified, "compiled": result.compiled,
                           "compile_seconds": result.compile_seconds, "notes": result.notes,
                           "parity": p.to_dict() if p else None,
                           "failures": result.verification.failures if result.verification else []}
    print(result.summary(), flush=True)
    for batch in batches:
        row = bench_hf(model, "optimize", batch, args, device, vocab)
        row["optimize_s"] = optimize_s
        res.add_run(row)
        print(f"[bench] optimize batch {batch}: {row['tok_per_s']:.1f} tok/s, {row['ms_per_token']:.3f} ms/token",
              flush=True)
