"""Compile every Triton kernel of the engine for a Hopper GPU, on a machine without one.

    python -m graphfix.bench.kernel_compile [--capability 90] [--only LABEL]

Why: the CPU tests run the kernels in Triton's interpreter, which executes their Python, not
Triton's compiler, so a kernel the interpreter runs correctly can still fail to compile. One did:
a helper with two ``return`` statements of different shapes ran in the interpreter and was
refused by Triton 3.6's code generator on the H200 only. Compiling to a cubin needs Triton's
compiler and its bundled ``ptxas``, not a driver or a GPU, so each kernel is compiled here for
``sm_90`` with the specializations the decoder launches (PDL on, prologues and epilogues on,
int4 and int8), and a compile error fails the test suite instead of a device run.

Prints one line per kernel and exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

FLOAT_ARGS = frozenset({"eps", "scale"})
"""Scalar arguments that are floats; every other non-pointer, non-constexpr argument is an ``i32``."""


@dataclass
class KernelCase:
    """One specialization: the kernel (``module:name``), pointer types that are not bf16, constexprs, launch options."""

    label: str
    kernel: str
    constexprs: dict[str, Any]
    pointers: dict[str, str] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


CASES = [
    KernelCase("gemv rmsnorm", "graphfix.engine.kernels:_gemv_kernel",
               {"NORM": True, "SILU": False, "BIAS": True, "RESIDUAL": False, "BLOCK_N": 8, "BLOCK_K": 512,
                "EVEN_K": True, "PDL": True}),
    KernelCase("gemv silu residual", "graphfix.engine.kernels:_gemv_kernel",
               {"NORM": False, "SILU": True, "BIAS": False, "RESIDUAL": True, "BLOCK_N": 4, "BLOCK_K": 1024,
                "EVEN_K": False,
                    "PDL": True}),
    KernelCase("rows prologue", "graphfix.engine.kernels:_prologue_kernel",
               {"NORM": True, "SILU": False, "BLOCK_K": 4096, "PDL": True}),
    KernelCase("rows gemm", "graphfix.engine.kernels:_rows_kernel",
               {"BIAS": True, "RESIDUAL": True, "BLOCK_N": 32, "BLOCK_K": 256, "EVEN_K": True, "BLOCK_M": 16,
                "F32_DOT": False,
                    "PDL": True}),
    KernelCase("attention split", "graphfix.engine.attention_kernel:_split_kernel",
               {"HEAD_DIM": 128, "BLOCK": 32, "HAS_WINDOW": True, "PDL": True},
               {"pos_ptr": "*i64", "po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32"}, num_warps=1),
    KernelCase("attention combine", "graphfix.engine.attention_kernel:_combine_kernel",
               {"HEAD_DIM": 128, "SPLITS_P2": 8, "PDL": True},
               {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32"}),
    KernelCase("rope and cache write", "graphfix.engine.rope_kernel:_rope_cache_kernel",
               {"HEAD_DIM": 128, "INTERLEAVED": False, "PDL": True},
               {"pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}),
    KernelCase("qgemv int4:128 rmsnorm", "graphfix.quant.kernels:_qgemv_kernel",
               {"BITS": 4, "GROUP": 128, "NORM": True, "SILU": False, "BIAS": False, "RESIDUAL": False,
                "BLOCK_N": 16, "BLOCK_K": 512,
                    "ACC_W": 4, "PDL": True},
               {"q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16"}),
    KernelCase("qgemv int8 silu residual", "graphfix.quant.kernels:_qgemv_kernel",
               {"BITS": 8, "GROUP": 0, "NORM": False, "SILU": True, "BIAS": True, "RESIDUAL": True, "BLOCK_N": 4,
                "BLOCK_K": 1024,
                    "ACC_W": 1024, "PDL": True},
               {"q_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32"}),
    KernelCase("qrows int4:64 bf16", "graphfix.quant.kernels:_qrows4_kernel",
               {"GROUP": 64, "BIAS": False, "RESIDUAL": True, "BLOCK_N": 64, "BLOCK_M": 16, "MAGIC": 1,
                "F32_DOT": False, "PDL": True},
               {"q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16"}, num_stages=4),
    KernelCase("qrows int4:128 fp16", "graphfix.quant.kernels:_qrows4_kernel",
               {"GROUP": 128, "BIAS": True, "RESIDUAL": False, "BLOCK_N": 32, "BLOCK_M": 16, "MAGIC": 2,
                "F32_DOT": False, "PDL": False},
               {"x_ptr": "*fp16", "q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp16",
                "b_ptr": "*fp16", "res_ptr": "*fp16"}),
    KernelCase("qrows int8", "graphfix.quant.kernels:_qrows_kernel",
               {"BITS": 8, "GROUP": 0, "NORM": False, "SILU": False, "BIAS": False, "RESIDUAL": True, "BLOCK_N": 32,
                "BLOCK_K": 256, "BLOCK_M": 16, "F32_DOT": False, "PDL": True},
               {"q_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32"}),
]


def _signature(fn: Any, case: KernelCase) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in case.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = case.pointers.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def compile_case(case: KernelCase, capability: int = 90) -> float:
    """Compile ``case`` to a cubin for ``sm_<capability>``; returns seconds (raises what Triton raises)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = case.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    missing = set(case.constexprs) - set(fn.arg_names)
    if missing:
        raise TypeError(f"{case.kernel} has no argument {min(missing)!r}")
    constexprs = {(fn.arg_names.index(k),): v for k, v in case.constexprs.items()}
    src = ASTSource(fn=fn, signature=_signature(fn, case), constexprs=constexprs)
    started = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{case.label}: no cubin produced")
    return time.perf_counter() - started


def reason(exc: BaseException) -> str:
    """One line: Triton's ``CompilationError`` prints the source with a caret; what went wrong is its cause."""
    cause = exc.__cause__ or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    p.add_argument("--only", default=None, help="compile the cases whose label contains this text")
    args = p.parse_args(argv)
    import triton

    failed = 0
    cases = [c for c in CASES if args.only is None or args.only in c.label]
    print(f"Triton {triton.__version__}, sm_{args.capability}, {len(cases)} kernels")
    for case in cases:
        try:
            seconds = compile_case(case, args.capability)
            print(f"  ok     {case.label:28s} {seconds:5.1f}s", flush=True)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit code says so
            failed += 1
            print(f"  FAILED {case.label:28s} {reason(exc)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
