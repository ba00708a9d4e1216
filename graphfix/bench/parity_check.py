"""GPU check of ``verify``'s parity: a correct bfloat16 Llama-2-7B passes, the same model with a planted fault fails.

    python -m graphfix.bench.parity_check [--layers 32] [--decode-steps 32] [--json out.json]

On a GPU, ``parity_7b(device)`` builds Llama-2-7B shapes with random bfloat16 weights
(``graphfix.bench.presets.random_hf_model``) and runs ``graphfix.optimize(model)`` with its
defaults (diagnose, passes, Inductor, CUDA graphs, verify): ``verified`` must be true, with
``e_opt <= 3 * e_orig + floor`` against a float32 copy of the original. Then the same model
again (same seed) with one fault planted where a buggy rewrite would put it: the q and k
projections' rows permuted from rotate-half to interleaved order after the reference is
recorded (a checkpoint converter run the wrong way: RoPE then rotates other pairs), and
``optimize(..., compile=False, diagnose=False)``: ``verified`` must be false, with the
reason in the failures. Before this method, the fixed bf16 tolerance failed the correct
model (5.3e-2 of the logit scale against a tolerance of 3e-2) and could not tell it from
rounding. Prints one ``[parity_check]`` JSON line per run and the verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn


def swap_rope_layout_(model: nn.Module) -> None:
    """Permute each head's q and k projection rows from rotate-half order ``(i, i + d/2)`` to interleaved
    ``(2i, 2i + 1)``, in place: what converting an HF checkpoint "back" to Meta's layout does to it."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            d = attn.head_dim
            order = torch.arange(d, device=attn.q_proj.weight.device).view(2, d // 2).t().reshape(-1)
            for proj in (attn.q_proj, attn.k_proj):
                for tensor in (proj.weight, proj.bias):
                    if tensor is not None:
                        heads = tensor.shape[0] // d
                        tensor.copy_(tensor.view(heads, d, -1)[:, order].reshape(tensor.shape))


@contextlib.contextmanager
def planted_rope_fault() -> Iterator[None]:
    """``optimize`` with the q/k rows swapped by its HF front door, after the reference runs were recorded."""
    from graphfix.optimize import hf_runtime

    install = hf_runtime.install

    def buggy_install(model: nn.Module, **kwargs: Any) -> Any:
        runtime = install(model, **kwargs)
        swap_rope_layout_(model)
        return runtime

    with mock.patch.object(hf_runtime, "install", buggy_install):
        yield


def _row(result: Any, seconds: float) -> dict[str, Any]:
    p = result.parity
    row: dict[str, Any] = {"verified": result.verified, "seconds": round(seconds, 1)}
    if p is not None:
        row.update(method=p.method, reference_dtype=p.reference_dtype, e_orig=p.e_orig, e_opt=p.e_opt,
                   bound=p.bound, multiplier=p.multiplier, floor=p.floor, relative_max_abs=p.relative_error,
                   compared_steps=p.compared_steps, greedy_match=p.greedy_match, greedy_steps=p.greedy_steps,
                   tokens_checked_to=p.tokens_checked_to, stop_reason=p.stop_reason, note=p.note)
    if result.verification is not None:
        row["failures"] = result.verification.failures
    return row


def parity_7b(device: str | torch.device = "cuda", layers: int = 0, decode_steps: int = 32) -> dict[str, Any]:
    """``{"correct": {...}, "planted": {...}, "ok": bool}``: the two optimize runs described in the module docstring.

    ``layers``: cut Llama-2-7B to that many layers (0: all 32).
    """
    return parity_check("llama-2-7b", device, layers=layers, decode_steps=decode_steps)


def parity_check(preset: str, device: str | torch.device, *, layers: int = 0, decode_steps: int = 32,
                 dtype: torch.dtype = torch.bfloat16, **options: Any) -> dict[str, Any]:
    """``parity_7b`` on any preset of ``graphfix.bench.presets`` (``options`` go to both ``optimize`` calls)."""
    import graphfix
    from graphfix.bench.presets import random_hf_model

    overrides = {"num_hidden_layers": layers} if layers else {}
    out: dict[str, Any] = {"model": preset, "layers": layers or "all", "dtype": str(dtype).replace("torch.", "")}
    for label in ("correct", "planted"):
        model = result = None
        try:
            model = random_hf_model(preset, device, dtype, **overrides)
            started = time.perf_counter()
            with planted_rope_fault() if label == "planted" else contextlib.nullcontext():
                extra = {"compile": False, "diagnose": False} if label == "planted" else {}
                result = graphfix.optimize(model, decode_steps=decode_steps, **{**options, **extra})
            out[label] = _row(result, time.perf_counter() - started)
            if label == "correct":
                print(result.summary(), flush=True)
        except Exception as exc:  # noqa: BLE001 - a failure is the check's result, recorded with its trace
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:800], "trace": traceback.format_exc()[-2000:]}
        print(f"[parity_check] {label}: {json.dumps({k: v for k, v in out[label].items() if k != 'trace'})}",
              flush=True)
        del model, result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["ok"] = bool(out["correct"].get("verified")) and out["planted"].get("verified") is False
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=0, help="cut Llama-2-7B to this many layers (0: all 32)")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    res = parity_7b(args.device, args.layers, args.decode_steps)
    if args.json_path:
        from graphfix.bench.timing import _atomic_write

        _atomic_write(args.json_path, json.dumps(res, indent=2, default=str))
    print(f"[parity_check] ok={res['ok']} (correct model verified, planted fault not verified)", flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
