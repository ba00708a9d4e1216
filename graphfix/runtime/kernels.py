"""An optional Triton GEMV for batch-1 decode: ``graphfix::gemv(x[1, K], W[N, K]) -> [1, N]``.

A decode step at batch 1 is a chain of matrix-vector products that stream every
weight once: their speed is the achieved read bandwidth. On an H100 (torch 2.11,
cuBLAS "nvjet" kernels) the decode's linears alone ran at 2.57 TB/s, 0.86 of the
card's 2.98 TB/s copy bandwidth (docs/benchmarks.md). This kernel is the
experiment against that: each program owns ``BLOCK_N`` output rows and walks
``K`` in ``BLOCK_K`` tiles of 16-byte loads (weights marked evict-first, so they do
not push the activations out of L2), accumulating in float32; the tile sizes are
autotuned per ``(N, K)`` on first use.

It is registered with ``torch.library.triton_op``, so ``torch.compile`` (fullgraph,
CUDA graphs) keeps it as a kernel call in the graph. ``use_triton_gemv(model)``
switches a model's bias-free ``nn.Linear`` modules to ``GemvLinear``, which calls it
only for one row on CUDA in bf16/fp16 and falls back to ``F.linear`` otherwise
(prefill, larger batches, CPU, no Triton). Nothing moves: same modules, same
parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: GemvLinear is then plain nn.Linear
    triton = None
    tl = None

HAS_TRITON = triton is not None


CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (8, 256, 4, 4), (16, 256, 4, 4), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
]

if HAS_TRITON:

    def _gemv_body(x_ptr, w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        x_ptrs = x_ptr + rk
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
                xv = tl.load(x_ptrs)
            else:
                mask_k = k + rk < K
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")
                xv = tl.load(x_ptrs, mask=mask_k, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)
        tl.store(out_ptr + rn, out.to(out_ptr.dtype.element_ty), mask=mask_n)

    gemv_kernel = triton.jit(_gemv_body)
    gemv_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in CONFIGS],
        key=["N", "K"],
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(gemv_kernel))

    @torch.library.triton_op("graphfix::gemv", mutates_args={})
    def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for one row ``x`` (``(1, K)``) and ``w`` ``(N, K)`` with unit stride along K."""
        n, k = w.shape
        x = x.reshape(1, k).contiguous()
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        torch.library.wrap_triton(gemv_kernel_tuned)[grid](x, w, out, n, k, w.stride(0))
        return out


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose one-row CUDA bf16/fp16 call runs ``graphfix::gemv``; ``F.linear`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (HAS_TRITON and x.is_cuda and self.bias is None and x.dtype == w.dtype
                and w.dtype in (torch.bfloat16, torch.float16) and w.stride(1) == 1 and x.shape[:-1].numel() == 1):
            return torch.ops.graphfix.gemv(x, w).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def use_triton_gemv(model: nn.Module) -> int:
    """Switch ``model``'s bias-free ``nn.Linear`` modules to ``GemvLinear`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = GemvLinear
            count += 1
    return count


def use_cublas(model: nn.Module) -> int:
    """Undo ``use_triton_gemv``."""
    count = 0
    for module in model.modules():
        if type(module) is GemvLinear:
            module.__class__ = nn.Linear
            count += 1
    return count
