"""Check the dequantizing decode kernels against dequantize-then-``F.linear``: ``python -m graphfix.bench.quant_check``.

On a GPU (bf16 by default) it checks ``graphfix::qgemv`` launched plainly and, where the
GPU has it, with programmatic dependent launch; ``--interpret`` runs the same kernels in
Triton's interpreter on CPU tensors (how the CPU tests check them). Every scheme (int8 per
channel, int8 in groups of 32 as GGUF's Q8_0, int4 in groups of 32, 64, 128), every
prologue and epilogue, 1 to 16 rows, sizes with a partial last tile. The reference
dequantizes in float32 and multiplies in float32 (``scheme.dequantize``,
``kernels.fused_linear_reference``). ``--decoder`` adds a tiny quantized Llama decoding
through ``LlamaDecoder``'s kernel path against its standard path (the same greedy tokens).
Prints one JSON line per case and exits 1 when any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

from graphfix.bench.kernel_check import TOLERANCE, _rel, triton_ready

SCHEMES = ("int8", "int8:32", "int4:32", "int4:64", "int4:128")
CASES = [  # (N, K, prologue/epilogue): K = 320 leaves a partial last tile of the interpreter's 128
    (48, 256, {}), (40, 320, {"norm": True}), (64, 128, {"silu": True, "residual": True}),
    (32, 256, {"norm": True, "bias": True}), (24, 384, {"residual": True, "bias": True}),
]
ROWS = (1, 2, 3, 16)


def qgemv_errors(device: str, dtype: Any, schemes: tuple[str, ...] = SCHEMES,
                 rows_list: tuple[int, ...] = ROWS) -> Iterator[dict[str, Any]]:
    import torch

    import graphfix.quant.kernels  # noqa: F401 - registers graphfix::qgemv
    from graphfix.engine.kernels import fused_linear_reference, pdl_supported
    from graphfix.quant.scheme import dequantize_packed, parse_scheme, quantize_weight

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    for name in schemes:
        scheme = parse_scheme(name)
        for n, k, flags in CASES:
            if scheme.check(k):
                continue
            packed = quantize_weight(rand(n, k, scale=k ** -0.5), scheme)
            packed.codes, packed.scales = packed.codes.to(device), packed.scales.to(device)
            packed.zeros = None if packed.zeros is None else packed.zeros.to(device)
            w_ref = dequantize_packed(packed, torch.float32)
            for rows in rows_list:
                x = rand(rows, 1, 2 * k if flags.get("silu") else k)
                kwargs = {"norm_weight": rand(k) if flags.get("norm") else None, "eps": 1e-5,
                          "silu": bool(flags.get("silu")), "bias": rand(n) if flags.get("bias") else None,
                          "residual": rand(rows, 1, n) if flags.get("residual") else None}
                ref = fused_linear_reference(
                    x.float(), w_ref, **{key: (v.float() if isinstance(v, torch.Tensor) else v)
                                         for key, v in kwargs.items()}).view(rows, n)
                args = (x, packed.codes, packed.scales, packed.zeros, kwargs["norm_weight"], kwargs["eps"],
                        kwargs["silu"], kwargs["bias"], kwargs["residual"], scheme.bits, scheme.group_size or 0)
                case = {"scheme": scheme.name, "shape": [n, k], "rows": rows, "flags": sorted(flags)}
                yield {"kernel": "qgemv", **case, "rel_error": _rel(torch.ops.graphfix.qgemv(*args), ref)}
                if pdl_supported(device):
                    yield {"kernel": "qgemv_pdl", **case, "rel_error": _rel(torch.ops.graphfix.qgemv_pdl(*args), ref)}


def decoder_errors(device: str, dtype: Any, schemes: tuple[str, ...] = ("int8", "int4:32"),
                   method: str = "auto") -> Iterator[dict]:
    """A tiny HF Llama, quantized, decoding 2 rows and 1 row: the kernel path against the standard path.

    ``method="gptq"``: quantized by GPTQ calibrated through the decoder on the device (random token ids), so the
    calibration hooks, the rounding and the kernels reading its codes all run where the model lives."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphfix.engine import Generator, from_hf
    from graphfix.quant import quantize

    for name in schemes:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
        dec = from_hf(model, max_batch_size=2, max_seq_len=64)
        calibration = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(1))
        report = quantize(dec, name, method=method, calibration=calibration if method == "gptq" else None)
        prompts = [[1, 5, 9, 3], [2, 7]]
        with torch.no_grad():
            plain = Generator(dec, compile=False).generate(prompts, 6).tokens
            tokens, pos = torch.tensor([[7], [3]], device=device), torch.tensor([[9], [4]], device=device)
            before = dec.step(tokens, pos)
            dec.use_decode_kernels()
            after = dec.step(tokens, pos)
            fused = Generator(dec, compile=False).generate(prompts, 6).tokens
            dec.use_decode_kernels(False)
        yield {"kernel": "decoder", "scheme": name, "method": report.method, "rel_error": _rel(after, before),
               "tokens_equal": plain == fused}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphfix.bench.quant_check", description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="Triton's interpreter on CPU tensors")
    p.add_argument("--dtype", default=None, choices=sorted(TOLERANCE), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--decoder", action="store_true", help="also a tiny quantized decoder, kernel path vs standard")
    p.add_argument("--gptq", action="store_true", help="also the tiny decoder quantized by GPTQ on the device")
    args = p.parse_args(argv)
    if not triton_ready("graphfix.bench.quant_check", args.interpret, argv):
        return 2
    import torch

    device = "cpu" if args.interpret else "cuda"
    dtype_name = args.dtype or ("float32" if args.interpret else "bfloat16")
    dtype = getattr(torch, dtype_name)
    rows = list(qgemv_errors(device, dtype))
    if args.decoder:
        rows += list(decoder_errors(device, dtype))
    if args.gptq:
        rows += list(decoder_errors(device, dtype, ("int8", "int4:64"), method="gptq"))
    for row in rows:
        row["ok"] = row["rel_error"] <= TOLERANCE[dtype_name] and row.get("tokens_equal", True)
        print(json.dumps(row))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
